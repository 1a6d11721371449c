"""Training data: local text files -> token ids -> packed sequences -> a deterministic sampler.

Documents are concatenated, each followed by the end-of-text token, and cut into windows of
seq_len + 1 tokens (input = window[:-1], labels = window[1:]); no padding, no loss masking
(GLM-4.5's pre-training packs without best-fit, §1.2). The sampler is a pure function of
(seed, step, rank): a seeded permutation per epoch, the global batch at step s is the s-th slice
of it, and data-parallel rank r takes the r-th part. Resuming needs only the step number, and
one process with the global batch sees exactly what dp processes see together.
"""

from __future__ import annotations

import fnmatch
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from glmc.errors import GlmcError
from glmc.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, check_vocab, make_tokenizer


def list_files(
    paths: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...], skip: tuple[Path, ...] = ()
) -> list[Path]:
    """Files named directly, plus files under folders whose name matches an `include` glob,
    skipping hidden and __pycache__ folders, any path component matching an `exclude` glob and
    the folders in `skip` (the run folder, whose metrics and checkpoints grow as it trains).
    Sorted, so every rank (and every rerun) reads the same corpus in the same order."""
    if not paths:
        raise GlmcError("no training data given (--data PATH, a text file or a folder)")
    skipped = {q.resolve() for q in skip}
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(
                    d for d in dirs
                    if not d.startswith(".") and d != "__pycache__"
                    and not any(fnmatch.fnmatch(d, x) for x in exclude)
                    and (Path(root) / d).resolve() not in skipped
                )  # fmt: skip
                for n in sorted(names):
                    if any(fnmatch.fnmatch(n, g) for g in include) and not any(
                        fnmatch.fnmatch(n, x) for x in exclude
                    ):
                        files.append(Path(root) / n)
        else:
            raise GlmcError(f"training data not found: {p}")
    if not files:
        raise GlmcError(f"no files matching {', '.join(include)} under {', '.join(paths)}")
    return files


def load_tokens(files: list[Path], tok: Tokenizer, max_bytes: int | None = None) -> Tensor:
    """All documents as one int32 stream, each followed by the end-of-text id."""
    parts: list[Tensor] = []
    eos = torch.tensor([tok.eos_id], dtype=torch.int32)
    used = 0
    for f in files:
        data = f.read_bytes()
        if b"\0" in data[:1024]:  # binary file inside a text folder
            continue
        if max_bytes is not None:
            data = data[: max(0, max_bytes - used)]
        if not data:
            break
        used += len(data)
        if isinstance(tok, ByteTokenizer):
            ids = tok.encode_bytes(data)
        else:
            ids = torch.tensor(tok.encode(data.decode("utf-8", errors="replace")), dtype=torch.int32)
        parts += [ids, eos]
    if not parts:
        raise GlmcError(f"the training files ({len(files)}) hold no text")
    return torch.cat(parts)


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@dataclass(frozen=True)
class PackedData:
    """Windows of seq_len + 1 tokens [N, seq_len + 1] and the sampler over them."""

    windows: Tensor
    seed: int

    @staticmethod
    def pack(tokens: Tensor, seq_len: int, seed: int) -> PackedData:
        n = tokens.numel() // (seq_len + 1)
        return PackedData(tokens[: n * (seq_len + 1)].view(n, seq_len + 1), seed)

    @property
    def num_sequences(self) -> int:
        return self.windows.shape[0]

    def check(self, global_batch: int) -> None:
        if self.num_sequences < global_batch:
            raise GlmcError(
                f"the corpus packs into {self.num_sequences} sequences of {self.windows.shape[1]} tokens, "
                f"fewer than one global batch ({global_batch}); add data or lower --batch-size / --seq-len"
            )

    def batch(self, step: int, global_batch: int, dp_rank: int, dp: int) -> tuple[Tensor, Tensor]:
        """(input_ids, labels) [global_batch / dp, seq_len] int64 for `step` on `dp_rank`."""
        per_epoch = self.num_sequences // global_batch  # the remainder of each epoch is dropped
        epoch, i = divmod(step, per_epoch)
        perm = _permutation(self.seed, epoch, self.num_sequences)
        local = global_batch // dp
        start = i * global_batch + dp_rank * local
        w = self.windows[perm[start : start + local]].long()
        return w[:, :-1], w[:, 1:]


__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "PackedData",
    "Tokenizer",
    "check_vocab",
    "list_files",
    "load_tokens",
    "make_tokenizer",
]
