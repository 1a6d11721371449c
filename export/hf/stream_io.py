"""Bounded-memory safetensors I/O for checkpoint conversion.

Reading uses positioned reads (`preadv`) into fresh buffers instead of memory maps: pages of a
mapped file count toward the process's resident set for as long as the map is open, so a
converter that maps a 700 GB checkpoint "uses" 700 GB. Element ranges of a tensor can be read
on their own (one expert of a stacked tensor, a row slice), since rows are contiguous on disk.

Writing computes every shard's header up front from the planned (name, shape, dtype) list, then
streams each tensor's bytes as it is produced, so nothing waits in memory for its shard to fill
(`safetensors.save_file` needs the whole shard as a dict). The byte layout is the safetensors
format: u64 little-endian header length, a JSON header padded with spaces to 8 bytes, then the
tensors back to back in header order.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from glmc.ir import CheckpointError, DType

from .safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    ST_TORCH,
    TORCH_ST,
    SafetensorsCheckpoint,
    encode_header,
    open_checkpoint,
    shard_name,
    tensor_bytes,
)

ITEMSIZE = {d.safetensors: d.itemsize for d in DType}


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


class StreamingCheckpoint:
    """A checkpoint folder (single file or indexed shards) read tensor by tensor with `preadv`.

    Same interface as `SafetensorsCheckpoint` (`keys`, `meta`, `file_of`, `describe`, `[name]`)
    plus `read_range(name, start, stop)` for a flat element range."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._index: SafetensorsCheckpoint = open_checkpoint(path)  # validates files and index
        self._index.close()
        self._files: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._fds: dict[Path, int] = {}

    def describe(self) -> str:
        return self._index.describe()

    def keys(self) -> list[str]:
        return self._index.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self._index.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def file_of(self, name: str) -> str:
        return self._index.file_of(name)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        return self._index.meta(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, _ = self.meta(name)
        n = 1
        for d in shape:
            n *= d
        return self.read_range(name, 0, n).view(shape)

    def read_range(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of tensor `name` in C order, as a 1-D tensor; with `out` (a
        contiguous 1-D tensor of the stored dtype) the bytes land there without a copy."""
        path = Path(self._index.file_of(name))
        data_start, header = self._file(path)
        entry = header[name]
        dtype = entry["dtype"]
        if dtype not in ST_TORCH:
            raise CheckpointError(f"{name} in {path} has dtype {dtype}, which glmc does not read")
        item = ITEMSIZE[dtype]
        begin = data_start + entry["data_offsets"][0] + start * item
        nbytes = (stop - start) * item
        if nbytes == 0:
            return torch.empty(0, dtype=ST_TORCH[dtype]) if out is None else out
        if out is not None:
            if out.dtype != ST_TORCH[dtype] or out.numel() != stop - start or not out.is_contiguous():
                raise ValueError(f"read_range({name}): out must be contiguous {dtype}[{stop - start}]")
            view = out.view(torch.uint8).numpy().data.cast("B")
        else:
            buf = bytearray(nbytes)
            view = memoryview(buf)
        fd = self._fd(path)
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"{path} ends inside tensor {name} (truncated file)")
            done += got
        return out if out is not None else torch.frombuffer(buf, dtype=ST_TORCH[dtype])

    def _file(self, path: Path) -> tuple[int, dict[str, Any]]:
        if path not in self._files:
            try:
                self._files[path] = _header(path)
            except (OSError, ValueError, struct.error) as e:
                raise CheckpointError(f"cannot read safetensors header of {path}: {e}") from None
        return self._files[path]

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> StreamingCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Planned:
    """A tensor the writer will receive: its name, shape and safetensors dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


class StreamingWriter:
    """Writes a planned list of tensors, in order, into safetensors shards of at most
    `max_shard_bytes` (one larger tensor gets a shard of its own) under `out_dir`, plus
    `model.safetensors.index.json` when there are several. Call `write` once per planned tensor,
    in plan order, then `finish`."""

    def __init__(
        self, out_dir: Path, plan: list[Planned], max_shard_bytes: int, metadata: dict[str, str] | None = None
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata if metadata is not None else {"format": "pt"}
        seen: set[str] = set()
        for p in plan:
            if p.name in seen:
                raise ValueError(f"tensor {p.name} is planned twice")
            seen.add(p.name)
        self.shards: list[list[Planned]] = []
        size = 0
        for p in plan:
            if not self.shards or (self.shards[-1] and size + p.nbytes > max_shard_bytes):
                self.shards.append([])
                size = 0
            self.shards[-1].append(p)
            size += p.nbytes
        if not self.shards:
            self.shards.append([])
        n = len(self.shards)
        self.files = [self.out / (SINGLE_FILE if n == 1 else shard_name(i + 1, n)) for i in range(n)]
        self._queue = [(i, p) for i, shard in enumerate(self.shards) for p in shard]
        self._next = 0
        self._handle: BinaryIO | None = None
        self._open_shard = -1
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"tensor {name} was not planned (all planned tensors are written)")
        shard, want = self._queue[self._next]
        if name != want.name:
            raise ValueError(f"expected tensor {want.name} next, got {name}")
        got_dtype = TORCH_ST.get(tensor.dtype, str(tensor.dtype))
        if tuple(tensor.shape) != want.shape or got_dtype != want.dtype:
            raise ValueError(
                f"{name}: planned {want.dtype}{list(want.shape)}, got {got_dtype}{list(tensor.shape)}"
            )
        f = self._shard_file(shard)
        if tensor.numel():
            f.write(tensor_bytes(tensor))
        self.bytes_written += want.nbytes
        self._next += 1

    def _shard_file(self, shard: int) -> BinaryIO:
        if shard != self._open_shard:
            if self._handle is not None:
                self._handle.close()
            self._handle = self.files[shard].open("wb")
            self._handle.write(_encode_header(self.shards[shard], self.metadata))
            self._open_shard = shard
        assert self._handle is not None
        return self._handle

    def finish(self) -> list[Path]:
        if self._next != len(self._queue):
            missing = self._queue[self._next][1].name
            raise ValueError(
                f"{len(self._queue) - self._next} planned tensor(s) not written, first {missing}"
            )
        for i in range(len(self.shards)):
            if i != self._open_shard and not self.files[i].exists():
                self._shard_file(i)  # a planned shard with no tensors (an empty checkpoint)
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(p.nbytes for s in self.shards for p in s)},
                "weight_map": {p.name: self.files[i].name for i, s in enumerate(self.shards) for p in s},
            }
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _encode_header(tensors: list[Planned], metadata: dict[str, str]) -> bytes:
    return encode_header(((p.name, p.dtype, p.shape, p.nbytes) for p in tensors), metadata)
