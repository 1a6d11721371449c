"""Generate text (or token ids) from a built artifact, with optional MTP speculation.

The generated text, or with --prompt-ids the generated ids comma-separated, is the first line
of stdout (newlines in text are written as \\n); with --prompt-file, one line per prompt, in
order, all prompts decoded as one batch. Tokens/s, the mean acceptance length, the dtype and
the compile time go to stderr."""

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
    src.add_argument("--prompt-file", help="a text file, one prompt a line: decoded together as one batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--target", help="which target of a build folder to run: torch, hf, trtllm, aoti, onnx")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--speculative", choices=["mtp"], help="draft with the MTP layer, verify in one forward")
    p.add_argument("--draft-tokens", type=int, help="drafts per step with --speculative, 1..8 (default 3)")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="torch backend dtype; auto (default): bf16 where the CPU has AVX512-BF16 or AMX, else fp32",
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="torch and checkpoint artifacts with FP8 weights: load them dequantised (in --dtype) instead "
        "of running the FP8 path",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch backend: compile the decode, verify and MTP steps once (torch.compile; CUDA graphs on "
        "CUDA); pays off for long generations, costs a compile of each step shape first",
    )


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise GlmcError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _read_prompt_file(path: str) -> list[str]:
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GlmcError(f"--prompt-file {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise GlmcError(f"--prompt-file {path}: no prompt in it (one prompt a line)")
    return lines


def run(args: argparse.Namespace) -> int:
    import sys

    from glmc.runtime import MAX_DRAFT_TOKENS, Sampling, generate_batch, load_tokenizer, open_artifact

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
    lines = _read_prompt_file(args.prompt_file) if args.prompt_file is not None else None
    art = open_artifact(
        args.artifact, args.target, dtype=args.dtype, compiled=args.compile, dequantize=args.dequantize
    )
    tok = None
    if args.prompt_ids is not None:
        prompts = [_parse_ids(args.prompt_ids)]
    else:
        tok = load_tokenizer([art.folder, art.folder.parent], art.spec.vocab_size)
        prompts = [tok.encode(t) for t in (lines if lines is not None else [args.prompt])]
    eos = tuple(art.spec.tokens.eos_token_id or ())
    outs, stats = generate_batch(art.backend, prompts, args.max_new_tokens, sampling, draft, eos)
    for out in outs:
        if tok is not None:
            print(tok.decode(out).replace("\\", "\\\\").replace("\n", "\\n"))
        else:
            print(",".join(map(str, out)))
    rows = f"{len(prompts)} prompts, " if len(prompts) > 1 else ""
    print(
        f"glmc generate: {art.target} backend, {art.dtype}"
        + (f" ({art.dtype_note})" if art.dtype_note else "")
        + f"; {rows}{stats.prompt_tokens} prompt + {stats.new_tokens} new tokens; "
        f"prefill {stats.prefill_s * 1e3:.1f} ms; decode {stats.decode_tokens_per_s:.1f} tokens/s; "
        f"mean acceptance length {stats.mean_acceptance_length:.2f}"
        + (f" (K={draft})" if draft else " (no speculation)")
        + (f"; compile {stats.compile_s:.1f} s (not in the rates)" if stats.compile_s else ""),
        file=sys.stderr,
    )
    return EXIT_OK
