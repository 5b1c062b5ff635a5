"""Lazy views of weight files: shapes without reading data, tensors read on demand.

A :class:`TensorRef` holds a tensor's shape and a function that produces it; key remapping
and layout changes compose functions, so detecting a model family or converting between
layouts never holds two copies of a multi-gigabyte checkpoint. Safetensors files are
memory-mapped (``safe_open``); pickled ``.ckpt`` files are read only on request, through
PyTorch's weights-only unpickler, which admits tensors, storages and plain containers and
refuses every other global (so a pickle cannot run code on load).
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint import PICKLE_SUFFIXES, CheckpointError, save_tensors

@dataclass(frozen=True)
class TensorRef:
    """A tensor not yet read: its shape and a thunk that produces it."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> "TensorRef":
        """A new reference whose tensor is ``fn`` of this one (of the given shape)."""
        load = self.load
        return TensorRef(tuple(shape), lambda: fn(load()))

    @staticmethod
    def of(t: torch.Tensor) -> "TensorRef":
        return TensorRef(tuple(t.shape), lambda: t)


Weights = dict[str, TensorRef]


def materialize(weights: Weights, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor (optionally cast floating ones to ``dtype``), checking each shape; the
    files' handles are closed afterwards (:func:`release_files`)."""
    out = {}
    try:
        for k, ref in weights.items():
            t = ref.load()
            if tuple(t.shape) != ref.shape:
                raise CheckpointError(f"tensor {k} has shape {tuple(t.shape)}, expected {ref.shape}")
            out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    finally:
        release_files()
    return out


def from_tensors(tensors: dict[str, torch.Tensor]) -> Weights:
    return {k: TensorRef.of(v) for k, v in tensors.items()}


# --------------------------------------------------------------------------- reading


# safetensors dtype names -> torch dtypes (the format's full list that torch can hold)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}
# every live mapping of a weights file: base address -> (length, the mmap)
_REGIONS: dict[int, tuple[int, "weakref.ref[mmap.mmap]"]] = {}


class SafetensorsFile:
    """A safetensors file memory-mapped on the first read; tensors are views of the mapping.

    The mapping is private (copy-on-write): the file is never written, and a tensor changed in
    place changes only this process's copy. Each tensor keeps the mapping alive; the handle does
    too until :meth:`release` (after a stage is built, :func:`materialize` releases every handle),
    so once a stage's modules are freed its pages leave the process (the U-Net's 3.4 GB of SD 1.5
    before the VAE decodes). :func:`drop_pages` gives resident pages back while the
    tensors live (they are read from the file again when next touched)."""

    _open: "weakref.WeakSet[SafetensorsFile]" = weakref.WeakSet()

    def __init__(self, path: Path, header: dict, data_start: int):
        self.path, self._header, self._data_start = path, header, data_start  # as read by open_safetensors
        self._mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._mm = mm
            base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
            _REGIONS[base] = (len(mm), weakref.ref(mm))
            weakref.finalize(mm, _REGIONS.pop, base, None)
            SafetensorsFile._open.add(self)
        return self._mm

    def get(self, key: str) -> torch.Tensor:
        mm = self._map()
        info = self._header[key]
        dtype, shape = SAFETENSORS_DTYPES.get(info["dtype"]), tuple(info["shape"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key} has dtype {info['dtype']}, which sumie cannot read")
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=self._data_start + start).view(shape)

    def release(self) -> None:
        self._mm = None
        SafetensorsFile._open.discard(self)


def release_files() -> None:
    """Close every open :class:`SafetensorsFile` handle (tensors already read stay valid)."""
    for f in list(SafetensorsFile._open):
        f.release()


def drop_pages(tensors) -> int:
    """Give the resident pages of memory-mapped tensors back to the OS (``madvise(MADV_DONTNEED)``
    on the whole pages inside each tensor); tensors not read from a weights file are left alone.
    Returns the bytes advised.

    The tensors stay valid: the mappings are of unchanged file contents, so a page dropped here
    is read again (from the page cache, usually) when next touched. Streaming a model through
    memory this way, a block at a time, bounds its resident weights to one block. Pages written
    by in-place changes would be lost, so use it only on weights that are never changed in place
    (sumie's LoRA merging makes new tensors). A no-op where ``madvise`` is missing (Windows)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or not _REGIONS:
        return 0
    page, done = mmap.PAGESIZE, 0
    for t in tensors:
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        for base, (length, ref) in list(_REGIONS.items()):
            mm = ref()
            if mm is None or not base <= ptr < base + length:
                continue
            start, end = -(-(ptr - base) // page) * page, (ptr - base + n) // page * page
            if end > start:
                mm.madvise(advice, start, end - start)
                done += end - start
            break
    return done


def open_safetensors(path: str | Path) -> tuple[Weights, dict[str, str]]:
    """Read a safetensors file's header: (lazy weights, metadata); each tensor is read from a
    memory map when loaded (:class:`SafetensorsFile`). Truncated or corrupt files raise
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        safe_open(str(path), framework="pt", device="cpu")  # validates the header against the format
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                              "corrupt: download or export it again.") from e
    header, data_start = _read_header(path)
    meta = header.pop("__metadata__", None) or {}
    lazy = SafetensorsFile(path, header, data_start)
    weights = {k: TensorRef(tuple(v["shape"]), (lambda k=k: lazy.get(k))) for k, v in header.items()}
    return weights, meta


def _read_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data section); the data section must end within the file (a
    cut-off download does not)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = os.path.getsize(path)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + n + end} bytes but the file has "
                              f"{size}; download or export it again.")
    return header, 8 + n


def open_sharded(index_path: str | Path) -> Weights:
    """Weights split over several safetensors files listed by a ``*.safetensors.index.json``."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path} is not a valid shard index ({e})") from e
    shards: dict[str, Weights] = {}
    out: Weights = {}
    for key, shard in weight_map.items():
        if shard not in shards:
            shards[shard] = open_safetensors(index_path.parent / shard)[0]
        if key not in shards[shard]:
            raise CheckpointError(f"{index_path} places {key} in {shard}, which does not hold it")
        out[key] = shards[shard][key]
    return out


class _Inert:
    """Stands in for harmless bookkeeping objects that training frameworks pickle next to
    the weights (a Lightning ``ModelCheckpoint`` callback): it accepts state and does nothing."""

    def __setstate__(self, state):
        self.state = state


def _inert_call(*args, **kwargs):
    return None


# Globals admitted beyond torch's weights-only set: (stand-in, the name the pickle uses).
# Each maps to an object with no behaviour, so admitting the name cannot execute anything.
_INERT_GLOBALS = [
    (_Inert, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_inert_call, "numpy.core.multiarray.scalar"),
    (_inert_call, "numpy._core.multiarray.scalar"),
    (_inert_call, "numpy.dtype"),
]


def refusal_message(path: Path, error: Exception) -> str:
    """One line in sumie's words for a pickle the restricted unpickler refused (naming the object it
    would have had to build) or could not read; torch's own message advises turning the protection off."""
    import re

    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported (?:global|operand)[:\s]+([^\s.]+(?:\.[\w]+)*)", text)
    if found or isinstance(error, pickle.UnpicklingError):
        what = f"an object of type {found.group(1)}" if found else "something other than tensors"
        return (f"{path}: the restricted unpickler refused it: it holds {what}, and building that could run "
                "code; sumie admits only tensors and plain containers from a pickle. Ask its publisher for a "
                ".safetensors file, or convert it in an isolated environment you can throw away.")
    first = (text.strip().splitlines() or [type(error).__name__])[0][:200]
    return f"{path} is damaged or not a PyTorch checkpoint ({type(error).__name__}: {first})"


def load_pickle(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.ckpt``/``.pt`` pickle through the restricted (weights-only) unpickler;
    refused unless ``allow_pickle``. Lightning's ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle; unpickling can run arbitrary code, so sumie refuses it by default. If you trust "
            "its source, pass allow_pickle=True (CLI: --allow-pickle); it is then read with a restricted "
            "unpickler that admits only tensors and plain containers. Better: convert it once to .safetensors.")
    try:
        with torch.serialization.safe_globals(_INERT_GLOBALS):
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) pickles cannot be memory-mapped
                    raise
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for refused globals, RuntimeError/EOFError for damage
        raise CheckpointError(refusal_message(path, e)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def open_weights(path: str | Path, *, allow_pickle: bool = False) -> tuple[Weights, dict[str, str]]:
    """Any single weights file: safetensors (memory-mapped) or, with ``allow_pickle``, a pickle."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: 8-byte little-endian header length, then the JSON header; its first byte can be 0x80
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if path.suffix.lower() in PICKLE_SUFFIXES or (not looks_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK")):
        return from_tensors(load_pickle(path, allow_pickle=allow_pickle)), {}
    return open_safetensors(path)


def write_safetensors(path: str | Path, weights: Weights, metadata: dict[str, str] | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Materialise lazy weights and write them atomically as one safetensors file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, materialize(weights, dtype), metadata)
