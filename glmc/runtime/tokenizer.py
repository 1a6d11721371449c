"""Text <-> token ids for `glmc generate --prompt`: the artifact's own `tokenizer.json` when
it has one (the `tokenizers` package), else a byte-level fallback (id = byte value, so any
model with vocab_size >= 256 can be prompted with text; ids >= 256 decode to nothing).

The training code may carry its own byte tokenizer; keep the two identical (id = byte) if
both exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from glmc.errors import GlmcError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise GlmcError(
                f"the model's vocabulary ({vocab_size}) is smaller than 256 bytes and the artifact has no "
                f"{TOKENIZER_FILE}: pass --prompt-ids instead of --prompt"
            )

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise GlmcError(f"{path} needs the `tokenizers` package: pip install tokenizers") from None
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:
            raise GlmcError(f"{path}: not a readable tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))


def load_tokenizer(folders: list[Path], vocab_size: int) -> Tokenizer:
    """The first tokenizer.json found in `folders`, else the byte-level fallback."""
    for f in folders:
        if (f / TOKENIZER_FILE).is_file():
            return HFTokenizer(f / TOKENIZER_FILE)
    return ByteTokenizer(vocab_size)
