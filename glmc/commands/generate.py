"""Generate text (or token ids) from a built artifact, with optional MTP speculation.

The generated text, or with --prompt-ids the generated ids comma-separated, is the first line
of stdout (newlines in text are written as \\n); tokens/s and the mean acceptance length go to
stderr."""

from __future__ import annotations

import argparse

from glmc.commands._common import EXIT_OK
from glmc.errors import GlmcError

NAME = "generate"
HELP = "Generate from a built artifact (torch, hf, aoti or onnx), with optional MTP speculation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="a `glmc build` output folder, or one target's folder in it")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenizer.json of the artifact, else bytes)")
    src.add_argument("--prompt-ids", help="prompt token ids, comma-separated (e.g. 5,17,42)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--target", help="which target of a build folder to run: torch, hf, trtllm, aoti, onnx")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--speculative", choices=["mtp"], help="draft with the MTP layer, verify in one forward")
    p.add_argument("--draft-tokens", type=int, help="drafts per step with --speculative, 1..8 (default 3)")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise GlmcError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import sys

    from glmc.runtime import MAX_DRAFT_TOKENS, Sampling, generate, load_tokenizer, open_artifact

    if args.temperature is None and (args.top_p != 1.0 or args.seed is not None) and not args.greedy:
        raise GlmcError("--top-p and --seed apply to sampling: add --temperature T")
    sampling = (
        Sampling()
        if args.temperature is None
        else Sampling(greedy=False, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    )
    if args.speculative is None and args.draft_tokens is not None:
        raise GlmcError("--draft-tokens needs --speculative mtp")
    draft = 0
    if args.speculative == "mtp":
        draft = 3 if args.draft_tokens is None else args.draft_tokens
        if not 1 <= draft <= MAX_DRAFT_TOKENS:
            raise GlmcError(f"--draft-tokens must be in 1..{MAX_DRAFT_TOKENS} (got {draft})")
    art = open_artifact(args.artifact, args.target)
    tok = None
    if args.prompt is not None:
        tok = load_tokenizer([art.folder, art.folder.parent], art.spec.vocab_size)
        prompt = tok.encode(args.prompt)
    else:
        prompt = _parse_ids(args.prompt_ids)
    eos = tuple(art.spec.tokens.eos_token_id or ())
    out, stats = generate(art.backend, prompt, args.max_new_tokens, sampling, draft, eos)
    if tok is not None:
        print(tok.decode(out).replace("\\", "\\\\").replace("\n", "\\n"))
    else:
        print(",".join(map(str, out)))
    print(
        f"glmc generate: {art.target} backend, {stats.prompt_tokens} prompt + {stats.new_tokens} new tokens; "
        f"prefill {stats.prefill_s * 1e3:.1f} ms; decode {stats.decode_tokens_per_s:.1f} tokens/s; "
        f"mean acceptance length {stats.mean_acceptance_length:.2f}"
        + (f" (K={draft})" if draft else " (no speculation)"),
        file=sys.stderr,
    )
    return EXIT_OK
