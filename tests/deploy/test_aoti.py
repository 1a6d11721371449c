"""AOTInductor packages: outputs match glmc's torch model, and the packages load and run in a
fresh interpreter that cannot import glmc (no site-packages .pth processing, repo off the path)."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import glmc

# The folder `import glmc` resolves from (the checkout for an editable install): the fresh
# interpreter must not see it, wherever the repository lives.
GLMC_ROOT = str(Path(glmc.__file__).resolve().parent.parent)

pytestmark = pytest.mark.slow


def _load(path):
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))


def test_prefill_decode_and_mtp_match_torch(built, reference):
    folder = built / "aoti"
    files = json.loads((folder / "glmc_runtime.json").read_text())["files"]
    assert set(files) == {"prefill", "decode", "mtp"}
    prefill, decode, mtp = (_load(folder / files[k]) for k in ("prefill", "decode", "mtp"))
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10)[None]
    past = reference.empty_cache(1)
    hidden = []
    for a, b in ((0, 6), (6, 7), (7, 10)):
        mask = torch.ones(1, b, dtype=torch.int64)
        with torch.no_grad():
            logits, h, want_past = reference.forward_cached(ids[:, a:b], pos[:, a:b], past, mask)
        flat = [t for kv in past for t in kv]
        out = (
            prefill(ids[:, a:b], mask, pos[:, a:b])
            if a == 0
            else decode(ids[:, a:b], mask, pos[:, a:b], *flat)
        )
        torch.testing.assert_close(out[0], logits, rtol=1e-4, atol=1e-4)
        for got, want in zip(out[2:], [t for kv in want_past for t in kv], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        past = want_past
        hidden.append(h)
    h = torch.cat(hidden, 1)
    mtp_past = reference.empty_cache(1, mtp=True)[0]
    mask = torch.ones(1, 9, dtype=torch.int64)
    with torch.no_grad():
        want_logits, want_z, _ = reference.mtp_cached(ids[:, 1:], h[:, :9], pos[:, 1:], mtp_past, mask)
    got = mtp(ids[:, 1:].contiguous(), h[:, :9].contiguous(), mask, pos[:, 1:].contiguous(), *mtp_past)
    torch.testing.assert_close(got[0], want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want_z, rtol=1e-4, atol=1e-4)


def test_packages_run_without_glmc(built, reference):
    """`python -S` skips site-packages (and the editable install's .pth); only torch's own
    location is added back, so `import glmc` must fail while the packages still run."""
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids)[0, -1]
    script = textwrap.dedent(f"""
        import importlib.util, os, sys
        sys.path = [p for p in sys.path if p and os.path.realpath(p) != {GLMC_ROOT!r}]
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        assert importlib.util.find_spec("glmc") is None, "glmc must not be importable here"
        import torch
        from torch._inductor import aoti_load_package
        folder = {str(built / "aoti")!r}
        ids = torch.tensor([{ids[0].tolist()!r}])
        pos = torch.arange(5)[None]
        logits, h, *present = aoti_load_package(folder + "/prefill.pt2")(ids, torch.ones(1, 5, dtype=torch.int64), pos)
        nxt = logits[:, -1:].argmax(-1)
        out = aoti_load_package(folder + "/decode.pt2")(nxt, torch.ones(1, 6, dtype=torch.int64), pos[:, -1:] + 1, *present)
        mtp = aoti_load_package(folder + "/mtp.pt2")
        empty = torch.zeros(1, 2, 0, 32)
        d = mtp(nxt, h[:, -1:].contiguous(), torch.ones(1, 1, dtype=torch.int64), pos[:, -1:] + 1, empty, empty)
        assert "glmc" not in sys.modules
        print(",".join(f"{{v:.6f}}" for v in logits[0, -1].tolist()))
        print(out[0].shape[1], d[0].shape[-1])
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd="/", env=env, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    got = torch.tensor([float(v) for v in lines[0].split(",")])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert lines[1] == "1 512"
