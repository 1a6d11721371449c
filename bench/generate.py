"""Decode speed of glmc's runtime against transformers, and MTP speculation against plain
decoding, on CPU (or CUDA with --device cuda), all in one run.

Part 1, same checkpoint (preset glm-small, seeded weights; glmc writes it, transformers loads
it), greedy, batch 1 and batch 8 (equal-length prompts), plain decoding:
- transformers `generate()` with its default (dynamic) cache, eager (the peer);
- transformers `generate(cache_implementation="static")` with its forward compiled
  (`compile_config`, transformers' documented fastest path);
- glmc torch backend eager and compiled (static cache; fixed-shape steps under torch.compile,
  CUDA graphs on CUDA), glmc aoti, glmc onnx (CPU only: the static-cache graphs under I/O
  binding) and onnx-grown (the grown-cache graphs genai_config names, fed a masked slice).
bf16 rows (`--bf16 auto`, the default: where bf16 is the fast dtype, see glmc.runtime.cpu; `on`
forces them): part 1 again with the torch-side rows and transformers in bf16; where bf16 is not
the fast dtype the run says why and stays fp32.
Part 2, a model that has learned (a small byte-level GLM with an MTP layer, trained here for a
few minutes on templated English): every glmc backend, plain and MTP K=1..3, held-out prompts.

Columns: decode tokens/s (tokens after each row's first, per second of decoding; transformers:
(N-1) / (time of N new tokens - time of 1), the same quantity), the ratio to transformers'
fastest (part 1), to plain decoding on the same backend (part 2), and to the bandwidth floor:
the bytes one decode step must read (active weights: dense parts, the routed experts the
batch's tokens can reach, the output head; fp32) over the memory bandwidth measured here.
Part 2 also gives prefill ms: the trunk's pass over the prompts and, when speculating, the MTP
layer's pass over them (prompt work, so not in decode tokens/s; glmc.runtime.Stats).
Greedy ids are checked equal across every row of a part.

    python bench/generate.py [--threads 1] [--new-tokens 64] [--steps 300] [--skip aoti]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import glmc
from glmc.api import build_torch
from glmc.runtime import generate_batch
from glmc.runtime.backend import Backend, TorchBackend
from glmc.runtime.cpu import fast_bf16

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


def train(steps: int, batch: int, seq: int, seed: int, layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_torch(glmc.ModelSpec.from_dict({**SPEC, "num_layers": layers}), seed=seed)
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


def open_backend(model: torch.nn.Module, name: str, tmp: Path, threads: int = 0) -> Backend:
    """name: torch, torch-compiled, aoti, onnx (its static-cache graphs under I/O binding) or
    onnx-grown (the same folder's grown-cache graphs, the ones genai_config names); the last
    three built from a checkpoint of `model`. `threads`: ONNX Runtime's intra-op threads (its
    own pool, which torch.set_num_threads does not size; 0 is one per core)."""
    if name.startswith("torch"):
        return TorchBackend(model, model.spec, compiled=name == "torch-compiled")  # type: ignore[arg-type]
    from glmc.runtime import open_artifact

    target = "onnx" if name.startswith("onnx") else name
    if not (tmp / "ckpt").is_dir():
        glmc.save_pretrained(model, tmp / "ckpt")
    if not (tmp / target).is_dir():
        glmc.build(tmp / "ckpt", tmp / target, weights=tmp / "ckpt", emit=[target], dtype="f32")
    backend = open_artifact(tmp / target / target).backend
    if target != "onnx":
        return backend
    from glmc.runtime.backend_onnx import OnnxBackend

    assert isinstance(backend, OnnxBackend)
    files = {k: v for k, v in backend.files.items() if name == "onnx" or not k.endswith("_static")}
    return OnnxBackend(tmp / target / target, backend.spec, files, threads=threads)


class Side:
    """One row of a table: `warm()` runs once untimed (compiling what compiles) and returns
    (compile seconds, mean acceptance length, outputs); `once()` is one timed pass, in decode
    tokens/s. Rows are timed in interleaved rounds (each row once per round), so a load swing
    on a shared machine moves every row of a round, not whichever ran during it."""

    def warm(self) -> tuple[float, float, list[list[int]]]:
        raise NotImplementedError

    def once(self) -> float:
        raise NotImplementedError


class GlmcSide(Side):
    def __init__(self, backend: Backend, prompts: list[list[int]], new: int, k: int) -> None:
        self.backend, self.prompts, self.new, self.k = backend, prompts, new, k
        self.prefill_s: list[float] = []  # of each timed pass (speculating: the MTP layer's pass too)

    def warm(self) -> tuple[float, float, list[list[int]]]:
        outs, st = generate_batch(self.backend, self.prompts, self.new, draft_tokens=self.k)
        return st.compile_s, st.mean_acceptance_length, outs

    def once(self) -> float:
        st = generate_batch(self.backend, self.prompts, self.new, draft_tokens=self.k)[1]
        self.prefill_s.append(st.prefill_s)
        return st.decode_tokens_per_s


class HfSide(Side):
    """transformers generate(): decode tokens/s = (N-1) * B / (time of N new tokens - time of 1)."""

    def __init__(self, hf: Any, prompts: list[list[int]], new: int, static: bool) -> None:
        from transformers import CompileConfig, GenerationConfig

        self.hf, self.new = hf, new
        self.ids = torch.tensor(prompts, device=hf.device)
        self.kw: dict[str, Any] = {}
        if static:
            cc = CompileConfig(
                fullgraph=False, mode="default" if hf.device.type == "cpu" else "reduce-overhead"
            )
            cc._compile_all_devices = True  # transformers compiles on CUDA only unless asked
            self.kw = {"cache_implementation": "static", "compile_config": cc}
        self.static = static
        self.cfg = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)

    def _run(self, n: int) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.hf.generate(
                self.ids, attention_mask=torch.ones_like(self.ids), generation_config=self.cfg,
                max_new_tokens=n, min_new_tokens=n, **self.kw,
            )  # fmt: skip
        if self.hf.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    def warm(self) -> tuple[float, float, list[list[int]]]:
        t0 = time.perf_counter()
        _, out = self._run(self.new)  # compiles (static path) and warms up
        self._run(1)
        first = time.perf_counter() - t0
        return (first if self.static else 0.0), 1.0, out[:, self.ids.shape[1] :].tolist()

    def once(self) -> float:
        t_n, _ = self._run(self.new)
        t_1, _ = self._run(1)
        return (self.new - 1) * self.ids.shape[0] / max(t_n - t_1, 1e-9)


def measure(
    sides: Mapping[str, Side], repeats: int
) -> dict[str, tuple[float, float, float, list[list[int]]]]:
    """{name: (median decode tokens/s, compile s, acceptance, outputs)}, rows interleaved."""
    warm = {}
    for name, side in sides.items():
        t0 = time.perf_counter()
        warm[name] = side.warm()
        print(f"  {name}: warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            rates[name].append(side.once())
    out = {}
    for name in sides:
        compile_s, acc, outs = warm[name]
        out[name] = (statistics.median(rates[name]), compile_s, acc, outs)
        print(f"  {name}: {out[name][0]:.1f} tokens/s (passes: "
              f"{', '.join(f'{r:.0f}' for r in rates[name])})", flush=True)  # fmt: skip
    return out


def bandwidth(device: torch.device) -> float:
    """Bytes/s of a large copy (read + write), the memory floor's denominator."""
    n = 64 * 2**20  # 256 MB fp32 each way: far past any cache
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def step_bytes(model: torch.nn.Module, batch: int) -> float:
    """Bytes one decode step reads (in the weights' dtype): every trunk weight but the embedding table (one row
    per token), routed experts scaled by the expected share of experts the batch's tokens hit
    (1 - (1 - k/E)^B), the output head; the MTP layer is not read in plain decoding."""
    spec: Any = model.spec  # type: ignore[union-attr]
    e, k = spec.moe.num_experts, spec.moe.top_k
    hit = 1 - (1 - k / e) ** batch
    total = 0.0
    for name, p in model.named_parameters():
        if ".mtp." in name:
            continue
        if name == "model.embed_tokens.weight":
            total += batch * p.shape[1] * p.element_size()
        elif ".experts." in name:
            total += hit * p.numel() * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def prompts_for(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g).tolist()


def table_header(peer: str, prefill: bool = False) -> None:
    """The tables' header; `prefill`: with part 2's prefill ms column."""
    extra, align = (" prefill ms |", "---:|") if prefill else ("", "")
    print(
        f"| side | batch | decoding | decode tokens/s | vs {peer} | vs bandwidth floor |{extra} compile s | same ids |"
    )
    print(f"|---|---:|---|---:|---:|---:|{align}---:|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps of the MTP demo model")
    ap.add_argument("--batch", type=int, default=8, help="training batch of the MTP demo model")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--demo-layers",
        type=int,
        default=6,
        help="trunk layers of the MTP demo model (its one MTP layer costs about 1/layers of a trunk step)",
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16, help="part 1 prompt length")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--drafts", default="1,2,3")
    ap.add_argument("--mtp-batches", default="1", help="batch sizes of part 2 (each compiles its own steps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated sides to leave out: hf-static, torch-compiled, aoti, onnx, onnx-grown, part1, part2",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--bf16",
        choices=("auto", "on", "off", "only"),
        default="auto",
        help="part 1 bf16 rows (torch backend and transformers in bf16): auto where bf16 is the fast dtype; "
        "only: no fp32 rows (a GPU's run)",
    )
    ap.add_argument("--seed", type=int, default=0)
    # One thread for both sides: batch-1 decode gains little from a second one, and on a shared
    # 2-core VM the OpenMP barrier of two threads is what other jobs disturb most.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    if device.type != "cpu":
        skip |= {"aoti", "onnx", "onnx-grown"}  # CPU artifacts
    bw = bandwidth(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {device}, copy bandwidth {bw / 1e9:.1f} GB/s, load average {load:.1f} at start"
    )
    batches = [int(x) for x in args.batches.split(",")]
    if "part1" not in skip:
        part1(args, device, skip, bw, batches)
    if "part2" not in skip:
        part2(args, device, skip, bw)
    if hasattr(os, "getloadavg"):
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


def part1(
    args: argparse.Namespace, device: torch.device, skip: set[str], bw: float, batches: list[int]
) -> None:
    from _peer import glmc_and_transformers

    spec = glmc.presets.get("glm-small")
    spec = glmc.ModelSpec.from_dict({**spec.model_dump(mode="json"), "num_mtp_layers": 0})
    ours, hf = glmc_and_transformers(spec, seed=args.seed)
    ours, hf = ours.to(device).eval(), hf.to(device).eval()
    print(f"\npart 1: {spec.name} without MTP, same weights; {args.prompt_len}-token prompts, "
          f"{args.new_tokens} new tokens, greedy")  # fmt: skip
    sides = ["hf-default", "hf-static", "torch", "torch-compiled", "aoti", "onnx-grown", "onnx"]
    sides = [s for s in sides if s not in skip]
    if args.bf16 != "only":
        table(args, ours, hf, sides, batches, bw, "fp32")
    use_bf16, why = fast_bf16(device)
    if args.bf16 == "off" or (args.bf16 == "auto" and not use_bf16):
        print(f"\nbf16 rows left out: {why}" if args.bf16 == "auto" else "\nbf16 rows left out (--bf16 off)")
        return
    # bf16 weights on both sides (the torch backend; transformers); the exported artifacts are fp32.
    bf16_sides = [s for s in sides if s in ("hf-default", "hf-static", "torch", "torch-compiled")]
    print(f"\nbf16 ({why if use_bf16 else f'--bf16 {args.bf16}'}): {', '.join(bf16_sides)}")
    table(args, ours.to(torch.bfloat16), hf.to(torch.bfloat16), bf16_sides, batches, bw, "bf16")


def table(
    args: argparse.Namespace,
    ours: torch.nn.Module,
    hf: Any,
    sides: list[str],
    batches: list[int],
    bw: float,
    dtype: str,
) -> None:
    """Part 1's rows for one dtype (the floor counts the weights' own bytes)."""
    rows: dict[tuple[str, int], tuple[float, float, list[list[int]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        backends = {
            s: open_backend(ours, s, Path(tmp), args.threads) for s in sides if not s.startswith("hf")
        }
        for b in batches:
            prompts = prompts_for(ours.spec.vocab_size, b, args.prompt_len, args.seed + b)  # type: ignore[union-attr]
            print(f"batch {b} ({dtype}):", flush=True)
            runs: dict[str, Side] = {
                side: HfSide(hf, prompts, args.new_tokens, side == "hf-static")
                if side.startswith("hf")
                else GlmcSide(backends[side], prompts, args.new_tokens, 0)
                for side in sides
            }
            for side, (rate, compile_s, _, outs) in measure(runs, args.repeats).items():
                rows[(side, b)] = (rate, compile_s, outs)
    for b in batches:
        fastest = max(rows[(s, b)][0] for s in sides if s.startswith("hf"))
        floor = b * bw / step_bytes(ours, b)
        want = rows[(sides[0], b)][2]
        print(
            f"\nbatch {b}, {dtype}: bandwidth floor {floor:.0f} tokens/s ({step_bytes(ours, b) / 1e6:.1f} MB a step)"
        )
        table_header("transformers' fastest")
        for side in sides:
            rate, compile_s, outs = rows[(side, b)]
            print(f"| {side} | {b} | plain, {dtype} | {rate:.1f} | {rate / fastest:.2f}x | {rate / floor:.2f} | "
                  f"{compile_s:.0f} | {'yes' if outs == want else 'NO'} |")  # fmt: skip


def part2(args: argparse.Namespace, device: torch.device, skip: set[str], bw: float) -> None:
    print(f"\npart 2: training {SPEC['name']} ({args.demo_layers} trunk layers + 1 MTP layer) for "
          f"{args.steps} steps (batch {args.batch} x {args.seq} bytes)")  # fmt: skip
    t0 = time.perf_counter()
    model = train(args.steps, args.batch, args.seq, args.seed, args.demo_layers).to(device)
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    rng = random.Random(args.seed + 1)  # held-out sentences: a different stream than training
    drafts = [0, *(int(x) for x in args.drafts.split(","))]
    sides = [s for s in ("torch", "torch-compiled", "aoti", "onnx-grown", "onnx") if s not in skip]
    with tempfile.TemporaryDirectory() as tmp:
        for b in [int(x) for x in args.mtp_batches.split(",")]:
            prompts = [list(sentence(rng).encode()) + list(b"the ") for _ in range(b)]
            floor = b * bw / step_bytes(model, b)
            print(f"\nbatch {b}:", flush=True)
            want: list[list[int]] | None = None
            lines = []
            for side in sides:
                backend = open_backend(model, side, Path(tmp), args.threads)
                glmc_runs: dict[str, GlmcSide] = {
                    f"{side} K={k}": GlmcSide(backend, prompts, args.new_tokens, k) for k in drafts
                }
                done = measure(glmc_runs, args.repeats)
                base = done[f"{side} K=0"][0]
                for k in drafts:
                    rate, compile_s, acc, outs = done[f"{side} K={k}"]
                    prefill_ms = statistics.median(glmc_runs[f"{side} K={k}"].prefill_s) * 1e3
                    want = outs if want is None else want
                    label = "plain" if k == 0 else f"MTP K={k} (acc. {acc:.2f})"
                    lines.append(f"| glmc {side} | {b} | {label} | {rate:.1f} | {rate / base:.2f}x | "
                                 f"{rate / floor:.2f} | {prefill_ms:.1f} | {compile_s:.0f} | "
                                 f"{'yes' if outs == want else 'NO'} |")  # fmt: skip
            print(f"\nbatch {b}: bandwidth floor {floor:.0f} tokens/s (plain decoding); prefill ms: the "
                  "trunk's pass over the prompts and, speculating, the MTP layer's (not in tokens/s)")  # fmt: skip
            table_header("plain, same backend", prefill=True)
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
