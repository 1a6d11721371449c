"""What a run does with its run folder (`-o`), decided before the model is built.

- No `--resume`: the folder must be missing or empty. A folder that holds anything (an earlier
  run's checkpoints and metrics) is refused: a later `--resume auto` would otherwise continue the
  old run's checkpoints under this run's name. `--force` deletes the folder's contents first,
  but never when the folder is `/`, the home folder, the current folder or one of its ancestors,
  or holds an input (data, tokenizer, spec file).
- `--resume auto`: the latest complete checkpoint in `out/checkpoints`. With none, an empty or
  missing folder starts a fresh run (and says so); a folder that holds files but no checkpoint
  (metrics of a run stopped before its first checkpoint) is refused, so its metrics are never
  overwritten.
- `--resume PATH`: a checkpoint of this folder, or of another run when this folder is empty.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from glmc.errors import GlmcError
from glmc.outdir import check_output_folder
from glmc.train import checkpoint
from glmc.train.config import TrainConfig


@dataclass(frozen=True)
class RunStart:
    resume: Path | None  # the checkpoint to continue from
    clear: bool  # delete the folder's contents first (--force)
    note: str | None  # said on the console (a fresh start under --resume auto)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def inputs(cfg: TrainConfig) -> dict[str, Path]:
    """Paths the run reads (label -> path): a folder that is, holds or lies inside one of them is
    never cleared."""
    paths = {f"training data {p}": Path(p) for p in cfg.data}
    if cfg.tokenizer:
        paths["tokenizer"] = Path(cfg.tokenizer)
    if isinstance(cfg.spec, (str, Path)) and Path(cfg.spec).exists():
        paths["spec file"] = Path(cfg.spec)
    return paths


def check_clearable(folder: Path, reads: dict[str, Path]) -> None:
    """Refuse to delete the contents of a folder that is, or lies above, something that matters:
    glmc.outdir's rules for a folder an output replaces (not `/`, home, the current folder or
    one above it, a symbolic link, nor a folder that is, holds or lies inside an input)."""
    try:
        check_output_folder(folder, inputs=reads, replace=True)
    except GlmcError as e:
        raise GlmcError(f"--force will not delete the contents of the run folder {folder}: {e}") from None


def clear(folder: Path) -> None:
    """Delete the folder's contents (links are removed, never followed)."""
    try:
        for p in sorted(folder.iterdir()):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    except OSError as e:
        raise GlmcError(f"--force: cannot clear the run folder {folder}: {e.strerror or e}") from None


def plan_start(cfg: TrainConfig) -> RunStart:
    folder = cfg.run_dir
    if folder.exists() and not folder.is_dir():
        raise GlmcError(f"the run folder (-o) {folder} is a file")
    names = _entries(folder)
    if cfg.resume is None:
        if not names:
            return RunStart(None, False, None)
        if not cfg.force:
            raise GlmcError(
                f"the run folder {folder} already holds {_listing(names)}: continue that run with "
                "--resume auto, start over with --force (deletes its contents), or choose another -o"
            )
        check_clearable(folder, inputs(cfg))
        return RunStart(None, True, f"--force: deleted the contents of {folder} ({_listing(names)})")
    if cfg.resume == "auto":
        found = checkpoint.latest(folder)
        if found is not None:
            return RunStart(found, False, None)
        if names:
            raise GlmcError(
                f"--resume auto: the run folder {folder} holds {_listing(names)} but no complete "
                "checkpoint under checkpoints/; start over with --force (deletes its contents) or "
                "choose another -o"
            )
        return RunStart(
            None, False, f"--resume auto: no checkpoint in {folder}, starting a fresh run at step 0"
        )
    path = Path(cfg.resume)
    own = (folder / "checkpoints").resolve()
    if names and own not in path.resolve().parents:
        raise GlmcError(
            f"the run folder {folder} already holds {_listing(names)}; resuming there from {path}, a "
            "checkpoint of another folder, would mix two runs: choose an empty -o"
        )
    return RunStart(path, False, None)
