import sysconfig
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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's
    spin-waiting makes two threads many times slower than one."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
