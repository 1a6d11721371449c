"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index).

Only safetensors are read: pickle-based `.bin`/`.pt` files can run code when loaded, so they are
refused with a message rather than opened. Reading is lazy (headers on open, tensor data on
access); writing streams, holding at most one shard's tensors at a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

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


class SafetensorsCheckpoint:
    """A lazy name -> tensor mapping over one or more safetensors files.

    `keys()` lists every tensor (index order when sharded); `ckpt[name]` reads one tensor;
    `meta(name)` gives (shape, safetensors dtype) and `file_of(name)` its file, without reading data.
    Use as a context manager (or call `close()`) to release the memory maps."""

    def __init__(
        self, root: Path, locations: dict[str, Path], meta: dict[str, tuple[tuple[int, ...], str]]
    ) -> None:
        self.root = root
        self._locations = locations
        self._meta = meta
        self._handles: dict[Path, Any] = {}

    def describe(self) -> str:
        return str(self.root)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(self._locations.values()))

    def keys(self) -> list[str]:
        return list(self._locations)

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)

    def __contains__(self, name: object) -> bool:
        return name in self._locations

    def file_of(self, name: str) -> str:
        return str(self._locations[name])

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        return self._meta[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._locations[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            tensor: torch.Tensor = self._handles[path].get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from None
        return tensor

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike[str]) -> SafetensorsCheckpoint:
    """Open a checkpoint folder (`model.safetensors`, or shards listed in
    `model.safetensors.index.json`), or a single `.safetensors` file. Reads headers only."""
    p = Path(path)
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


def _open_file(p: Path) -> SafetensorsCheckpoint:
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


def _open_files(root: Path, files: list[Path]) -> SafetensorsCheckpoint:
    locations: dict[str, Path] = {}
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        for name, m in _read_header(f).items():
            if name in locations:
                raise CheckpointError(f"tensor {name} is in both {locations[name]} and {f}")
            locations[name], meta[name] = f, m
    return SafetensorsCheckpoint(root, locations, meta)


def _open_index(index: Path) -> SafetensorsCheckpoint:
    folder = index.parent
    weight_map = _read_weight_map(index)
    headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
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
    locations: dict[str, Path] = {}
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, fname in weight_map.items():
        if name not in headers[fname]:
            raise CheckpointError(
                f"{index} puts tensor {name} in {fname}, but {folder / fname} does not contain it"
            )
        locations[name], meta[name] = folder / fname, headers[fname][name]
    return SafetensorsCheckpoint(folder, locations, meta)


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


def _read_header(f: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a safetensors header; validates the file's framing."""
    try:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            out = {}
            for name in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                s = h.get_slice(name)
                out[name] = (tuple(int(d) for d in s.get_shape()), str(s.get_dtype()))
            return out
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read safetensors file {f}: {e}") from None


# ---- writing ----------------------------------------------------------------------------------


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
    tensors are held at a time. Shards are written under temporary names and renamed at the
    end, so a failure leaves any earlier checkpoint in `out_dir` untouched; a success replaces
    it (stale shards and index from an earlier write are removed). `metadata` defaults to
    {"format": "pt"}, which transformers requires."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot write a checkpoint to {out}: it exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata) if metadata is not None else {"format": "pt"}
    writer = _ShardWriter(out, max_shard_bytes, meta)
    try:
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.flush()
        return writer.finish()
    except BaseException:
        writer.discard()
        raise


class _ShardWriter:
    def __init__(self, out: Path, max_bytes: int, metadata: dict[str, str]) -> None:
        self.out, self.max_bytes, self.metadata = out, max_bytes, metadata
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.partials: list[Path] = []
        self.shard_of: dict[str, int] = {}  # tensor name -> 0-based shard index
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if name in self.shard_of or name in self.pending:
            raise ValueError(f"tensor {name} appears twice in the stream")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = _own_memory(tensor.detach(), self.pending.values())
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending and self.partials:
            return
        path = self.out / f".model-{len(self.partials) + 1:05d}.safetensors{_PARTIAL_SUFFIX}"
        self.partials.append(path)
        write_safetensors(path, self.pending, self.metadata)
        for name in self.pending:
            self.shard_of[name] = len(self.partials) - 1
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        n = len(self.partials)
        finals = [self.out / (SINGLE_FILE if n == 1 else shard_name(i + 1, n)) for i in range(n)]
        _remove_stale(self.out, keep=finals)
        for part, final in zip(self.partials, finals, strict=True):
            part.replace(final)
        self.partials = []
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: finals[i].name for name, i in self.shard_of.items()},
            }
            tmp = self.out / f".{INDEX_FILE}{_PARTIAL_SUFFIX}"
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            tmp.replace(self.out / INDEX_FILE)
        return [str(f) for f in finals]

    def discard(self) -> None:
        for part in self.partials:
            part.unlink(missing_ok=True)


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
    entries = []
    for name, t in tensors.items():
        if t.dtype not in TORCH_ST:
            raise ValueError(f"{name}: safetensors has no dtype for {t.dtype}")
        entries.append((name, TORCH_ST[t.dtype], tuple(t.shape), t.numel() * t.element_size()))
    with Path(path).open("wb") as f:
        f.write(encode_header(entries, meta))
        for t in tensors.values():
            if t.numel():
                f.write(tensor_bytes(t))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as bytes (little-endian, as safetensors stores them), C order."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data
