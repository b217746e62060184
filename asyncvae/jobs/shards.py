"""Shard files: deterministic safetensors and tar writers, atomic replacement, readers.

Everything written here is byte-reproducible: the safetensors header is written by
hand (keys in item order, ``__metadata__`` first, sorted metadata keys, no
timestamps), and tar members carry ``mtime=0``, uid/gid 0 and empty owner names.
Files are written to a temporary name in the destination folder, fsynced, then
``os.replace``-d into place, so a killed job never leaves a file under its final name
that is only partly written.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

__all__ = [
    "SAFETENSORS_DTYPES",
    "atomic_write",
    "iter_latent_files",
    "read_safetensors",
    "safetensors_bytes",
    "tar_bytes",
]

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
}
_FROM_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def safetensors_bytes(tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    """A safetensors file as bytes: tensors in the given order, ``metadata`` (str → str)
    sorted by key. Deterministic for equal inputs."""
    header: dict[str, Any] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs: list[bytes] = []
    offset = 0
    for name, t in tensors:
        if name in header:
            raise InputError(f"duplicate tensor name {name!r}")
        dt = SAFETENSORS_DTYPES.get(t.dtype)
        if dt is None:
            raise InputError(f"tensor {name!r} has dtype {t.dtype}, which safetensors can't hold")
        b = _raw(t)
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    return b"".join([struct.pack("<Q", len(head)), head, *blobs])


def read_safetensors(path: str | os.PathLike[str]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Tensors (in file order) and metadata of a safetensors file."""
    data = Path(path).read_bytes()
    return parse_safetensors(data, str(path))


def parse_safetensors(data: bytes, name: str = "safetensors") -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Parse safetensors bytes (see :func:`read_safetensors`)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except (struct.error, ValueError) as e:
        raise InputError(f"{name}: not a safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: list[tuple[str, torch.Tensor]] = []
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dt = _FROM_ST.get(info["dtype"])
        if dt is None:
            raise InputError(f"{name}: tensor {key!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        buf = bytearray(data[base + a : base + b])
        t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
        out.append((key, t.reshape(info["shape"])))
    return out, meta


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar (GNU format) of ``(name, data)`` members with fixed
    ownership, mode and ``mtime=0``: the same members give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, fsync: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, and ``os.replace`` it
    into place: readers see the old file or the complete new one, never a torn one."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (new names) to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


LATENT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".tar")


def iter_latent_files(inputs: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Latent files of a decode job: files given directly, and the ``.safetensors``,
    ``.pt``/``.pth`` and ``.tar`` files of folders (recursive, sorted)."""
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise InputError(f"input path {str(p)!r} does not exist")
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*")
                if q.is_file() and q.suffix.lower() in LATENT_EXTENSIONS and not q.name.startswith(".")
            )
            yield from found
        elif p.suffix.lower() in LATENT_EXTENSIONS:
            yield p
        else:
            raise InputError(f"{p}: unsupported latent file (expected .safetensors, .pt/.pth or .tar)")
