"""Decode speed with MTP speculation against plain decoding, on CPU, on a model that has learned.

Trains a small byte-level GLM (MTP layer included, loss CE + 0.3 * MTP CE) for a few minutes on
synthetic templated English, then decodes greedily from held-out prompts with `glmc generate`'s
loop: plain KV-cache decoding (the peer) and MTP speculation with K drafts, same weights, same
backend, same run. Prints decode tokens/s, the speedup and the mean acceptance length (tokens
committed per trunk forward), and checks that speculative output equals plain output.

    python bench/generate.py [--steps 300] [--new-tokens 96] [--drafts 1,2,3] [--backend torch,onnx]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import glmc
from glmc.api import build_torch
from glmc.runtime import generate
from glmc.runtime.backend import Backend, TorchBackend

SPEC = {
    "name": "bench-mtp",
    "vocab_size": 256,  # bytes: the runtime's byte-level fallback tokenizer
    "hidden_size": 128,
    "num_layers": 6,
    "num_dense_layers": 1,
    "attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "qk_norm": True, "qkv_bias": True},
    "mlp": {"intermediate_size": 256},
    "moe": {"num_experts": 8, "num_shared_experts": 1, "top_k": 2, "intermediate_size": 64,
            "routed_scaling_factor": 2.5},
    "num_mtp_layers": 1,
    "max_position_embeddings": 1024,
}  # fmt: skip

WORDS = {
    "adj": ["red", "quiet", "small", "bright", "old", "heavy", "green", "curious"],
    "noun": ["cat", "river", "engine", "garden", "teacher", "window", "mountain", "robot"],
    "verb": ["watches", "follows", "repairs", "paints", "visits", "carries", "finds", "moves"],
    "place": ["near the station", "in the morning", "under the bridge", "after the rain"],
}


def sentence(rng: random.Random) -> str:
    w = {k: rng.choice(v) for k, v in WORDS.items()}
    return f"the {w['adj']} {w['noun']} {w['verb']} the {rng.choice(WORDS['noun'])} {w['place']}.\n"


def corpus(n: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.tensor(list("".join(sentence(rng) for _ in range(n)).encode()), dtype=torch.int64)


def train(steps: int, batch: int, seq: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_torch(glmc.ModelSpec.from_dict(SPEC), seed=seed)
    data = corpus(20000, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        ids = torch.stack([data[s : s + seq] for s in starts.tolist()])
        logits, (mtp,) = model.forward_with_mtp(ids)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        ce_mtp = F.cross_entropy(mtp[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
        opt.zero_grad(set_to_none=True)
        (ce + 0.3 * ce_mtp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {ce.item():.3f}  mtp loss {ce_mtp.item():.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    return model.eval()


def open_backend(model: torch.nn.Module, backend: str, tmp: Path) -> Backend:
    if backend == "torch":
        return TorchBackend(model, model.spec)  # type: ignore[arg-type]
    from glmc.runtime import open_artifact

    glmc.save_pretrained(model, tmp / "ckpt")
    glmc.build(tmp / "ckpt", tmp / "out", weights=tmp / "ckpt", emit=[backend], dtype="f32")
    return open_artifact(tmp / "out" / backend).backend


def measure(
    backend: Backend, prompts: list[list[int]], new: int, drafts: list[int], repeats: int
) -> dict[int, tuple[float, float, list[list[int]]]]:
    """Per K (0 = plain): median decode tokens/s over `repeats` passes, mean acceptance length,
    outputs. The configurations take turns within each pass, so load drift on a shared machine
    hits them alike."""
    rates: dict[int, list[float]] = {k: [] for k in drafts}
    accepted: dict[int, list[int]] = {k: [] for k in drafts}
    outs: dict[int, list[list[int]]] = {k: [] for k in drafts}
    for r in range(repeats + 1):  # pass 0 warms up (and records outputs and acceptance)
        for k in drafts:
            tokens, secs = 0, 0.0
            for p in prompts:
                out, st = generate(backend, p, new, draft_tokens=k)
                tokens += st.new_tokens - 1
                secs += st.decode_s
                if r == 0:
                    outs[k].append(out)
                    accepted[k] += st.accepted_per_round
            if r:
                rates[k].append(tokens / secs)
    return {k: (statistics.median(rates[k]), sum(accepted[k]) / len(accepted[k]), outs[k]) for k in drafts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--drafts", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="torch,onnx", help="comma-separated: torch, onnx, aoti")
    ap.add_argument("--seed", type=int, default=0)
    # One thread: batch-1 decode gains nothing from a second one, and on a shared 2-core VM the
    # OpenMP barrier of two threads is what other jobs disturb most.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"training {SPEC['name']} for {args.steps} steps (batch {args.batch} x {args.seq} bytes)")
    t0 = time.perf_counter()
    model = train(args.steps, args.batch, args.seq, args.seed)
    train_s = time.perf_counter() - t0
    rng = random.Random(args.seed + 1)  # held-out sentences: a different stream than training
    prompts = [list(sentence(rng).encode()) + list(b"the ") for _ in range(args.prompts)]
    drafts = [0, *(int(x) for x in args.drafts.split(","))]
    print(f"\ntrained in {train_s:.0f} s; {args.prompts} prompts x {args.new_tokens} new tokens, greedy")
    for name in args.backend.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            res = measure(
                open_backend(model, name, Path(tmp)), prompts, args.new_tokens, drafts, args.repeats
            )
        base, _, want = res[0]
        print(
            f"\nbackend {name}: "
            + bytes(t for t in want[0] if t < 256).decode(errors="replace").split("\n")[0][:80]
        )
        print(
            "| backend | decoding | decode tokens/s | speedup | mean acceptance length | same tokens as plain |"
        )
        print("|---|---|---:|---:|---:|---|")
        for k in drafts:
            rate, acc, outs = res[k]
            label = "plain (peer)" if k == 0 else f"MTP K={k}"
            same = "yes" if outs == want else "NO"
            print(f"| {name} | {label} | {rate:.1f} | {rate / base:.2f}x | {acc:.2f} | {same} |")


if __name__ == "__main__":
    main()
