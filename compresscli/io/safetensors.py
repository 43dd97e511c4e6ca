"""Reading safetensors defensively and lazily (one tensor at a time, across shards), writing sharded
output as it is produced, and output directories atomically."""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
from safetensors import safe_open

from compresscli.core.errors import CheckpointError, ResourceError

_FIX = "re-export it, or point at an intact copy"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit: a larger header is damage, not data


def _entry_problem(entry: object) -> str | None:
    """Why a header entry cannot describe a tensor, or None when it can.

    Checked before anything is read or allocated: a shape, dtype or offset in a damaged or hostile
    header must not reach the loader, which would size reads and tensors from it."""
    if not isinstance(entry, dict):
        return "its entry is not a JSON object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return f"dtype {dtype!r} is not a name"
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        return f"data offsets {offsets!r} are not two integers"
    start, end = offsets
    if not 0 <= start <= end:
        return f"data offsets {offsets} are not a byte range"
    if dtype in DTYPES:  # other dtypes are left to the safetensors library, which names them when read
        needed = math.prod(shape) * DTYPES[dtype].itemsize
        if needed != end - start:
            return f"shape {shape} of {dtype} needs {needed} bytes, its offsets span {end - start}"
    return None


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Tensor entries and `__metadata__` from the header alone, after checking the file is whole.

    Checks what the safetensors loader would only discover lazily: that the header parses and that
    every tensor's byte range lies inside the file (a truncated download fails here, by name). The
    header length is checked against the file before it is read, so a damaged length cannot make
    us allocate more than the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}", "check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"corrupt safetensors file {path} (shorter than its 8-byte header length)", _FIX)
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"corrupt safetensors file {path} (header length {header_len} exceeds the file "
                                  f"or the {MAX_HEADER_BYTES}-byte limit)", _FIX)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: also over-long integers
            raise CheckpointError(f"corrupt safetensors file {path} (header is not JSON: {err})", _FIX) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {path} (header is not a JSON object)", _FIX)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"corrupt safetensors file {path} (__metadata__ is not a map of strings)", _FIX)
    data_len = size - 8 - header_len
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointError(f"corrupt safetensors file {path}: tensor {name!r}: {problem}", _FIX)
        end = entry["data_offsets"][1]
        if end > data_len:
            raise CheckpointError(
                f"truncated safetensors file {path}: tensor {name!r} ends at byte {end} but the data holds {data_len}", _FIX)
    return header, metadata


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # where its bytes start in the file


class TensorIndex:
    """Every tensor of a checkpoint's weight files (one file, or the shards an index lists), by name,
    from the headers alone: nothing is read until `read` asks for it.

    `read` copies each tensor's bytes from the file into memory of its own (one read per tensor, no
    mapping kept). safetensors' `safe_open` would hand out views of a private mapping of the whole file,
    kept alive by any tensor read from it: on a file the page cache holds in huge pages every tensor then
    pins a 2 MiB page per mapping, and a loaded MiniLM read layer by layer held 53 mappings and 1.5x the
    file's bytes resident. It still reads dtypes this module does not know.
    """

    def __init__(self, files: list[Path], metadata: dict[Path, dict[str, str]], entries: dict[str, TensorEntry]):
        self.files = files
        self.metadata = metadata
        self.entries = entries

    @classmethod
    def of_files(cls, files: list[Path]) -> "TensorIndex":
        entries: dict[str, TensorEntry] = {}
        metadata: dict[Path, dict[str, str]] = {}
        for file in files:
            header, metadata[file] = read_header(file)
            with open(file, "rb") as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, entry in header.items():
                if name in entries:
                    raise CheckpointError(f"tensor {name!r} is stored twice ({entries[name].file.name} and {file.name})",
                                          "remove the stale shard")
                start, end = entry["data_offsets"]
                entries[name] = TensorEntry(file, str(entry.get("dtype")), tuple(entry.get("shape", ())), end - start,
                                            data_start + start)
        return cls(files, metadata, entries)

    @classmethod
    def of_directory(cls, directory: Path) -> "TensorIndex":
        """The weights of a checkpoint directory: the shards its index names, else its *.safetensors files."""
        index_path = directory / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                files = sorted({directory / str(f) for f in weight_map.values()})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index_path} is not a safetensors index ({err})", _FIX) from None
            missing = [f.name for f in files if not f.is_file() or f.parent != directory]
            if missing:
                raise CheckpointError(f"{index_path} names shards that are not there: {', '.join(missing[:4])}",
                                      "copy every shard beside the index")
            index = cls.of_files(files)
            stray = sorted(set(weight_map) ^ set(index.entries))
            if stray:
                raise CheckpointError(f"{index_path} does not match its shards (e.g. {stray[0]!r})", _FIX)
            return index
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory} has no *.safetensors weights", "convert the checkpoint to safetensors first")
        return cls.of_files(files)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (cast to `dtype` when given, floating point only), one handle per file."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.entries:
                raise CheckpointError(f"tensor {name!r} is not in the checkpoint", "the checkpoint is incomplete")
            by_file.setdefault(self.entries[name].file, []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            try:
                with open(file, "rb", buffering=0) as f:
                    for name in wanted:
                        tensor = self._read_one(f, name, self.entries[name])
                        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                            tensor = tensor.to(dtype)
                        tensors[name] = tensor
            except CheckpointError:
                raise
            except Exception as err:  # the library raises several types for a damaged file
                raise CheckpointError(f"corrupt safetensors file {file} ({err})", _FIX) from None
        return tensors

    @staticmethod
    def _read_one(f: BinaryIO, name: str, entry: TensorEntry) -> torch.Tensor:
        """One tensor in memory of its own, read from the open file `f`."""
        if entry.dtype not in DTYPES or sys.byteorder != "little":  # safetensors stores little-endian
            with safe_open(str(entry.file), framework="pt") as handle:
                return handle.get_tensor(name).clone()  # a copy: the mapping goes with the handle
        tensor = torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
        if entry.nbytes:
            f.seek(entry.offset)
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            got = f.readinto(view)
            if got != entry.nbytes:
                raise CheckpointError(f"truncated safetensors file {entry.file} (a tensor ends past its end)", _FIX)
        return tensor


def checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes as the writer stores them (contiguous, little-endian; 0 when empty)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    return zlib.crc32(data.view(torch.uint8).numpy().data) if data.numel() else 0


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one file."""
    index = TensorIndex.of_files([Path(path)])
    return index.read(index.names()), index.metadata[Path(path)]


def parse_size(text: str) -> int:
    """'8GiB', '500MB', '2G', '1024' (bytes) -> bytes."""
    units = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
             "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4, "TIB": 1024**4}
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise ValueError(f"{text!r} is not a size; write e.g. 8GiB, 500MB or 2G")
    return int(value * units[unit])


DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
HEADER_RESERVE = 1 << 20  # bytes kept at the start of a shard for its header, written when it closes
COMPACT_BELOW = 64 << 20  # shards smaller than this are rewritten without the unused reserve


class ShardWriter:
    """Writes tensors to safetensors files as they are produced, holding none of them afterwards.

    safetensors writes a file from a complete dict of tensors; this writer instead appends each
    tensor's bytes after a reserved header region and writes the header into it when the shard closes
    (padded with spaces, which JSON and the format allow), so a model of any size is saved with the
    memory of one tensor. Small shards are rewritten compactly; a header that outgrows the reserve
    gets the file rewritten around it. Each group of tensors added together lands in one shard with
    its metadata sections (merged by the reader); shards hold at most `shard_bytes` (a larger group
    gets a shard of its own). One shard is written as model.safetensors; more as
    model-0000i-of-0000N.safetensors with Hugging Face's index (model.safetensors.index.json).
    """

    def __init__(self, directory: Path, shard_bytes: int, common_metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self.common = dict(common_metadata or {})
        self.names: set[str] = set()  # every tensor written so far
        self.checksums: dict[str, int] = {}  # name -> CRC-32 of the bytes written (the reload check compares them)
        self.total_bytes = 0
        self._closed: list[tuple[Path, list[str]]] = []
        self._file = None
        self._entries: dict[str, dict] = {}
        self._sections: dict[str, dict] = {}
        self._data_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor], metadata: dict[str, dict] | None = None) -> None:
        """Write tensors (and JSON-able metadata sections, merged key by key) that belong together."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._file is not None and self._entries and self._data_bytes + size > self.shard_bytes:
            self._close_shard()
        if self._file is None:
            self._open_shard()
        for name, tensor in tensors.items():
            if name in self.names:
                raise ValueError(f"tensor {name!r} written twice")
            if tensor.dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            nbytes = data.numel() * data.element_size()
            if nbytes:
                raw = data.view(torch.uint8).numpy().data
                self._file.write(raw)
                self.checksums[name] = zlib.crc32(raw)
            else:
                self.checksums[name] = 0
            self._entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [self._data_bytes, self._data_bytes + nbytes]}
            self._data_bytes += nbytes
            self.names.add(name)
        for section, values in (metadata or {}).items():
            self._sections.setdefault(section, {}).update(values)
        self.total_bytes += size

    def _open_shard(self) -> None:
        path = self.directory / f".shard-{len(self._closed) + 1:05d}.safetensors"
        self._file = open(path, "wb")
        self._file.write(b"\0" * (8 + HEADER_RESERVE))
        self._path = path

    def _close_shard(self) -> None:
        metadata = {**self.common, **{k: json.dumps(v) for k, v in self._sections.items()}}
        header = json.dumps({"__metadata__": metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        if len(header) <= HEADER_RESERVE and self._data_bytes >= COMPACT_BELOW:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", HEADER_RESERVE) + header + b" " * (HEADER_RESERVE - len(header)))
            self._file.close()
        else:  # rewrite the shard with a header of its exact size
            self._file.close()
            compact = self._path.with_suffix(".compact")
            with open(self._path, "rb") as old, open(compact, "wb") as new:
                new.write(struct.pack("<Q", len(header)) + header)
                old.seek(8 + HEADER_RESERVE)
                shutil.copyfileobj(old, new, 16 << 20)
            os.replace(compact, self._path)
        self._closed.append((self._path, list(self._entries)))
        self._file, self._entries, self._sections, self._data_bytes = None, {}, {}, 0

    def close(self) -> list[Path]:
        """Close the last shard and give the shards their final names (and the index when there are several)."""
        if self._file is not None or not self._closed:
            if self._file is None:
                self._open_shard()  # a model with no tensors still gets a valid, empty file
            self._close_shard()
        count = len(self._closed)
        if count == 1:
            final = [self.directory / SINGLE_NAME]
            os.replace(self._closed[0][0], final[0])
            return final
        final, weight_map = [], {}
        for i, (path, names) in enumerate(self._closed, 1):
            target = self.directory / f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, target)
            final.append(target)
            weight_map.update({name: target.name for name in names})
        (self.directory / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes, **self.common}, "weight_map": weight_map}, indent=2))
        return final


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit


_LOCKED: set[Path] = set()  # outputs this process holds the lock of


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` beside `out`, so a second run writing the same OUT fails at once instead of
    racing the first to the final rename. Re-entrant within a process (a run locks OUT when it starts
    and saves through `atomic_directory`, which locks it too). The holder removes the file; a run
    that opened it just before that checks it holds the file that is still on disk."""
    out = Path(out).absolute()
    if out in _LOCKED:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"another run is writing {out} right now",
                                  "wait for it to finish, or choose another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it between our open and our lock: take the new one
    _LOCKED.add(out)
    try:
        yield
    finally:
        _LOCKED.discard(out)
        os.unlink(path)
        os.close(fd)


def _written_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; it becomes `out` only if the block completes.

    On any exception (Ctrl-C included) the temporary directory is removed and `out` is untouched,
    so a failed run never leaves a half-written checkpoint; one killed outright (SIGKILL, the kernel's
    out-of-memory killer) leaves it behind, and the next run writing `out` removes it (the lock says
    no live run owns it). A full disk is an error saying how much
    was written; a second run writing the same `out` meanwhile fails at once (see `output_lock`).
    """
    out = Path(out)
    with output_lock(out):
        if out.exists() and not force:
            raise CheckpointError(f"output {out} already exists", "choose another --out, or pass --force to replace it")
        for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):  # left by a run killed outright
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should look like any other directory
        try:
            yield tmp
            if out.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, trash / out.name)
                os.replace(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except OSError as err:
            if err.errno not in DISK_FULL:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            written = _written_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            raise ResourceError(f"writing {out} failed after {written / 1024**2:.1f} MiB: {err.strerror}",
                                f"free disk space where {out.parent} lies (or raise its quota or file-size limit), "
                                "or choose an --out elsewhere; nothing was kept") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
