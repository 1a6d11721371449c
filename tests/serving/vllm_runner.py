"""Runs inside vLLM's own venv (tests/serving/vllm_venv.py), never in the test venv: it imports vllm,
torch and safetensors only, not glmc. `python vllm_runner.py JOBS.json OUT.json`.

Each job loads one model folder with one configuration and records what vLLM did: greedy ids
per prompt, speculative-decoding counters, the tensors its loader put into the model (and the
MTP drafter), or the error it raised. Errors are recorded, not raised, so one refusal (FP8
kernels this CPU lacks) does not hide the other jobs' results. All jobs share one process: vLLM's
import alone takes tens of seconds on two cores.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# In-process engine (no engine-core subprocess), offline, one thread: the machine has two cores.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "1")

SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}


def _counters(llm: Any) -> dict[str, float]:
    out = dict.fromkeys(SPEC_COUNTERS.values(), 0.0)
    for m in llm.get_metrics():
        key = SPEC_COUNTERS.get(m.name)
        if key is not None:
            out[key] += float(m.value)
    return out


_LOADED: dict[str, dict[str, Any]] = {}  # model class -> its parameters as loaded, this job


def _capture_loaded() -> None:
    """Snapshot every model's parameters right after vLLM's loader filled them and before
    `process_weights_after_loading` repacks them for its kernels: the checkpoint layout."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    original = DefaultModelLoader.load_weights

    def load_weights(self: Any, model: Any, model_config: Any) -> None:
        original(self, model, model_config)
        _LOADED[type(model).__name__] = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.numel()
        }

    DefaultModelLoader.load_weights = load_weights  # type: ignore[method-assign]


def _contains(hay: Any, needle: Any) -> bool:
    """Whether `needle`'s rows (1-D: elements) appear as a contiguous run of `hay`'s: how
    vLLM stacks q/k/v, gate/up and experts (and splits nothing at tp=1)."""
    import torch

    h = hay.reshape(-1, hay.shape[-1]) if hay.dim() > 1 and needle.dim() > 1 else hay.reshape(-1, 1)
    n = needle.reshape(-1, needle.shape[-1]) if needle.dim() > 1 else needle.reshape(-1, 1)
    if h.shape[1] != n.shape[1] or h.shape[0] < n.shape[0]:
        return False
    starts = torch.nonzero((h == n[0]).all(dim=1)).flatten().tolist()
    return any(s + n.shape[0] <= h.shape[0] and torch.equal(h[s : s + n.shape[0]], n) for s in starts)


def _coverage(model_dir: str, loaded: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Checkpoint tensors whose values appear nowhere in what vLLM loaded (trunk or drafter)."""
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    params = [p for model in loaded.values() for p in model.values()]
    missing = [k for k, t in tensors.items() if not any(_contains(p, t.float()) for p in params)]
    return {"checkpoint_tensors": len(tensors), "not_found": missing, "models": sorted(loaded)}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    _LOADED.clear()
    res: dict[str, Any] = {"name": job["name"]}
    t0 = time.perf_counter()
    spec = job.get("speculative")
    try:
        llm = LLM(
            model=job["model"],
            skip_tokenizer_init=True,
            dtype=job.get("dtype", "auto"),
            enforce_eager=True,
            max_model_len=job.get("max_model_len", 256),
            max_num_seqs=max(1, len(job.get("prompts", [])) or 1),
            gpu_memory_utilization=0.1,  # on CPU: the share of host memory vLLM may claim
            seed=0,
            disable_log_stats=False,  # speculative-decoding counters
            speculative_config=None if not spec else {"method": "mtp", "num_speculative_tokens": spec},
        )
    except Exception as e:  # recorded for the test to judge (e.g. FP8 kernels this CPU lacks)
        res |= {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        res["quant_config"] = _quant_config_view(job["model"])
        return res
    res["load_s"] = time.perf_counter() - t0
    hf = llm.llm_engine.model_config.hf_config
    res["config"] = {
        k: getattr(hf, k, None) for k in ("model_type", "num_hidden_layers", "num_nextn_predict_layers")
    }
    res["quant_config"] = _quant_config_view(job["model"])
    if job.get("check_weights"):
        res["coverage"] = _coverage(job["model"], _LOADED)
    if job.get("prompts"):
        before = _counters(llm)
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
        t1 = time.perf_counter()
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False
        )
        res["generate_s"] = time.perf_counter() - t1
        res["ids"] = [list(o.outputs[0].token_ids) for o in outs]
        after = _counters(llm)
        res["spec"] = {k: after[k] - before[k] for k in after}
    del llm
    return res


def _quant_config_view(model_dir: str) -> dict[str, Any] | None:
    """What vLLM makes of config.json's quantization_config (parsed, not run)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    if not cfg:
        return None
    from vllm.model_executor.layers.quantization import get_quantization_config

    qc = get_quantization_config(cfg["quant_method"]).from_config(cfg)
    view = {"class": type(qc).__name__, "method": qc.get_name()}
    for attr in ("weight_block_size", "ignored_layers", "is_checkpoint_fp8_serialized", "activation_scheme"):
        if hasattr(qc, attr):
            v = getattr(qc, attr)
            view[attr] = list(v) if isinstance(v, (list, tuple)) else v
    return view


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    _capture_loaded()
    results = []
    for job in jobs:
        results.append(run_job(job))
        Path(sys.argv[2]).write_text(json.dumps(results, indent=1))  # partial results survive a crash


if __name__ == "__main__":
    main()
