import os
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from glmc.train import TrainConfig

# A corpus every Python installation has: the json package's sources (~50 KB of text).
STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"


@pytest.fixture
def corpus() -> Path:
    assert STDLIB_JSON.is_dir()
    return STDLIB_JSON


def tiny_config(out: Path, data: Path, **changes: object) -> TrainConfig:
    """glm-tiny, 4 x 32 tokens a step, eager, quiet: a step takes tens of milliseconds."""
    base = TrainConfig(
        spec="glm-tiny",
        data=(str(data),),
        out=str(out),
        seq_len=32,
        batch_size=4,
        steps=20,
        warmup_steps=2,
        compile=False,
        progress=False,
        export_hf=False,
        log_every=10**9,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


class GlobalState:
    """Process-wide settings training changes or tests set, captured to be put back: a test must
    not run under another test's thread count, default dtype, RNG, environment or dynamo flags
    (the trainer seeds the RNG and turns on `capture_scalar_outputs` for compiled EP)."""

    def __init__(self) -> None:
        import torch
        import torch._dynamo

        self.threads = torch.get_num_threads()
        self.dtype = torch.get_default_dtype()
        self.rng = torch.get_rng_state()
        self.grad = torch.is_grad_enabled()
        self.env = dict(os.environ)
        self.capture_scalar_outputs = torch._dynamo.config.capture_scalar_outputs

    def restore(self) -> None:
        import torch
        import torch._dynamo

        torch.set_num_threads(self.threads)
        torch.set_default_dtype(self.dtype)
        torch.set_rng_state(self.rng)
        torch.set_grad_enabled(self.grad)
        for key in set(os.environ) - set(self.env):
            del os.environ[key]
        os.environ.update(self.env)
        torch._dynamo.config.capture_scalar_outputs = self.capture_scalar_outputs


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's
    spin-waiting makes two threads many times slower than one. Everything else global is put back
    too (`GlobalState`)."""
    import torch

    state = GlobalState()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        state.restore()


@pytest.fixture(autouse=True, scope="module")
def _module_state() -> Iterator[None]:
    """Module-scoped fixtures (one-process reference runs) train too: they run inside this one."""
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def _test_state() -> Iterator[None]:
    with one_thread():
        yield
