"""AOTInductor packages: the static-cache packages match glmc's torch model step for step,
`glmc generate` on them gives the torch backend's greedy ids for a batch, they load and run in
a fresh interpreter that cannot import glmc (no site-packages .pth processing, repo off the
path), and folders of the grown-cache packages earlier glmc versions wrote still decode."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import glmc
from glmc.errors import CheckpointError
from glmc.export import RUNTIME_FILE
from glmc.runtime import generate_batch, open_artifact
from glmc.runtime.backend import TorchBackend
from glmc.runtime.backend_aoti import AotiBackend, AotiStaticSteps
from glmc.runtime.steps import FunctionalSteps

# The folder `import glmc` resolves from (the checkout for an editable install): the fresh
# interpreter must not see it, wherever the repository lives.
GLMC_ROOT = str(Path(glmc.__file__).resolve().parent.parent)
PROMPTS = [[5, 17, 42, 7, 300, 12, 99], [400, 3, 3]]

pytestmark = pytest.mark.slow


def _load(path):
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))


def test_static_packages_match_torch_static_steps(built, reference):
    """Logits, hidden states and every cache slot against `forward_static` / `mtp_static` on
    torch's own static cache: a prefill of two rows (the second right-padded), a decode step and
    a 3-token verify step at different positions per row, each step fed the previous step's
    `cache_out` as the runtime does."""
    folder = built / "aoti"
    files = json.loads((folder / RUNTIME_FILE).read_text())["files"]
    assert files == {
        "decoder_static": "decoder_static.pt2",
        "mtp_static": "mtp_static.pt2",
        "verify_static": "verify_static.pt2",
    }
    trunk, mtp = _load(folder / files["decoder_static"]), _load(folder / files["mtp_static"])
    g = torch.Generator().manual_seed(3)
    cache = reference.static_cache(2, 64)
    mcache = reference.static_cache(2, 64, mtp=True)[0]
    flat = [t.clone() for kv in cache for t in kv]
    mflat = [t.clone() for t in mcache]
    for width, row_start in ((7, (0, 0)), (1, (7, 4)), (3, (8, 5))):
        ids = torch.randint(0, 512, (2, width), generator=g)
        pos = (torch.arange(width) + torch.tensor(row_start)[:, None]).contiguous()
        nxt = torch.randint(0, 512, (2, width), generator=g)  # the tokens after each position
        with torch.no_grad():
            logits, hidden = reference.forward_static(ids, pos, cache)
            mlogits, z = reference.mtp_static(nxt, hidden, pos, mcache)
        out = trunk(ids, pos, *flat)
        torch.testing.assert_close(out[0], logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1], hidden, rtol=1e-4, atol=1e-4)
        for got, want in zip(out[2:], [t for kv in cache for t in kv], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        mout = mtp(nxt, out[1], pos, *mflat)
        torch.testing.assert_close(mout[0], mlogits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mout[1], z, rtol=1e-4, atol=1e-4)
        for got, want in zip(mout[2:], mcache, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        flat, mflat = out[2:], mout[2:]


def test_verify_package_matches_greedy_verify_static(built, verify_case):
    """verify_static.pt2 against `greedy_verify_static` on torch's static caches (conftest's
    VerifyCase: rows accepting 2 and 0 drafts): tokens, counts and flags equal, the MTP hidden
    state and every cache slot close."""
    verify = _load(built / "aoti" / "verify_static.pt2")
    verify_case.check(verify(verify_case.ids, verify_case.pos, *verify_case.before))


def test_generate_on_static_packages_gives_the_torch_greedy_ids(built, reference):
    """A batch of two prompts of different lengths in one call per step, plain and with two
    MTP drafts; a second call reuses the (now stale) caches of the first and gives the same."""
    backend = open_artifact(built / "aoti").backend
    assert isinstance(backend, AotiBackend) and backend.static and backend.max_batch is None
    _same_greedy_ids(backend, reference, 12, again=True)
    steps = backend.steps(2, 64)  # the cache length both calls used (19 + 3 slots, bucketed)
    assert isinstance(steps, AotiStaticSteps) and backend.steps(2, 64) is steps
    assert callable(getattr(steps, "greedy_round", None))  # greedy speculation used verify_static


def test_static_folders_without_a_verify_package_speculate_in_three_calls(built, reference, tmp_path):
    """A folder written before verify_static.pt2 existed (its manifest names only
    decoder_static and mtp_static): greedy speculation runs verify, catch-up and drafts as
    separate calls, with the same ids."""
    folder = tmp_path / "aoti"
    folder.mkdir()
    manifest = json.loads((built / "aoti" / RUNTIME_FILE).read_text())
    del manifest["files"]["verify_static"]
    for name in manifest["files"].values():
        (folder / name).symlink_to(built / "aoti" / name)
    (folder / RUNTIME_FILE).write_text(json.dumps(manifest))
    backend = open_artifact(folder).backend
    assert isinstance(backend, AotiBackend) and backend.static
    assert getattr(backend.steps(2, 64), "greedy_round", None) is None
    _same_greedy_ids(backend, reference, 12)


def test_packages_run_without_glmc(built, reference):
    """`python -S` skips site-packages (and the editable install's .pth); only torch's own
    location is added back, so `import glmc` must fail while the packages still run a prefill
    into a zeroed cache, a decode step on the returned cache and an MTP draft."""
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
        trunk = aoti_load_package(folder + "/decoder_static.pt2")
        mtp = aoti_load_package(folder + "/mtp_static.pt2")
        ids = torch.tensor([{ids[0].tolist()!r}])
        pos = torch.arange(5)[None]
        cache = [torch.zeros(1, 2, 64, 32) for _ in range(6)]
        logits, h, *cache = trunk(ids, pos, *cache)
        nxt = logits[:, -1:].argmax(-1)
        out = trunk(nxt, pos[:, -1:] + 1, *cache)
        empty = torch.zeros(1, 2, 64, 32)
        d = mtp(nxt, h[:, -1:].contiguous(), pos[:, -1:], empty, empty)
        assert "glmc" not in sys.modules
        print(",".join(f"{{v:.6f}}" for v in logits[0, -1].tolist()))
        print(",".join(f"{{v:.6f}}" for v in out[0][0, -1].tolist()))
        print(nxt.item(), d[0].shape[-1])
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd="/", env=env, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    got = torch.tensor([float(v) for v in lines[0].split(",")])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    nxt, vocab = (int(v) for v in lines[2].split())
    assert vocab == 512
    with torch.no_grad():
        want_next = reference(torch.cat((ids, torch.tensor([[nxt]])), 1))[0, -1]
    got_next = torch.tensor([float(v) for v in lines[1].split(",")])
    torch.testing.assert_close(got_next, want_next, rtol=1e-4, atol=1e-4)


def _grown_cache_folder(model, spec, folder: Path) -> None:
    """The package set glmc wrote before the static-cache packages: prefill.pt2 (empty cache
    built inside), decode.pt2 (cache in, grown cache out) and mtp.pt2, batch 1."""
    from torch.export import Dim

    from glmc.export.steps import DecoderStep, MTPStep, PrefillStep, example_inputs
    from glmc.export.torch.moe_static import static_moe

    n, max_len = spec.num_layers, spec.max_position_embeddings
    seq, past = Dim("sequence", min=1, max=max_len), Dim("past_sequence", min=1, max=max_len - 1)
    mtp_past, total = Dim("mtp_past_sequence", min=0, max=max_len - 1), Dim.DYNAMIC
    steps = {
        "prefill": (PrefillStep(model), example_inputs(model, 1, 4, 0)[:3], ({1: seq}, {1: total}, {1: seq})),
        "decode": (
            DecoderStep(model),
            example_inputs(model, 1, 3, 5),
            ({1: seq}, {1: total}, {1: seq}, tuple({2: past} for _ in range(2 * n))),
        ),
        "mtp": (
            MTPStep(model),
            example_inputs(model, 1, 3, 5, mtp=True),
            ({1: seq}, {1: seq}, {1: total}, {1: seq}, {2: mtp_past}, {2: mtp_past}),
        ),
    }
    folder.mkdir()
    # torch.export's own deprecation notices (pytree internals) are not this test's subject.
    with static_moe(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for key, (module, args, dyn) in steps.items():
            ep = torch.export.export(module, args, dynamic_shapes=dyn)
            torch._inductor.aoti_compile_and_package(
                ep,
                package_path=str(folder / f"{key}.pt2"),
                inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"},
            )
    files = {key: f"{key}.pt2" for key in steps}
    manifest = {"target": "aoti", "files": files, "spec": spec.model_dump(mode="json")}
    (folder / RUNTIME_FILE).write_text(json.dumps(manifest))


def test_grown_cache_packages_of_earlier_versions_still_decode(tmp_path, make_tiny):
    """A folder with prefill/decode/mtp keys opens on the grown-cache path (FunctionalSteps,
    a row at a time) and gives the torch model's greedy ids, plain and speculative. A one-layer
    model keeps its three compiles short."""
    model = make_tiny(num_layers=1, num_dense_layers=0)
    _grown_cache_folder(model, model.spec, tmp_path / "aoti")
    backend = open_artifact(tmp_path / "aoti").backend
    assert isinstance(backend, AotiBackend) and not backend.static and backend.max_batch == 1
    assert isinstance(backend.steps(1, 64), FunctionalSteps)
    _same_greedy_ids(backend, model, 10)


def test_a_manifest_without_a_trunk_package_is_refused(tmp_path):
    from glmc import presets

    folder = tmp_path / "aoti"
    folder.mkdir()
    spec = presets.get("glm-tiny").model_dump(mode="json")
    manifest = {"target": "aoti", "files": {"mtp_static": "mtp_static.pt2"}, "spec": spec}
    (folder / RUNTIME_FILE).write_text(json.dumps(manifest))
    (folder / "mtp_static.pt2").write_bytes(b"")  # refused before any package loads
    with pytest.raises(CheckpointError, match="no trunk package"):
        open_artifact(folder)


def _same_greedy_ids(backend, model, new_tokens, again=False):
    """The aoti backend's greedy ids for PROMPTS equal the torch backend's, plain and with 2 MTP
    drafts; `again`: a second call (on the first call's now stale caches) gives them too."""
    torch_backend = TorchBackend(model, model.spec)
    for k in (0, 2):
        want, _ = generate_batch(torch_backend, PROMPTS, new_tokens, draft_tokens=k)
        got, stats = generate_batch(backend, PROMPTS, new_tokens, draft_tokens=k)
        assert got == want, k
        assert stats.batch == 2
        if again:
            assert generate_batch(backend, PROMPTS, new_tokens, draft_tokens=k)[0] == want, k
