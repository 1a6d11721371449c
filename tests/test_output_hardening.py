"""Output folders and weights that must never go wrong silently: where `build`/`convert` may
write (never the current folder, an input, a symlink, a file), atomic publication with
SIGTERM and SIGKILL leaving nothing behind for long, write errors (a full disk) as one line,
NaN/Inf weights refused on load, convert and generate, and written dtypes agreeing with
config.json. Every refusal exits 2 with one stderr line naming the path or tensor and leaves
no output or temporary folder."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import expect_bad_input as _bad  # tests/cli_helpers.py
from cli_helpers import run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import glmc
import glmc.api
from glmc import outdir, presets
from glmc.cli import main
from glmc.errors import GlmcError
from glmc.export.hf import StreamingWriter, write_safetensors
from glmc.runtime import Sampling, generate
from glmc.runtime.backend import TorchBackend

REPO = Path(__file__).resolve().parents[1]


def _temporaries(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


def _nothing_written(out: Path) -> None:
    assert not out.exists() or out.is_symlink() or out.is_file()
    assert not _temporaries(out.parent, out.name)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """glm-tiny saved in the Hugging Face layout, bf16."""
    path = tmp_path / "hf"
    glmc.save_pretrained(glmc.api.build_torch(presets.get("glm-tiny"), dtype=torch.bfloat16), path)
    return path


def _edit(ckpt: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- where an output may go (item 1) -------------------------------------------------------------


def test_force_never_replaces_the_current_folder_or_one_above_it(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`glmc build -o . --force` used to delete the current folder's contents, the source
    checkpoint included, then fail; `convert SRC -o . --force` from SRC's parent too."""
    before = _snapshot(tmp_path)
    monkeypatch.chdir(ckpt)
    _bad(["build", "glm-tiny", "-o", ".", "--force"], capsys, "output folder . is the current folder")
    _bad(["build", "glm-tiny", "-o", "..", "--force"], capsys, "a folder above the current one")
    _bad(["build", "glm-tiny", "-o", "/", "--force"], capsys, "the filesystem root")
    monkeypatch.chdir(tmp_path)
    _bad(["convert", "hf", "-o", ".", "--force", "--quiet"], capsys, "the current folder")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    _bad(["build", "glm-tiny", "-o", home, "--force"], capsys, f"output folder {home} is the home folder")
    assert _snapshot(tmp_path) == before
    assert not list(tmp_path.rglob(".*tmp-*"))
    with pytest.raises(GlmcError, match="the current folder"):  # the Python API follows the same rules
        glmc.save_pretrained(glmc.api.build_torch(presets.get("glm-tiny")), ".")


def test_output_never_is_holds_or_lies_inside_an_input(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(ckpt)
    w = ["build", ckpt, "--weights", ckpt, "--emit", "torch", "--force", "-o"]
    _bad([*w, ckpt], capsys, f"output folder {ckpt} is the --weights folder {ckpt}")
    _bad([*w, ckpt / "out"], capsys, "lies inside the --weights folder")
    _bad([*w, tmp_path], capsys, f"output folder {tmp_path} contains the --weights folder")
    _bad(["convert", ckpt, "-o", ckpt / "sub", "--quiet"], capsys, "lies inside the source checkpoint")
    _bad(["convert", ckpt, "-o", tmp_path, "--force", "--quiet"], capsys, "contains the source checkpoint")
    # Paths are compared after resolving links: tmp/alias/hf is the checkpoint itself, and
    # tmp/alias is the folder holding it.
    (tmp_path / "alias").symlink_to(tmp_path)
    _bad(
        ["convert", ckpt, "-o", tmp_path / "alias" / "hf", "--force", "--quiet"],
        capsys,
        "is the source checkpoint",
    )
    _bad(["convert", tmp_path / "alias" / "hf", "-o", tmp_path / "new" / ".." / "hf" / "x", "--quiet"], capsys,
         "lies inside the source checkpoint")  # fmt: skip
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(presets.get("glm-tiny").model_dump(mode="json")))
    _bad(["build", spec, "-o", spec, "--force"], capsys, "output folder")  # a spec file is an input too
    assert spec.is_file() and _snapshot(ckpt) == before
    assert not list(tmp_path.rglob(".*tmp-*"))


def test_symlink_output_is_refused_before_any_work(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """-o naming a symbolic link used to fail with a traceback after all the work (item 8):
    it is refused up front, naming the link; neither link nor target is touched."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    _forbid_loading(monkeypatch)
    _bad(
        ["build", "glm-tiny", "--weights", ckpt, "-o", link, "--force"], capsys, f"{link} is a symbolic link"
    )
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    _bad(["convert", ckpt, "-o", dangling, "--quiet"], capsys, f"{dangling} is a symbolic link")
    assert link.is_symlink() and (target / "mine.txt").read_text() == "keep" and dangling.is_symlink()
    assert not _temporaries(tmp_path, "link") and not (tmp_path / "nowhere").exists()


def _no_work(*_a: object, **_k: object) -> None:
    raise AssertionError("the output folder should have been refused before loading weights")


def _forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path that reads checkpoint tensors fails the test: `build --weights` reads through
    `OpenedWeights.read` (into its one lowering), `convert` streams tensors in `write_layout`
    (opening the source reads headers only), and `from_pretrained` stays covered for any caller
    that still loads a whole model."""
    import glmc.convert

    monkeypatch.setattr(glmc.api.OpenedWeights, "read", _no_work)
    monkeypatch.setattr(glmc.convert, "write_layout", _no_work)
    monkeypatch.setattr(glmc.api, "from_pretrained", _no_work)


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        (lambda t: _file(t / "f"), "exists and is not a folder"),
        (lambda t: _file(t / "f") / "sub" / "out", "is a file, not a folder"),
        (lambda t: Path("/proc/glmc-out"), "cannot create output folder /proc/glmc-out"),
        (lambda t: t / "ro" / "out", "Read-only file system"),
    ],
)
def test_unwritable_outputs_fail_before_any_work(
    ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: Callable[[Path], Path],
    needle: str,
) -> None:
    """-o that is a file, under a file, under /proc or on a read-only filesystem used to end in
    a traceback after the work (item 9)."""
    out = where(tmp_path)
    real_mkdir = pathlib.Path.mkdir

    def read_only_mkdir(self: Path, *a: Any, **k: Any) -> None:
        if self.is_relative_to(tmp_path / "ro"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir)
    _forbid_loading(monkeypatch)
    _bad(["build", "glm-tiny", "--weights", ckpt, "-o", out], capsys, needle, str(out))
    _bad(["convert", ckpt, "-o", out, "--quiet"], capsys, needle)
    if out.parent.is_dir() and os.access(out.parent, os.W_OK):
        assert not _temporaries(out.parent, out.name)


def _file(p: Path) -> Path:
    p.write_text("a file")
    return p


# ---- signals and killed runs (item 7) ------------------------------------------------------------


def _sigterm_after(n: int) -> Callable[..., None]:
    """A StreamingWriter.write that sends this process SIGTERM before its n-th tensor."""
    real = StreamingWriter.write
    calls = [0]

    def write(self: StreamingWriter, name: str, tensor: torch.Tensor) -> None:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        real(self, name, tensor)

    return write


def test_sigterm_during_convert_and_build_removes_the_temporary_folder(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(StreamingWriter, "write", _sigterm_after(20))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["convert", str(ckpt), "-o", str(out), "--quiet"])
    assert e.value.code == 128 + signal.SIGTERM
    assert "terminated by SIGTERM" in capsys.readouterr().err
    _nothing_written(out)
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI restores the handler

    def emit_then_terminated(*a: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    from glmc.export.hf.target import HfTarget

    monkeypatch.setattr(HfTarget, "emit", emit_then_terminated)
    (out / "x").mkdir(parents=True)  # an existing output stays as it was
    with pytest.raises(SystemExit):
        main(["build", "glm-tiny", "-o", str(out), "--force"])
    assert [p.name for p in out.iterdir()] == ["x"] and not _temporaries(tmp_path, "out")


_CHILD = """
import sys, time
from pathlib import Path
import glmc.export.hf as hf
from glmc.cli import main

real = hf.StreamingWriter.write
def write(self, name, tensor):
    real(self, name, tensor)
    print("writing", flush=True)
    time.sleep(120)
hf.StreamingWriter.write = write
raise SystemExit(main(["convert", sys.argv[1], "-o", sys.argv[2], "--quiet"]))
"""


def test_sigterm_to_a_running_convert_process(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _spawn(_CHILD, str(ckpt), str(out))
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "writing"
        assert len(_temporaries(tmp_path, "out")) == 1
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    _nothing_written(out)


_KILLED = """
import sys, time
from glmc.outdir import atomic_folder
with atomic_folder(sys.argv[1]) as tmp:
    (tmp / "part.bin").write_bytes(b"x" * 100000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _marker(folder: Path, **owner: object) -> Path:
    folder.mkdir()
    (folder / outdir.MARKER).write_text(json.dumps(owner))
    return folder


def test_temporaries_of_killed_runs_are_removed_by_the_next_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    p = _spawn(_KILLED, str(out))
    assert p.stdout is not None
    killed = Path(p.stdout.readline().strip())
    p.kill()  # SIGKILL: no handler runs
    p.wait(timeout=60)
    assert killed.is_dir() and outdir.temporary_name_pattern(out).fullmatch(killed.name)
    host = socket.gethostname()
    # Not ours to remove: a live run's folder, one from another machine, one without a marker,
    # names that only look similar, another destination's folder.
    live = _marker(tmp_path / f".out.tmp-{os.getpid()}-0123abcd", pid=os.getpid(), host=host, start=None)
    remote = _marker(tmp_path / ".out.tmp-999999999-0123abcd", pid=999999999, host=host + "-other")
    unmarked = tmp_path / ".out.tmp-999999998-0123abcd"
    unmarked.mkdir()
    lookalike = _marker(tmp_path / ".out.tmp-999999997-xyz", pid=999999997, host=host)
    other = _marker(tmp_path / ".out2.tmp-999999996-0123abcd", pid=999999996, host=host)
    # A pid that is alive again, but for another process (a different start time): abandoned.
    reused = _marker(tmp_path / f".out.tmp-{os.getppid()}-4567cdef", pid=os.getppid(), host=host, start="-1")
    code, _, err = run(["build", "glm-tiny", "-o", out, "--emit", "torch"], capsys)
    assert code == 0, err
    assert not killed.exists() and not reused.exists()
    assert f"removed {killed}" in err and f"removed {reused}" in err
    for kept in (live, remote, unmarked, lookalike, other):
        assert kept.is_dir(), kept
    assert (out / "torch" / "model.safetensors").is_file() and not (out / outdir.MARKER).exists()


# ---- write errors (item 15) ----------------------------------------------------------------------


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are used up."""

    def __init__(self, f: Any, room: list[int]) -> None:
        self.f, self.room = f, room

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes if not isinstance(data, str) else len(data.encode())
        if n > self.room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room[0] -= n
        return int(self.f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Files opened for writing under tmp_path/disk fail with ENOSPC after 200 kB in all."""
    disk = tmp_path / "disk"
    disk.mkdir()
    real_open = pathlib.Path.open
    room = [200_000]

    def open_(self: Path, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = real_open(self, mode, *a, **k)
        return _FullDisk(f, room) if "w" in mode and self.is_relative_to(disk) else f

    monkeypatch.setattr(pathlib.Path, "open", open_)
    yield disk


def test_full_disk_is_one_line_naming_the_output(
    ckpt: Path, full_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = full_disk / "out"
    err = _bad(["convert", ckpt, "-o", out, "--quiet"], capsys, f"cannot write output folder {out}")
    assert "no space left on the device" in err and "it needs about" in err
    _nothing_written(out)
    _bad(
        ["build", "glm-tiny", "-o", out, "--emit", "torch,hf"],
        capsys,
        "no space left on the device",
        str(out),
    )
    _nothing_written(out)


def test_too_little_free_space_is_refused_up_front(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = outdir.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    out = tmp_path / "out"
    err = _bad(["convert", ckpt, "-o", out, "--quiet"], capsys, f"output folder {out} needs about")
    assert "1000 B free" in err
    _nothing_written(out)


# ---- non-finite weights (item 16) ----------------------------------------------------------------

_NAN_AT = "model.layers.1.mlp.experts.6.up_proj.weight"


def _one_nan(t: dict[str, torch.Tensor]) -> None:
    t[_NAN_AT][3, 4] = float("nan")


def _inf_head(t: dict[str, torch.Tensor]) -> None:
    t["lm_head.weight"].fill_(float("inf"))


@pytest.mark.parametrize(("edit", "tensor"), [(_one_nan, _NAN_AT), (_inf_head, "lm_head.weight")])
def test_nonfinite_weights_are_refused_naming_the_tensor(
    ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[dict[str, torch.Tensor]], None],
    tensor: str,
) -> None:
    """One NaN, or an all-Inf head, used to pass convert, build --weights and generate (greedy
    printed 0,0,0,... with exit 0; sampling crashed)."""
    _edit(ckpt, edit)
    out = tmp_path / "out"
    for pipeline in ("", "fuse-moe"):
        _bad(["convert", ckpt, "-o", out, "--pipeline", pipeline, "--quiet"], capsys, tensor, "non-finite")
        _nothing_written(out)
    _bad(["build", ckpt, "--weights", ckpt, "-o", out], capsys, tensor, "non-finite")
    _nothing_written(out)
    _bad(["generate", ckpt, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"], capsys, tensor, "non-finite")
    # Kept on request: the converted and built copies hold the same non-finite values...
    assert run(["convert", ckpt, "-o", out, "--quiet", "--allow-nonfinite"], capsys)[0] == 0
    assert not bool(torch.isfinite(load_file(str(out / "model.safetensors"))[tensor]).all())
    b = tmp_path / "b"
    code, _, err = run(
        ["build", ckpt, "--weights", ckpt, "-o", b, "--emit", "torch", "--allow-nonfinite"], capsys
    )
    assert code == 0, err
    # ...and loading them for generation is still refused, naming the tensor and the file.
    _bad(
        ["generate", b, "--prompt-ids", "1,2,3"], capsys, "non-finite", str(b / "torch" / "model.safetensors")
    )
    _bad(["generate", out, "--prompt-ids", "1,2,3", "--temperature", "0.7"], capsys, tensor)


def test_a_cast_that_overflows_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bf16 reaches 3e38, f16 only 65504: --dtype f16 must not turn a large weight into Inf."""
    _edit(ckpt, lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((1, 2), 1e6))
    out = tmp_path / "out"
    err = _bad(
        ["convert", ckpt, "-o", out, "--dtype", "f16", "--quiet"],
        capsys,
        "model.layers.0.mlp.down_proj.weight",
    )
    assert "[1, 2]" in err  # the element, in the logical tensor's coordinates
    _nothing_written(out)
    assert run(["convert", ckpt, "-o", out, "--dtype", "bf16", "--quiet"], capsys)[0] == 0


def test_generate_refuses_nonfinite_logits() -> None:
    """Weights can be finite and the logits still not (an overflow, or an artifact built with
    --allow-nonfinite): the decoding loop refuses them instead of picking token 0."""
    model = glmc.api.build_torch(presets.get("glm-tiny"))
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("inf")  # one row: +/-Inf and Inf-Inf=NaN in the logits
    backend = TorchBackend(model, model.spec)
    for sampling in (Sampling(), Sampling(greedy=False, temperature=0.8, seed=1)):
        for draft in (0, 2):
            with pytest.raises(GlmcError, match=r"logits at position \d+ hold NaN or Inf"):
                generate(backend, [5, 17, 42], 4, sampling, draft)


def test_truncated_torch_artifact_is_a_checkpoint_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated model.safetensors under `glmc generate` raised safetensors' raw error (item 12)."""
    b = tmp_path / "b"
    assert run(["build", "glm-tiny", "-o", b, "--emit", "torch"], capsys)[0] == 0
    f = b / "torch" / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    _bad(["generate", b, "--prompt-ids", "1,2,3"], capsys, str(f))
    write_safetensors(f, {})  # a valid file without tensors: every tensor missing
    _bad(["generate", b, "--prompt-ids", "1,2,3"], capsys, f"{f} does not match glmc_spec.json")


# ---- written dtypes agree with config.json (item 19) ---------------------------------------------


def _dtypes(f: Path) -> dict[str, str]:
    with safe_open(str(f), "pt") as h:
        return {k: str(h.get_slice(k).get_dtype()) for k in h.keys()}  # noqa: SIM118


def test_every_written_tensor_has_the_dtype_config_json_names(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One F64 tensor in a bf16 checkpoint used to stay F64 in convert's output while
    config.json said bfloat16. The router bias is fp32 in every GLM checkpoint (transformers
    keeps it so); everything else follows torch_dtype."""

    def stray_dtypes(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.input_layernorm.weight"] = t["model.layers.0.input_layernorm.weight"].double()
        t["model.layers.2.self_attn.q_proj.weight"] = t["model.layers.2.self_attn.q_proj.weight"].half()

    _edit(ckpt, stray_dtypes)
    for argv, folder in (
        (["convert", ckpt, "-o", tmp_path / "c", "--quiet"], tmp_path / "c"),
        (["build", ckpt, "--weights", ckpt, "-o", tmp_path / "b", "--emit", "hf"], tmp_path / "b" / "hf"),
    ):
        code, _, err = run(argv, capsys)
        assert code == 0, err
        assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
        dts = _dtypes(folder / "model.safetensors")
        odd = {k: v for k, v in dts.items() if v != "BF16"}
        assert odd and all(k.endswith("e_score_correction_bias") and v == "F32" for k, v in odd.items()), odd
