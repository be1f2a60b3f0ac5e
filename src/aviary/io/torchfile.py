"""PyTorch checkpoint files (`torch.save`: the zip format, or the legacy pre-1.6 stream), read so that a
crafted or damaged file cannot make the loader allocate more than the file holds.

Loading happens in two passes:

1. **What the file claims.** The zip directory (or the legacy stream's storage headers) and the pickle,
   unpickled by torch's weights-only unpickler onto the meta device: every tensor's dtype, shape, strides
   and storage become known and nothing is allocated. The checks below run on that.
2. **The data**, read by `torch.load(weights_only=True)`: memory-mapped for the zip format, read into
   memory for the legacy one.

The checks of pass 1, each of which a hostile or damaged file has been seen to break:

- every storage's record holds exactly the bytes the pickle claims for it. The mmap path of `torch.load`
  does not check this, so a truncated record would silently fill a tensor from the records after it;
- records are stored uncompressed, lie inside the file, and do not overlap (zip entries can point at the
  same bytes); torch's zip reader and Python's agree on where each one starts;
- every tensor of the state dict is a dense (contiguous) tensor inside its storage, and no two of them
  share bytes. A stride-0 view of 64 floats can claim 8 GiB, and copying it would allocate them all.

Together these bound what loading allocates by the size of the file.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import _weights_only_unpickler as weights_only

__all__ = ["FileError", "load"]

ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


class FileError(ValueError):
    """What is wrong with a checkpoint file (the caller adds the path)."""


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    nbytes: int  # what the pickle claims


class _ClaimReader:
    """Pass 1's pickle unpickled onto the meta device: records the storages the pickle asks for."""

    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}
        self._meta: dict[str, torch.storage.TypedStorage] = {}
        self.owner: dict[int, str] = {}  # meta storage (its StorageImpl address) -> storage key

    def persistent_load(self, pid: Any) -> torch.storage.TypedStorage:
        # zip: ('storage', type, key, location, numel); legacy adds view_metadata
        if not isinstance(pid, tuple) or len(pid) != (6 if self.legacy else 5):
            raise FileError(f"malformed storage reference {str(pid)[:80]}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if self.legacy and pid[5] is not None:
            raise FileError("storage views of pre-1.0 PyTorch files are not supported")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise FileError(f"malformed storage reference {str(pid)[:80]}")
        nbytes = numel * torch._utils._element_size(dtype)
        known = self.storages.get(key)
        if known is None:
            self.storages[key] = _Storage(key, dtype, nbytes)
            untyped = torch.UntypedStorage(nbytes, device="meta")
            self.owner[untyped._cdata] = key
            self._meta[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        elif (known.dtype, known.nbytes) != (dtype, nbytes):
            raise FileError(f"storage {key} is claimed with two different sizes or dtypes")
        return self._meta[key]

    def load(self, file) -> Any:
        unpickler = weights_only.Unpickler(file, encoding="utf-8")
        unpickler.persistent_load = self.persistent_load
        return unpickler.load()


class _BoundedReader:
    """A file as the unpickler reads it, refusing reads past the end up front: a garbled length field
    must not make Python allocate a buffer of that length before finding out the file is shorter."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.f.tell()
        if n > left:
            raise EOFError
        return self.f.read(left if n < 0 else n)

    def readline(self) -> bytes:
        return self.f.readline(1 << 16)  # module and class names, never long

    def tell(self) -> int:
        return self.f.tell()


def _zip_records(path: Path, size: int) -> tuple[dict[str, tuple[int, int]], bytes]:
    """The zip's records under its archive folder, as {name: (data offset, size)}, checked to be stored,
    inside the file and not overlapping; and the bytes of its data.pkl (CRC-checked)."""
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            infos = z.infolist()
            if not infos or "/" not in infos[0].filename:
                raise FileError("not a PyTorch checkpoint: the zip has no archive folder")
            prefix = infos[0].filename.split("/", 1)[0] + "/"  # what torch's reader takes too
            names = [i.filename.lower() for i in infos]  # torch's reader matches names case-insensitively
            if len(set(names)) != len(names):
                raise FileError("the zip holds two records of the same name")
            records: dict[str, tuple[int, int]] = {}
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise FileError(f"zip record {info.filename} is compressed; PyTorch stores records as they are")
                f.seek(max(info.header_offset, 0))
                header = f.read(_LOCAL_HEADER)
                if info.header_offset < 0 or len(header) < _LOCAL_HEADER or not header.startswith(ZIP_MAGIC):
                    raise FileError(f"zip record {info.filename} has no local header (truncated or corrupt zip?)")
                start = (info.header_offset + _LOCAL_HEADER + int.from_bytes(header[26:28], "little")
                         + int.from_bytes(header[28:30], "little"))
                if start + info.file_size > size:
                    raise FileError(f"zip record {info.filename} runs past the end of the file (truncated?)")
                if info.filename.startswith(prefix):
                    records[info.filename[len(prefix):]] = (start, info.file_size)
            if "data.pkl" not in records:
                raise FileError("not a PyTorch checkpoint of tensors: the zip has no data.pkl")
            pickled = z.read(prefix + "data.pkl")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, MemoryError) as e:
        raise FileError(f"not a readable PyTorch checkpoint (truncated or corrupt zip?): {e}") from None
    spans = sorted(records.values())
    for (a, n), (b, _) in pairwise(spans):
        if a + n > b:
            raise FileError("zip records overlap (a crafted zip?)")
    return records, pickled


def _zip_claims(path: Path, size: int) -> tuple[Any, _ClaimReader]:
    records, pickled = _zip_records(path, size)
    claims = _ClaimReader(legacy=False)
    obj = claims.load(io.BytesIO(pickled))
    reader = torch._C.PyTorchFileReader(str(path))
    for key, storage in claims.storages.items():
        name = f"data/{key}"
        if name not in records:
            raise FileError(f"storage record {name} is missing")
        start, stored = records[name]
        if stored != storage.nbytes:
            raise FileError(f"storage record {name} holds {stored:,} bytes, but its tensors need "
                            f"{storage.nbytes:,} (truncated or corrupt file?)")
        if reader.get_record_offset(name) != start:  # the mmap load reads where torch's reader says
            raise FileError(f"storage record {name}: the zip directory is inconsistent (a crafted zip?)")
    return obj, claims


def _legacy_claims(path: Path, size: int) -> tuple[Any, _ClaimReader]:
    """The legacy stream: magic number, protocol, system info, the pickle, its storage keys, then each
    storage as an int64 element count followed by its bytes."""
    claims = _ClaimReader(legacy=True)
    with open(path, "rb") as raw:
        f = _BoundedReader(raw, size)
        if weights_only.load(f, encoding="utf-8") != torch.serialization.MAGIC_NUMBER:
            raise FileError("not a PyTorch checkpoint (no torch.save magic number)")
        if weights_only.load(f, encoding="utf-8") != torch.serialization.PROTOCOL_VERSION:
            raise FileError("unsupported torch.save protocol version")
        weights_only.load(f, encoding="utf-8")  # system info
        obj = claims.load(f)
        keys = weights_only.load(f, encoding="utf-8")
        if not isinstance(keys, list) or sorted(keys) != sorted(claims.storages):
            raise FileError("the storage list does not match the storages the tensors use (corrupt file?)")
        offset = f.tell()
        for key in keys:
            raw.seek(offset)
            count = int.from_bytes(raw.read(8), "little", signed=True)
            storage = claims.storages[key]
            if count * torch._utils._element_size(storage.dtype) != storage.nbytes:
                raise FileError(f"storage {key} has the wrong size (corrupt file?)")
            offset += 8 + storage.nbytes
            if offset > size:
                raise FileError(f"storage {key} runs past the end of the file (truncated?)")
    return obj, claims


def _storage_problems(sd: dict, claims: _ClaimReader) -> list[str]:
    """What makes the tensors of `sd` (meta tensors from pass 1) unsafe to load, one line each."""
    problems = []
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout != torch.strided or t.is_quantized:
            problems.append(f"{name} is a {t.layout} / quantized tensor, not a plain one")
            continue
        key = claims.owner.get(t.untyped_storage()._cdata)
        if key is None:
            problems.append(f"{name} has no data in the file")
            continue
        if not t.is_contiguous():  # an expanded (stride-0) view can claim GiBs of a few stored bytes
            problems.append(f"{name} is a strided view (shape {tuple(t.shape)}, strides {t.stride()}), "
                            "not a tensor stored whole (save it with .contiguous())")
            continue
        start = t.storage_offset() * t.element_size()
        end = start + t.numel() * t.element_size()
        if end > claims.storages[key].nbytes:
            problems.append(f"{name} (shape {tuple(t.shape)}) reaches past the end of its storage")
            continue
        if end > start:
            spans.setdefault(key, []).append((start, end, name))
    for parts in spans.values():  # tensors sharing bytes would be copied once each: no bound
        parts.sort()
        for (_, end, a), (start, _, b) in pairwise(parts):
            if start < end:
                problems.append(f"{a} and {b} share stored bytes; save each tensor on its own (.clone())")
    return problems


def _state_dict(obj: Any) -> Any:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]  # Lightning-style wrapper
    return obj


def load(path: Path, size: int, head: bytes) -> Any:
    """Check what the file at `path` (`size` bytes, starting with `head`) claims, then load it.
    Returns the unpickled object, unwrapped from a Lightning-style {"state_dict": ...}. Raises FileError,
    pickle.UnpicklingError for a refused pickle, EOFError, or whatever else garbage makes the unpickler
    raise."""
    is_zip = head.startswith(ZIP_MAGIC)  # how torch.load decides between the two formats
    with warnings.catch_warnings():  # the unpickler warns about pickle protocols before refusing them
        warnings.simplefilter("ignore")
        obj, claims = _zip_claims(path, size) if is_zip else _legacy_claims(path, size)
        sd = _state_dict(obj)
        if isinstance(sd, dict):
            problems = _storage_problems(sd, claims)
            if problems:
                more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                raise FileError("; ".join(problems[:3]) + more)
        del obj, sd
        return _state_dict(torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=is_zip))

