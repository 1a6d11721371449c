"""glmc's torch target vs Hugging Face transformers' Glm4MoeForCausalLM on CPU.

Same config, same weights (glmc writes a checkpoint, transformers loads it), same batch. Times
forward and forward+backward (cross-entropy loss) for glmc eager, glmc compiled
(`torch.compile(fullgraph=True)`) and transformers eager, and prints the ratios.

A second table sets glmc's FP8 torch model (the `fuse-moe,quantize-fp8` graph, weights
quantised from the same fp32 ones) beside the fp32 and bf16 models: eager forward time and the
bytes the model holds (parameters and buffers).

    python bench/forward.py [--preset glm-small] [--batch 4] [--seq 256] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _peer import glmc_and_transformers  # bench/ is the script's folder

import glmc
from glmc.export.torch import build_model, passed_state
from glmc.lower import lower
from glmc.pipeline import run_pipeline

FP8_PIPELINE = "fuse-moe,quantize-fp8"


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch.set_num_threads(args.threads)
    import transformers

    spec = glmc.presets.get(args.preset).model_copy(update={"num_mtp_layers": 0})
    ours, hf = glmc_and_transformers(spec, seed=0)
    ids = torch.randint(
        0, spec.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    compiled = torch.compile(ours, fullgraph=True)
    t0 = time.perf_counter()
    loss(compiled(ids)).backward()
    compile_s = time.perf_counter() - t0

    def fwd(m: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(ids)

        return run

    def fwd_bwd(m: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            loss(m(ids)).backward()
            return None

        return run

    hf_call = lambda x: hf(x).logits  # noqa: E731
    rows = []
    for label, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
        t_hf = timeit(make(hf_call), args.repeats)
        t_eager = timeit(make(ours), args.repeats)
        t_comp = timeit(make(compiled), args.repeats)
        rows.append((label, t_hf, t_eager, t_comp))

    tokens = args.batch * args.seq
    print(f"# glmc vs transformers {transformers.__version__} Glm4MoeForCausalLM, torch {torch.__version__}")
    print(
        f"# {platform.processor() or platform.machine()}, {args.threads} threads; preset {args.preset} "
        f"({glmc.inspect(spec)['params']['total'] / 1e6:.1f}M params), batch {args.batch} x seq {args.seq}, fp32"
    )
    print(
        f"# experts_implementation (transformers): {getattr(hf.config, '_experts_implementation', 'default')}"
    )
    print(f"# max |logit diff| = {diff:.2e}; glmc compile (fwd+bwd, cold) {compile_s:.1f} s")
    print(
        "| pass | transformers ms | glmc eager ms | glmc compiled ms | eager speedup | compiled speedup | glmc compiled tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, t_hf, t_eager, t_comp in rows:
        print(
            f"| {label} | {t_hf * 1e3:.1f} | {t_eager * 1e3:.1f} | {t_comp * 1e3:.1f} | "
            f"{t_hf / t_eager:.2f}x | {t_hf / t_comp:.2f}x | {tokens / t_comp:,.0f} |"
        )
    rows8 = fp8_rows(spec, ours, ids, args.repeats)
    t32, b32 = rows8[0][1], rows8[0][2]
    print()
    print("| glmc eager forward | ms | vs fp32 | MB held | vs fp32 | max abs logit diff vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, t, held, diff in rows8:
        print(
            f"| {label} | {t * 1e3:.1f} | {t / t32:.2f}x | {held / 1e6:.1f} | {held / b32:.2f}x | {diff:.2e} |"
        )


def fp8_rows(
    spec: glmc.ModelSpec, ours: torch.nn.Module, ids: torch.Tensor, repeats: int
) -> list[tuple[str, float, int, float]]:
    """(model, eager forward s, bytes held, max |logit diff| vs fp32) for fp32, bf16 and FP8."""
    plain = lower(spec, dtype="f32")
    g = run_pipeline(plain, FP8_PIPELINE)
    state = ours.state_dict()
    bf16 = build_model(plain, dtype=torch.bfloat16)
    bf16.load_state_dict(state)
    fp8 = build_model(g)
    fp8.load_state_dict(passed_state(g, state))
    with torch.no_grad():
        want = ours(ids)
    rows = []
    for label, m in (("fp32", ours), ("bf16", bf16.eval()), (f"FP8 ({FP8_PIPELINE})", fp8.eval())):
        held = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        with torch.no_grad():
            diff = (m(ids).float() - want).abs().max().item()

            def run(m: torch.nn.Module = m) -> object:
                with torch.no_grad():
                    return m(ids)

        rows.append((label, timeit(run, repeats), held, diff))
    return rows


if __name__ == "__main__":
    main()
