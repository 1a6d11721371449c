"""Sidecar files: what a model folder carries besides its weights and config.json, so that a
folder glmc writes from a checkpoint can be served as it is (tokenizer, chat template,
generation defaults, license).

Which files: those transformers' `save_pretrained` writes for a tokenizer
(`tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`, `tokenizer.json`,
the slow tokenizers' vocabulary files, `chat_template.jinja`, the legacy `chat_template.json`
and `additional_chat_templates/*.jinja`) and for a generation config (`generation_config.json`),
plus the license files a model repository ships with its weights. An allow-list by name, so
nothing else in the folder is ever opened. Never copied: weights, pickles (`*.bin`, `*.pt`,
`*.pth`), `config.json` (glmc writes its own), Python files (remote code runs on load), and the
source's README (it describes the source checkpoint, not the converted one).

An allow-listed name that is not a plain, reasonably sized file inside the folder is refused
before any work (GlmcError naming the file, exit 2): a symbolic link leaving the folder (except
the Hugging Face cache's `snapshots/REV/NAME -> ../../blobs/HASH`), a fifo, a device, a folder,
or a file over `MAX_SIDECAR_BYTES`. Refused rather than skipped because the file is there to be
served: a converted folder silently missing its tokenizer is the failure this module exists
to prevent, and the user can fix or remove the file in a second. Files are read through a
descriptor opened without following links and checked again (`fstat`), so a file swapped
after the scan cannot smuggle in a link, a fifo or a larger file. Nothing is parsed: the
copies are byte-identical.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from glmc.ir import GlmcError

# transformers' tokenizer files (tokenization_utils_base: TOKENIZER_CONFIG_FILE,
# SPECIAL_TOKENS_MAP_FILE, ADDED_TOKENS_FILE, FULL_TOKENIZER_FILE, utils/hub: CHAT_TEMPLATE_FILE,
# LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE) and the vocabulary files of its common slow tokenizers.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
VOCABULARY_FILES = ("vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
GENERATION_FILES = ("generation_config.json",)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt", "NOTICE.md")
SIDECAR_FILES = (*TOKENIZER_FILES, *VOCABULARY_FILES, *GENERATION_FILES, *LICENSE_FILES)
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # transformers' CHAT_TEMPLATE_DIR: NAME.jinja files
MAX_TEMPLATES = 64
# Far above any real tokenizer (GLM-4.5's tokenizer.json is about 20 MB, Gemma 3's about 33 MB),
# far below what would make a copy a surprise.
MAX_SIDECAR_BYTES = 128 * 2**20


@dataclass(frozen=True)
class Sidecar:
    """One file to carry: its name in the output (`additional_chat_templates/x.jinja` for a
    template) and the real path it is read from (links resolved and checked)."""

    name: str
    path: Path
    size: int


def find_sidecars(folder: str | os.PathLike[str]) -> tuple[Sidecar, ...]:
    """The sidecar files of model folder `folder`, checked (see the module docstring); raises
    GlmcError naming an allow-listed file that cannot be carried."""
    root = Path(folder)
    roots = _allowed_roots(root)
    found: list[Sidecar] = []
    for name in SIDECAR_FILES:
        p = root / name
        if os.path.lexists(p):
            found.append(_checked(name, p, roots))
    d = root / CHAT_TEMPLATE_DIR
    if os.path.lexists(d):
        real = _inside(d, roots)
        if not real.is_dir():
            raise GlmcError(f"{d}: expected a folder of chat templates; remove it or make it one")
        entries = sorted(e for e in real.iterdir() if e.name.endswith(".jinja"))
        if len(entries) > MAX_TEMPLATES:
            raise GlmcError(f"{d} holds {len(entries)} chat templates; glmc carries at most {MAX_TEMPLATES}")
        found += [_checked(f"{CHAT_TEMPLATE_DIR}/{e.name}", d / e.name, roots) for e in entries]
    return tuple(found)


def copy_sidecars(
    files: Iterable[Sidecar], folders: Iterable[Path], only: Iterable[str] | None = None
) -> list[str]:
    """Copy `files` (those named in `only`, when given) byte for byte into each of `folders`
    (existing folders of an output being written); returns the names copied."""
    wanted = None if only is None else set(only)
    chosen = [f for f in files if wanted is None or f.name in wanted]
    dests = list(folders)
    for f in chosen:
        data = _read(f)
        for dest in dests:
            target = dest / f.name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(data)
    return [f.name for f in chosen]


# ---- checks ---------------------------------------------------------------------------------


def _allowed_roots(root: Path) -> list[Path]:
    """Where a sidecar may really live: the folder itself, and for a Hugging Face cache snapshot
    (`.../snapshots/REV`) the cache's `blobs` folder its files link to."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def _inside(p: Path, roots: list[Path]) -> Path:
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link or a link loop
        raise GlmcError(
            f"{p}: a symbolic link to nothing readable; remove it or replace it with the file"
        ) from None
    if not any(real.is_relative_to(r) for r in roots):
        raise GlmcError(
            f"{p}: a symbolic link out of the checkpoint folder (to {real}); glmc copies this file into the "
            "output, so give the file itself"
        )
    return real


def _checked(name: str, p: Path, roots: list[Path]) -> Sidecar:
    real = _inside(p, roots)
    st = real.stat()
    if not stat.S_ISREG(st.st_mode):
        raise GlmcError(
            f"{p}: not a regular file ({_kind(st.st_mode)}); glmc copies {name} into the output: remove it "
            "or replace it with the file"
        )
    if st.st_size > MAX_SIDECAR_BYTES:
        raise GlmcError(
            f"{p}: {st.st_size:,} bytes, over the {MAX_SIDECAR_BYTES:,} glmc copies for a tokenizer or "
            "generation file; remove it or replace it with the real file"
        )
    return Sidecar(name, real, st.st_size)


def _read(f: Sidecar) -> bytes:
    """The bytes of `f`, re-checked on the open descriptor (the file may have changed since the
    scan): still a regular file, not a link, within the size limit."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(f.path, flags)
    except OSError as e:
        raise GlmcError(f"{f.path}: cannot read {f.name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIDECAR_BYTES:
            raise GlmcError(
                f"{f.path}: changed into {_kind(st.st_mode)} of {st.st_size:,} bytes while glmc ran"
            )
        data = fh.read(MAX_SIDECAR_BYTES + 1)
    if len(data) > MAX_SIDECAR_BYTES:
        raise GlmcError(f"{f.path}: grew over {MAX_SIDECAR_BYTES:,} bytes while glmc ran")
    return data


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISREG, "a file"),
    ):
        if test(mode):
            return what
    return "not a file"
