"""vLLM as the judge: the exports are built here (test venv, glmc), vLLM runs them in its own
venv (tests/serving/vllm_venv.py) through one `vllm_runner.py` process for the whole session.

Without that venv the tests skip with the command that makes it; under CI (CI=true) a missing
venv fails instead, so the serving checks can never silently drop out of `.ci/run` (which builds
the venv before pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import glmc
from glmc import presets
from glmc.api import build_torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from serving_setup import (  # noqa: E402
    CORPUS_SENTENCES,
    FP8_SPEC,
    INIT_STD,
    MAX_TOKENS,
    PROMPTS,
    TRAIN_STEPS,
    TRAINED_PROMPTS,
)
from vllm_venv import is_ready, python_of, venv_path  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.serving)


def _tiny_spec() -> glmc.ModelSpec:
    data = presets.get("glm-tiny").model_dump(mode="json")
    return glmc.ModelSpec.from_dict({**data, "name": "glm-tiny-sharp", "initializer_range": INIT_STD})


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    venv = venv_path()
    if not is_ready(venv):
        msg = f"vLLM venv {venv} is missing or stale: python tests/serving/vllm_venv.py"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return python_of(venv)


@pytest.fixture(scope="session")
def sharp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """glm-tiny at init std 0.15, fp32, every norm and bias random too (a tensor vLLM failed to
    load would then show in the values, not hide behind an init of ones or zeros); `glmc build
    CKPT --weights CKPT --emit hf --dtype f32`."""
    model = build_torch(_tiny_spec(), seed=11)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dim() == 1:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                t.copy_(base + 0.1 * torch.randn(t.shape, generator=g))
    ckpt = tmp_path_factory.mktemp("sharp") / "ckpt"
    glmc.save_pretrained(model, ckpt)
    out = ckpt.parent / "build"
    glmc.build(ckpt, out, weights=ckpt, emit=["hf"], dtype="f32")
    return out / "hf"


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`glmc train glm-tiny` for a few dozen steps (fp32, eager, default init) on a small, very
    repetitive corpus, so that trunk and MTP layer both learn it in that budget and the drafts
    have something to agree on; its Hugging Face export."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "corpus"
    data.mkdir()
    (data / "text.txt").write_text(" ".join(CORPUS_SENTENCES * 100))
    run = root / "run"
    cmd = [sys.executable, "-m", "glmc.cli", "train", "glm-tiny", "--data", str(data), "-o", str(run),
           "--steps", str(TRAIN_STEPS), "--seq-len", "64", "--batch-size", "16", "--lr", "1e-2", "--no-compile",
           "--dtype", "fp32", "--no-progress", "--log-every", str(TRAIN_STEPS)]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\nglmc train {TRAIN_STEPS} steps: {time.perf_counter() - t0:.0f} s; {done.stdout.strip()[-200:]}")
    return run / "hf"


@pytest.fixture(scope="session")
def fp8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`glmc build SPEC --pipeline quantize-fp8 --emit hf` (block128) on 128-aligned sizes, but for
    a dense MLP of 320 that the serving rule keeps in BF16."""
    root = tmp_path_factory.mktemp("fp8")
    spec = root / "spec.json"
    spec.write_text(json.dumps(FP8_SPEC))
    glmc.build(spec, root / "build", pipeline="quantize-fp8", emit=["hf"], seed=3)
    return root / "build" / "hf"


@pytest.fixture(scope="session")
def vllm_results(
    vllm_python: Path,
    sharp_model: Path,
    trained_model: Path,
    fp8_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, Any]]:
    """Every vLLM job of the session, run in one process of the vLLM venv (nice, one thread)."""
    jobs: list[dict[str, Any]] = []
    for tag, path, prompts in (("sharp", sharp_model, PROMPTS), ("trained", trained_model, TRAINED_PROMPTS)):
        for k in (0, 1, 3):
            jobs.append({"name": f"{tag}-k{k}", "model": str(path), "dtype": "float32", "prompts": prompts,
                         "max_tokens": MAX_TOKENS, "speculative": k, "check_weights": tag == "sharp" and k < 2})  # fmt: skip
    jobs.append(
        {"name": "fp8", "model": str(fp8_model), "dtype": "bfloat16", "prompts": PROMPTS[:1], "max_tokens": 8}
    )
    root = tmp_path_factory.mktemp("vllm")
    (root / "jobs.json").write_text(json.dumps(jobs))
    out = root / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the test suite's setting; vLLM's own triton must not see it
    t0 = time.perf_counter()
    done = subprocess.run(
        ["nice", "-n", "5", str(vllm_python), str(HERE / "vllm_runner.py"), str(root / "jobs.json"), str(out)],
        capture_output=True, text=True, timeout=2400, env=env, cwd=root,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    assert done.returncode == 0 and out.is_file(), done.stderr[-4000:]
    results = {r["name"]: r for r in json.loads(out.read_text())}
    print(f"\nvLLM runner: {len(jobs)} jobs in {seconds:.0f} s")
    return results
