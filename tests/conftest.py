"""Suite-wide test settings: CPU-friendly compile, Triton's interpreter without a GPU, the `gpu`
marker skipping cleanly where no CUDA device exists, a seeded RNG for every fixture and test
(results do not depend on which tests ran before), torch's global switches restored after each
test, a deterministic Hypothesis profile, and a record of skipped tests for CI."""

from __future__ import annotations

import json
import os
import random
import tempfile
import zlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

HAS_CUDA = torch.cuda.is_available()

# Two cores: inductor's compile-worker pool only competes with the test itself.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# TRITON_INTERPRET is read when a kernel module is first imported; set it before any test can.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("GLMC_TRITON_BOUNDS", "1") != "0":
    # Every interpreted load/store/atomic must stay inside its launch's tensors (the CPU stand-in
    # for compute-sanitizer): an out-of-bounds access fails the test instead of corrupting memory.
    from triton_bounds import install  # tests/ is on sys.path (rootdir conftest)

    install()

# ---- Hypothesis ---------------------------------------------------------------------------------
# "ci" (the default): the same examples on every run and machine (derandomize), no example
# database written into the checkout, no per-example deadline (interpreted kernels are slow on a
# loaded 2-core box). "explore": fresh random examples and more of them, for hunting bugs by hand
# (HYPOTHESIS_PROFILE=explore pytest tests/kernels); a failure prints the blob that replays it.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    derandomize=False,
    database=None,
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# Hypothesis also caches the constants it finds in the code under test, in ./.hypothesis by
# default: keep that out of the checkout too (read when first needed, after this runs).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "glmc-hypothesis"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


# ---- seeds --------------------------------------------------------------------------------------
# Every fixture and every test body starts from an RNG state that depends only on its own name,
# so an unseeded torch.randn draws the same values whichever tests ran first (a session fixture
# built during another test, or a test that consumed random numbers, cannot shift them). Tests
# still pass explicit generators where the values matter; this is the floor under all of them.


def _seed_everything(key: str) -> None:
    seed = zlib.crc32(key.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Iterator[None]:
    _seed_everything(f"fixture:{fixturedef.argname}[{getattr(request, 'param_index', 0)}]")
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _seed_everything(f"test:{item.nodeid}")
    yield


# ---- global switches ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_torch_globals() -> Generator[None, None, None]:
    """Put back what a test (or the code it calls, e.g. the trainer's thread plan) may change
    process-wide, so the next test runs under the same settings whatever ran before it."""
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    device = torch.get_default_device()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    matmul_precision = torch.get_float32_matmul_precision()
    grad = torch.is_grad_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    # Only what changed is reset: set_default_device installs a function mode even for "cpu".
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)
    if torch.get_default_device() != device:
        torch.set_default_device(None if device == torch.device("cpu") else device)
    if (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    ) != (
        deterministic,
        warn_only,
    ):
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    if torch.get_float32_matmul_precision() != matmul_precision:
        torch.set_float32_matmul_precision(matmul_precision)
    torch.set_grad_enabled(grad)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


# ---- skip record (CI: every skip must be a gpu-marked test) -----------------------------------
# With GLMC_SKIP_REPORT=PATH, the run writes {"cuda": bool, "gpu_marked": [...], "skipped":
# [{"nodeid", "gpu", "reason"}]} over the tests it ran; .ci/run fails unless, without CUDA, the
# skipped tests are exactly the gpu-marked ones (an importorskip or a version skip that silently
# drops a check on a dev install fails CI). Reports reach the controller under pytest-xdist too.

_ran_gpu: set[str] = set()
_skipped: dict[str, dict[str, Any]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    gpu = "gpu" in report.keywords
    if report.when == "setup" and gpu:
        _ran_gpu.add(report.nodeid)
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped[report.nodeid] = {"nodeid": report.nodeid, "gpu": gpu, "reason": reason}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("GLMC_SKIP_REPORT")
    if not path or hasattr(session.config, "workerinput"):  # the xdist controller writes it
        return
    record = {"cuda": HAS_CUDA, "gpu_marked": sorted(_ran_gpu), "skipped": list(_skipped.values())}
    Path(path).write_text(json.dumps(record, indent=1))
