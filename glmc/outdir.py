"""Output folders: where a command may write, how a folder is published, and what is cleaned up.

Every command that writes a folder (`glmc build`, `glmc convert`, `glmc.save_pretrained`, and
anything else that produces a folder a user names) goes through `atomic_folder`:

    with atomic_folder(out, replace=force, inputs={"source checkpoint": src}) as tmp:
        ...  # write everything into tmp
    # here `out` holds it all; after any exception nothing new exists and `out` is untouched

Before any work it checks the destination (`check_output_folder`), removes temporary folders
that killed runs left beside it, and creates its own temporary folder, so an unwritable output
(a file, a path under a file, /proc, a read-only or full filesystem) fails in a second with a
message naming the path instead of after the work. Errors writing the output (a full disk, a
quota) become one-line `GlmcError`s naming the output; the temporary folder is always removed.

Temporary folders are `.{name}.tmp-{pid}-{8 hex}` beside the destination and hold a marker file
with the creating process's pid, host and start time. SIGKILL cannot be caught, so the next run
for the same destination removes such folders whose creator is gone (same host, pid not alive
or alive with another start time), and says so on stderr. SIGTERM and SIGHUP are turned into
an exception by `terminate_raises` (`glmc build` and `glmc convert` run inside it), so the
stack unwinds and the context manager cleans up as it does for Ctrl-C.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

from glmc.errors import GlmcError

PathLike = str | os.PathLike[str]
MARKER = ".glmc-partial.json"  # inside a temporary folder; removed before it is published
# Signals that end a command the way Ctrl-C does (the temporary folder is removed).
TERMINATING = (signal.SIGTERM, signal.SIGHUP)
# errnos that mean "the output cannot be written", whichever file raised them.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class Terminated(SystemExit):
    """SIGTERM/SIGHUP under `terminate_raises`: unwinds the stack like KeyboardInterrupt does
    (so `atomic_folder` removes its temporary folder); exit status 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


@contextmanager
def terminate_raises(signals: tuple[int, ...] = TERMINATING) -> Iterator[None]:
    """Within the block, `signals` raise `Terminated` in the main thread (by default Python
    would die without running `finally` blocks, leaving temporary folders behind); the
    previous handlers are restored afterwards. A no-op outside the main thread, where Python
    cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    except Terminated as e:
        print(f"glmc: terminated by {e.signal_name}", file=sys.stderr)
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_output_folder(
    out: PathLike,
    *,
    inputs: Mapping[str, PathLike | None] | None = None,
    replace: bool = False,
) -> Path:
    """Refuse, with a `GlmcError` naming the path, an output folder that must not or cannot be
    written; return it resolved. Nothing is created. Refused:

    - a symbolic link (publishing replaces the link, not its target: give the real path);
    - an existing file, or a path under a file;
    - `/`, the home folder, the current folder or any folder above it (replacing one would
      delete the working tree, the inputs included);
    - a folder that is, contains or lies inside one of `inputs` (label -> path, e.g.
      {"source checkpoint": src}; None values are skipped), compared after resolving symbolic
      links and by file identity, so a bind mount or a second path to the same folder counts;
    - an existing non-empty folder unless `replace`.
    """
    p = Path(out)
    if not str(out):
        raise GlmcError("the output folder path is empty")
    if p.is_symlink():
        raise GlmcError(
            f"output folder {p} is a symbolic link (to {p.readlink()}); give the folder's real path"
        )
    resolved = p.resolve()
    existing = _existing_ancestor(resolved)
    if existing != resolved and not existing.is_dir():
        raise GlmcError(f"cannot create output folder {p}: {existing} is a file, not a folder")
    if existing == resolved and not resolved.is_dir():
        raise GlmcError(f"output folder {p} exists and is not a folder")
    for what, protected in _protected():
        if _same(resolved, protected):
            raise GlmcError(f"output folder {p} is {what}; refusing to replace it: choose a new folder")
    for label, src in (inputs or {}).items():
        if src is None:
            continue
        s = Path(src).resolve()
        if _same(resolved, s):
            raise GlmcError(f"output folder {p} is the {label} {src}; choose another folder")
        if any(_same(resolved, a) for a in s.parents):
            raise GlmcError(f"output folder {p} contains the {label} {src}; choose a folder outside it")
        if any(_same(a, s) for a in resolved.parents):
            raise GlmcError(f"output folder {p} lies inside the {label} {src}; choose a folder outside it")
    if resolved.is_dir() and not replace and any(resolved.iterdir()):
        raise GlmcError(f"output folder {p} exists and is not empty; pass --force to replace it")
    return resolved


@contextmanager
def atomic_folder(
    dest: PathLike,
    *,
    replace: bool = False,
    inputs: Mapping[str, PathLike | None] | None = None,
    need_bytes: int | None = None,
    note: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; when the block finishes it becomes `dest`
    (an existing `dest` is swapped out by renames, then deleted), when it raises it is removed
    and `dest` is left as it was. `dest` is checked first (`check_output_folder`, with `inputs`
    and `replace`); `need_bytes`, when known, is compared with the free space up front and named
    if the disk fills up anyway. `note` receives one line per stale temporary folder removed
    (default: stderr)."""
    dest = Path(dest)
    check_output_folder(dest, inputs=inputs, replace=replace)
    remove_stale_temporaries(dest, note=note)
    tmp = _make_temporary(dest)
    try:
        if need_bytes is not None:
            _check_space(tmp, dest, need_bytes)
        yield tmp
        with _signals_blocked():
            _publish(tmp, dest, replace)
    except BaseException as e:
        with _signals_blocked():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and _is_output_error(e, tmp, dest):
            raise GlmcError(_write_error_message(e, dest, need_bytes)) from None
        raise


def temporary_name_pattern(dest: PathLike) -> re.Pattern[str]:
    """The names `atomic_folder` gives its temporary folders for `dest` (group 1: the pid)."""
    return re.compile(rf"\.{re.escape(Path(dest).name)}\.tmp-(\d+)-[0-9a-f]{{8}}")


def remove_stale_temporaries(dest: PathLike, note: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the temporary folders of `dest` that processes killed before they could clean up
    (see the module docstring for how a folder is judged abandoned); returns those removed."""
    dest = Path(dest)
    parent = dest.parent
    if not parent.is_dir():
        return []
    say = note or (lambda line: print(line, file=sys.stderr))
    pattern = temporary_name_pattern(dest)
    removed = []
    try:
        siblings = list(parent.iterdir())
    except OSError:
        return []
    for p in siblings:
        if not pattern.fullmatch(p.name) or p.is_symlink() or not p.is_dir():
            continue
        owner = _read_marker(p / MARKER)
        if owner is None or not _abandoned(owner):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
            say(f"glmc: removed {p}, a temporary folder left by an interrupted run (pid {owner['pid']})")
    return removed


# ---- internals ------------------------------------------------------------------------------


def _existing_ancestor(p: Path) -> Path:
    """`p` or its nearest ancestor that exists (`p` itself may lie under a file)."""
    q = p
    while not q.exists() and q != q.parent:
        if q.is_symlink():  # a dangling link: it exists as a name, not as a folder
            return q
        q = q.parent
    return q


def _protected() -> list[tuple[str, Path]]:
    cwd = Path.cwd().resolve()
    out = [("the filesystem root", Path(cwd.anchor)), ("the current folder", cwd)]
    out += [(f"{a}, a folder above the current one", a) for a in cwd.parents]
    with suppress(RuntimeError):  # no HOME and no passwd entry
        out.append(("the home folder", Path.home().resolve()))
    return out


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist (yet): equal paths were the only way
        return False


def _check_space(tmp: Path, dest: Path, need: int) -> None:
    try:
        usage = shutil.disk_usage(tmp)
    except OSError:
        return
    if usage.total and usage.free < need:  # total 0: a pseudo filesystem that reports nothing
        raise GlmcError(
            f"output folder {dest} needs about {_human_bytes(need)} but its filesystem has "
            f"{_human_bytes(usage.free)} free; free some space or choose another folder"
        )


def _make_temporary(dest: Path) -> Path:
    """Create the temporary folder (and dest's parents): the writability check, done first."""
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            tmp = parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                tmp.mkdir(mode=0o700)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent))
        try:
            (tmp / MARKER).write_text(json.dumps(_owner(os.getpid())) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise GlmcError(_write_error_message(e, dest, None)) from None
        raise GlmcError(f"cannot create output folder {dest}: {e.strerror or e}") from None
    return tmp


def _publish(tmp: Path, dest: Path, replace: bool) -> None:
    (tmp / MARKER).unlink()
    _publish_permissions(tmp)
    if not os.path.lexists(dest):
        tmp.rename(dest)
        return
    # Re-checked here: the folder may have changed while the command ran.
    if dest.is_symlink() or not dest.is_dir():
        raise GlmcError(f"output folder {dest} was replaced by a file or link while writing; nothing written")
    if not replace and any(dest.iterdir()):
        raise GlmcError(f"output folder {dest} exists and is not empty; pass --force to replace it")
    # Swap by renames so `dest` is never half-deleted: the old folder moves aside under a
    # temporary name (removed by a later run if this one dies before deleting it).
    old = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    with suppress(OSError):  # lets a later run remove it should this one die mid-delete
        (old / MARKER).write_text(json.dumps(_owner(os.getpid())) + "\n")
    shutil.rmtree(old, ignore_errors=True)


def _publish_permissions(root: Path) -> None:
    """The temporary folder and some writers use owner-only modes; give the result the usual
    umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o100  # keep launch scripts runnable
        p.chmod((0o777 if executable else 0o666) & ~umask)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while renaming or removing, so a second signal cannot stop a
    cleanup half-way; they are delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, *TERMINATING}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _is_output_error(e: OSError, tmp: Path, dest: Path) -> bool:
    if e.errno in _WRITE_ERRNOS:
        return True
    names = [f for f in (e.filename, e.filename2) if isinstance(f, str | os.PathLike)]
    return any(_under(Path(f), tmp) or _under(Path(f), dest) for f in names)


def _under(p: Path, root: Path) -> bool:
    try:
        return p.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _write_error_message(e: OSError, dest: Path, need: int | None) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        needed = f" (it needs about {_human_bytes(need)})" if need else ""
        return f"cannot write output folder {dest}: {what}{needed}; nothing was written"
    return f"cannot write output folder {dest}: {e.strerror or e}; nothing was written"


def _owner(pid: int) -> dict[str, object]:
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)}


def _read_marker(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        return None
    return data


def _abandoned(owner: Mapping[str, object]) -> bool:
    """True when the process that made a temporary folder is certainly gone."""
    if owner.get("host") != socket.gethostname():
        return False  # another machine's run (a shared filesystem): its pids mean nothing here
    pid = owner["pid"]
    assert isinstance(pid, int)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    # Alive: the creator, or a later process that reused its pid (then the start times differ).
    start = owner.get("start")
    return start is not None and _start_time(pid) not in (None, start)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _human_bytes(x: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= div:
            return f"{x / div:.1f} {unit}"
    return f"{int(x)} B"
