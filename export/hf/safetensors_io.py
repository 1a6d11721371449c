"""glmc's one safetensors stack: Hugging Face checkpoints (a single file, or shards with an
index) read and written with bounded memory.

- Only safetensors are read: pickle-based `.bin`/`.pt` files can run code when loaded, so they
  are refused with a message rather than opened. Every file's framing (header length, JSON,
  dtypes, shapes against data offsets, file size) is validated by safetensors' own parser on
  open, before any tensor is read, and an index may name only plain files beside it.
- Reading is lazy (headers on open, data on access) and uses positioned reads (`preadv`) into
  fresh buffers instead of memory maps: pages of a mapped file count toward the process's
  resident set for as long as the map is open, so a converter that maps a 700 GB checkpoint
  "uses" 700 GB. Element ranges of a tensor can be read on their own (one expert of a stacked
  tensor, a row slice), since rows are contiguous on disk.
- Writing streams one shard at a time into temporary files renamed at the end: with a plan
  (`StreamingWriter`) every shard's header is known up front and each tensor's bytes go to disk
  as it is produced; without one (`write_checkpoint`) a shard's tensors are held until it is
  full. Both split shards by the same rule and write the same bytes: u64 little-endian header
  length, a JSON header padded with spaces to 8 bytes, the tensors back to back in header order,
  and `model.safetensors.index.json` when there are several shards.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from glmc.ir import CheckpointError, DType

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PARTIAL_SUFFIX = ".partial"

# Views of glmc.ir.DType, the one dtype table: IR dtype / safetensors name -> torch dtype.
TORCH_DTYPES: dict[DType, torch.dtype] = {d: getattr(torch, d.torch_name) for d in DType}
ST_TORCH: dict[str, torch.dtype] = {d.safetensors: t for d, t in TORCH_DTYPES.items()}
TORCH_ST: dict[torch.dtype, str] = {t: s for s, t in ST_TORCH.items()}


def shard_name(i: int, n: int) -> str:
    """transformers' shard naming: model-00001-of-00003.safetensors (1-based)."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


# ---- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    begin: int  # byte offset of the tensor's data in `file`


class SafetensorsCheckpoint:
    """A lazy name -> tensor mapping over one or more safetensors files.

    `keys()` lists every tensor (index order when sharded); `ckpt[name]` reads one tensor and
    `read_range(name, start, stop)` a flat element range of it; `meta(name)` gives (shape,
    safetensors dtype) and `file_of(name)` its file, without reading data. Use as a context
    manager (or call `close()`) to close the files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open a checkpoint folder (`model.safetensors`, or the shards listed in
        `model.safetensors.index.json`), or a single `.safetensors` file. Reads headers only."""
        self.root, self._entries = _locate(Path(path))
        self._fds: dict[Path, int] = {}

    def describe(self) -> str:
        return str(self.root)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(e.file for e in self._entries.values()))

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def file_of(self, name: str) -> str:
        return str(self._entries[name].file)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        e = self._entries[name]
        return e.shape, e.dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self._entries[name].shape
        n = 1
        for d in shape:
            n *= d
        return self.read_range(name, 0, n).view(shape)

    def read_range(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of tensor `name` in C order, as a 1-D tensor; with `out` (a
        contiguous 1-D tensor of the stored dtype) the bytes land there without a copy."""
        e = self._entries[name]
        d = DType.from_safetensors(e.dtype)
        if d is None:
            raise CheckpointError(f"{name} in {e.file} has dtype {e.dtype}, which glmc does not read")
        dtype = TORCH_DTYPES[d]
        begin = e.begin + start * d.itemsize
        nbytes = (stop - start) * d.itemsize
        if nbytes == 0:
            return torch.empty(0, dtype=dtype) if out is None else out
        if out is not None:
            if out.dtype != dtype or out.numel() != stop - start or not out.is_contiguous():
                raise ValueError(f"read_range({name}): out must be contiguous {e.dtype}[{stop - start}]")
            view = out.view(torch.uint8).numpy().data.cast("B")
        else:
            buf = bytearray(nbytes)
            view = memoryview(buf)
        fd = self._fd(e.file)
        done = 0
        while done < nbytes:
            try:
                got = os.preadv(fd, [view[done:]], begin + done)
            except OSError as err:
                raise CheckpointError(f"cannot read tensor {name} from {e.file}: {err}") from None
            if got <= 0:
                raise CheckpointError(f"{e.file} ends inside tensor {name} (truncated file)")
            done += got
        return out if out is not None else torch.frombuffer(buf, dtype=dtype)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise CheckpointError(f"cannot read safetensors file {path}: {err}") from None
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# The name `glmc convert` reads checkpoints by: positioned reads are what every reader does now.
StreamingCheckpoint = SafetensorsCheckpoint


def open_checkpoint(path: str | os.PathLike[str]) -> SafetensorsCheckpoint:
    """Open a checkpoint folder (`model.safetensors`, or shards listed in
    `model.safetensors.index.json`), or a single `.safetensors` file. Reads headers only."""
    return SafetensorsCheckpoint(path)


def _locate(p: Path) -> tuple[Path, dict[str, _Entry]]:
    """The checkpoint's root folder and where each tensor lies, validated."""
    if p.is_file():
        return _open_file(p)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    # transformers' order of preference: a single file wins over an index.
    if (p / SINGLE_FILE).is_file():
        return _open_files(p, [p / SINGLE_FILE])
    if (p / INDEX_FILE).is_file():
        return _open_index(p / INDEX_FILE)
    _refuse_other_formats(p)
    stray = sorted(f.name for f in p.glob("*.safetensors"))
    if stray:
        raise CheckpointError(
            f"{p} has safetensors files ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}) but neither "
            f"{SINGLE_FILE} nor {INDEX_FILE}; serving stacks load only indexed shards, so write the index"
        )
    raise CheckpointError(f"no safetensors checkpoint in {p}: expected {SINGLE_FILE} or {INDEX_FILE}")


def _open_file(p: Path) -> tuple[Path, dict[str, _Entry]]:
    if p.name.endswith(".index.json"):
        return _open_index(p)
    if p.suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_message(p, [p.name]))
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p} is not a safetensors file or a checkpoint folder")
    return _open_files(p, [p])


def _refuse_other_formats(folder: Path) -> None:
    pickled = sorted(f.name for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(_pickle_message(folder, pickled))


def _pickle_message(where: Path, names: list[str]) -> str:
    return (
        f"{where}: only safetensors checkpoints are read, found {', '.join(names[:3])}"
        f"{' ...' if len(names) > 3 else ''}; pickle-based .bin/.pt files can run arbitrary code when loaded, "
        "so convert them to safetensors first (for example with transformers' save_pretrained)"
    )


def _open_files(root: Path, files: list[Path]) -> tuple[Path, dict[str, _Entry]]:
    entries: dict[str, _Entry] = {}
    for f in files:
        for name, e in _read_header(f).items():
            if name in entries:
                raise CheckpointError(f"tensor {name} is in both {entries[name].file} and {f}")
            entries[name] = e
    return root, entries


def _open_index(index: Path) -> tuple[Path, dict[str, _Entry]]:
    folder = index.parent
    weight_map = _read_weight_map(index)
    headers: dict[str, dict[str, _Entry]] = {}
    for fname in dict.fromkeys(weight_map.values()):
        f = folder / fname
        if Path(fname).name != fname:
            raise CheckpointError(
                f"{index} names {fname!r}; shard names must be plain file names in {folder}"
            )
        if not f.is_file():
            n = sum(1 for v in weight_map.values() if v == fname)
            raise CheckpointError(f"{index} lists {n} tensor(s) in {fname}, but {f} does not exist")
        headers[fname] = _read_header(f)
    entries: dict[str, _Entry] = {}
    for name, fname in weight_map.items():
        if name not in headers[fname]:
            raise CheckpointError(
                f"{index} puts tensor {name} in {fname}, but {folder / fname} does not contain it"
            )
        entries[name] = headers[fname][name]
    return folder, entries


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {index}: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index} has no weight_map object mapping tensor names to shard file names")
    return weight_map


def _read_header(f: Path) -> dict[str, _Entry]:
    """Tensor name -> where it lies, from a safetensors header. safetensors' parser validates
    the file's framing first (header size, JSON, dtypes, every tensor's byte range against its
    shape and the file size); only then is the header read again for the data offsets."""
    try:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            names = list(h.keys())
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        return {
            name: _Entry(
                f,
                tuple(int(d) for d in header[name]["shape"]),
                str(header[name]["dtype"]),
                8 + n + int(header[name]["data_offsets"][0]),
            )
            for name in names
        }
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"cannot read safetensors file {f}: {e}") from None


# ---- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """A tensor a writer will receive: its name, shape and safetensors dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        d = DType.from_safetensors(self.dtype)
        if d is None:
            raise ValueError(f"{self.name}: safetensors dtype {self.dtype} is not one glmc writes")
        n = d.itemsize
        for s in self.shape:
            n *= s
        return n


def _starts_shard(shard_bytes: int, shard_tensors: int, nbytes: int, max_bytes: int) -> bool:
    """Whether a tensor of `nbytes` opens a new shard: shards hold at most `max_bytes`, except
    that a larger tensor gets a shard of its own."""
    return shard_tensors > 0 and shard_bytes + nbytes > max_bytes


class _Shards:
    """The files of one checkpoint being written, one shard at a time, under temporary names:
    `finish` renames them (`model.safetensors`, or `model-0000i-of-0000n.safetensors` plus the
    index), so a failure leaves any earlier checkpoint in `out` untouched, and a success
    replaces it (stale shards and index of an earlier write are removed)."""

    def __init__(self, out: Path, metadata: Mapping[str, str] | None) -> None:
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"cannot write a checkpoint to {out}: it exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.metadata = dict(metadata) if metadata is not None else {"format": "pt"}
        self.partials: list[Path] = []
        self.weight_map: dict[str, int] = {}  # tensor name -> 0-based shard index
        self.total_bytes = 0
        self.handle: BinaryIO | None = None

    def open(self, planned: list[Planned]) -> BinaryIO:
        """Start the next shard, holding `planned` in this order; returns its file."""
        self.close()
        path = self.out / f".model-{len(self.partials) + 1:05d}.safetensors{_PARTIAL_SUFFIX}"
        self.partials.append(path)
        self.handle = path.open("wb")
        self.handle.write(
            encode_header(((p.name, p.dtype, p.shape, p.nbytes) for p in planned), self.metadata)
        )
        for p in planned:
            self.weight_map[p.name] = len(self.partials) - 1
            self.total_bytes += p.nbytes
        return self.handle

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def finish(self) -> list[Path]:
        self.close()
        n = len(self.partials)
        finals = [self.out / (SINGLE_FILE if n == 1 else shard_name(i + 1, n)) for i in range(n)]
        _remove_stale(self.out, keep=finals)
        for part, final in zip(self.partials, finals, strict=True):
            part.replace(final)
        self.partials = []
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: finals[i].name for name, i in self.weight_map.items()},
            }
            tmp = self.out / f".{INDEX_FILE}{_PARTIAL_SUFFIX}"
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            tmp.replace(self.out / INDEX_FILE)
        return finals

    def discard(self) -> None:
        self.close()
        for part in self.partials:
            part.unlink(missing_ok=True)
        self.partials = []


def write_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write `(name, tensor)` pairs as a Hugging Face safetensors checkpoint; return the shard paths.

    Tensors are grouped in stream order into shards of at most `max_shard_bytes` (a larger tensor
    gets a shard of its own). One shard is written as `model.safetensors`; several as
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`. Only one shard's
    tensors are held at a time. A failure leaves any earlier checkpoint in `out_dir` untouched;
    a success replaces it. `metadata` defaults to {"format": "pt"}, which transformers requires."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards = _Shards(Path(out_dir), metadata)
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        f = shards.open([Planned(n, tuple(t.shape), _st_dtype(n, t)) for n, t in pending.items()])
        for t in pending.values():
            if t.numel():
                f.write(tensor_bytes(t))

    try:
        for name, tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
            if name in shards.weight_map or name in pending:
                raise ValueError(f"tensor {name} appears twice in the stream")
            nbytes = tensor.numel() * tensor.element_size()
            if _starts_shard(pending_bytes, len(pending), nbytes, max_shard_bytes):
                flush()
                pending, pending_bytes = {}, 0
            pending[name] = _own_memory(tensor.detach(), pending.values())
            pending_bytes += nbytes
        if pending or not shards.partials:  # an empty stream is one shard without tensors
            flush()
        return [str(f) for f in shards.finish()]
    except BaseException:
        shards.discard()
        raise


class StreamingWriter:
    """Writes a planned list of tensors, in order, into safetensors shards of at most
    `max_shard_bytes` (one larger tensor gets a shard of its own) under `out_dir`, plus
    `model.safetensors.index.json` when there are several. Every shard's header is known from
    the plan, so each tensor goes to disk as it is written: nothing waits for its shard to
    fill. Call `write` once per planned tensor, in plan order, then `finish` (or `abort`)."""

    def __init__(
        self, out_dir: Path, plan: list[Planned], max_shard_bytes: int, metadata: dict[str, str] | None = None
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        seen: set[str] = set()
        for p in plan:
            if p.name in seen:
                raise ValueError(f"tensor {p.name} is planned twice")
            seen.add(p.name)
        self.shards: list[list[Planned]] = [[]]
        size = 0
        for p in plan:
            if _starts_shard(size, len(self.shards[-1]), p.nbytes, max_shard_bytes):
                self.shards.append([])
                size = 0
            self.shards[-1].append(p)
            size += p.nbytes
        self._files = _Shards(Path(out_dir), metadata)
        self._queue = [(i, p) for i, shard in enumerate(self.shards) for p in shard]
        self._next = 0
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
        while len(self._files.partials) <= shard:  # a shard's header goes out with its first tensor
            self._files.open(self.shards[len(self._files.partials)])
        assert self._files.handle is not None
        return self._files.handle

    def finish(self) -> list[Path]:
        if self._next != len(self._queue):
            missing = self._queue[self._next][1].name
            raise ValueError(
                f"{len(self._queue) - self._next} planned tensor(s) not written, first {missing}"
            )
        if len(self._files.partials) < len(self.shards):
            self._shard_file(len(self.shards) - 1)  # a planned shard with no tensors (an empty checkpoint)
        return self._files.finish()

    def abort(self) -> None:
        """Remove what an unfinished write left (nothing after `finish`)."""
        self._files.discard()


def _st_dtype(name: str, t: torch.Tensor) -> str:
    if t.dtype not in TORCH_ST:
        raise ValueError(f"{name}: safetensors has no dtype for {t.dtype}")
    return TORCH_ST[t.dtype]


def _own_memory(t: torch.Tensor, others: Iterable[torch.Tensor]) -> torch.Tensor:
    """`t`, copied if it overlaps a tensor already in the shard (safetensors refuses aliasing;
    disjoint views of one storage, such as per-expert slices, are fine as they are)."""
    t = t.contiguous()
    if t.numel() == 0:
        return t
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    for o in others:
        if (
            o.device == t.device
            and o.numel()
            and o.data_ptr() < end
            and start < o.data_ptr() + o.numel() * o.element_size()
        ):
            return t.clone()
    return t


def _remove_stale(out: Path, keep: list[Path]) -> None:
    """Delete checkpoint files of an earlier write that the new one does not replace, so a reader
    never sees a stale `model.safetensors` beside a fresh index (or the reverse)."""
    keep_names = {f.name for f in keep}
    stale = [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]
    for f in stale:
        if f.name not in keep_names and f.is_file():
            f.unlink()


# ---- the file format ----------------------------------------------------------------------------


def encode_header(
    entries: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: Mapping[str, str]
) -> bytes:
    """The safetensors header for tensors stored back to back in `entries` order, each given as
    (name, safetensors dtype, shape, bytes): u64 little-endian length, then JSON padded with
    spaces to a multiple of 8 bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` as one safetensors file (what `safetensors.torch.save_file` writes), with
    Python's file I/O: a full disk or an unwritable path raises `OSError` with its errno, where
    safetensors' writer raises a `SafetensorError` carrying the cause only as text. Each
    tensor's bytes are written from its own memory; nothing is copied but non-contiguous views."""
    meta = dict(metadata) if metadata is not None else {"format": "pt"}
    entries = [
        (name, _st_dtype(name, t), tuple(t.shape), t.numel() * t.element_size())
        for name, t in tensors.items()
    ]
    with Path(path).open("wb") as f:
        f.write(encode_header(entries, meta))
        for t in tensors.values():
            if t.numel():
                f.write(tensor_bytes(t))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as bytes (little-endian, as safetensors stores them), C order."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data
