"""Text <-> token ids, shared by training (`glmc train`) and the runtime (`glmc generate`).

Two kinds: a Hugging Face `tokenizer.json` read with the `tokenizers` package, or the built-in
byte-level tokenizer (UTF-8 bytes are ids 0..255, 256 = end of text, 257 = padding), which any
model with vocab_size >= 258 can use without a tokenizer file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from glmc.errors import GlmcError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 = end of text, 257 = padding (never trained on)."""

    name = "bytes"
    vocab_size = 258
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` package."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:  # pragma: no cover - transformers installs it
            raise GlmcError("--tokenizer needs the `tokenizers` package (pip install tokenizers)") from None
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise GlmcError(f"tokenizer file not found: {p}")
        try:
            self._tok = _Tok.from_file(str(p))
        except Exception as e:
            raise GlmcError(f"{p}: not a Hugging Face tokenizer.json ({e})") from None
        self.name = str(p)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = next(
            (self._tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")
             if self._tok.token_to_id(t) is not None),
            None,
        )  # fmt: skip
        self.eos_id = eos if eos is not None else self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def make_tokenizer(path: str | None) -> Tokenizer:
    return ByteTokenizer() if path is None else HFTokenizer(path)


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
    if tok.vocab_size > vocab_size:
        raise GlmcError(
            f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}: "
            "ids past the embedding table cannot be trained; pick a spec with vocab_size >= "
            f"{tok.vocab_size} or a smaller tokenizer"
        )


def load_tokenizer(folders: list[Path], vocab_size: int) -> Tokenizer:
    """The first `tokenizer.json` found in `folders` (an artifact and its parent), else bytes."""
    for f in folders:
        if (f / TOKENIZER_FILE).is_file():
            tok: Tokenizer = HFTokenizer(f / TOKENIZER_FILE)
            break
    else:
        tok = ByteTokenizer()
        if vocab_size < 256:
            raise GlmcError(
                f"the model's vocabulary ({vocab_size}) is smaller than 256 bytes and the artifact has no "
                f"{TOKENIZER_FILE}: pass --prompt-ids instead of --prompt"
            )
        return tok
    check_vocab(tok, vocab_size)
    return tok
