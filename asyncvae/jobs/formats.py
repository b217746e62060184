"""Shard files, written and read with the libraries made for them.

- ``safetensors`` (the ``safetensors`` library): one file per shard, ``{key: latent
  [C, H/8, W/8]}`` plus string metadata; byte-identical for equal inputs.
- ``webdataset``: an uncompressed tar streamed member by member (never built in
  memory): per sample ``<key>.npy`` (the latent; ``<key>.safetensors`` for bfloat16,
  which numpy cannot hold), ``<key>.json`` (its index row) and the sample's
  ``.txt``/``.cls`` sidecars. Members carry ``mtime=0`` and no owner, so equal inputs
  give equal bytes.
- ``parquet``: the shard's index with a ``latent`` column of fixed-shape arrays
  (nested fixed-size lists), which 🤗 ``datasets.load_dataset("parquet", ...)`` and
  any Arrow reader load as ``[C, h, w]`` arrays; failed rows have a null latent.
- the index (``shard-NNNNN.parquet``, pyarrow) for the other formats: one row per
  input with key, source, status, error class/kind/reason, original size, crop box,
  latent shape, caption, ``json``/``cls`` sidecars and extra CSV columns.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from typing import IO, Any

import numpy as np
import torch

from ..errors import InputError

__all__ = [
    "FORMATS",
    "INDEX_COLUMNS",
    "data_name",
    "index_rows_to_table",
    "read_index",
    "read_latents",
    "read_safetensors",
    "write_index",
    "write_shard",
]

FORMATS = ("safetensors", "webdataset", "parquet")
_EXT = {"safetensors": ".safetensors", "webdataset": ".tar", "parquet": ".parquet"}

#: Columns of every index row (``None`` where it does not apply).
INDEX_COLUMNS = (
    "key", "source", "status", "error_class", "error_kind", "error", "width", "height",
    "crop", "shape", "caption", "json", "cls", "extra",
)


def data_name(shard: str, fmt: str) -> str:
    """The data file of a shard: ``shard-00000.safetensors`` / ``.tar`` / ``.parquet``."""
    return shard + _EXT[fmt]


def index_name(shard: str) -> str:
    """The index file of a shard (for ``parquet`` it is the data file itself)."""
    return shard + ".parquet"


def index_rows_to_table(rows: Sequence[dict[str, Any]], meta: dict[str, str] | None = None) -> Any:
    """A pyarrow table of index rows (fixed columns, ``meta`` as schema metadata)."""
    import pyarrow as pa

    from . import _arrow as A

    def col(name: str) -> list[Any]:
        return [r.get(name) for r in rows]

    extra = [json.dumps(v, ensure_ascii=False, sort_keys=True) if isinstance(v, dict) and v else
             (v if isinstance(v, str) else None) for v in col("extra")]
    arrays = {
        "key": A.strings(col("key")), "source": A.strings(col("source")), "status": A.strings(col("status")),
        "error_class": A.strings(col("error_class")), "error_kind": A.strings(col("error_kind")),
        "error": A.strings(col("error")), "width": A.ints(col("width")), "height": A.ints(col("height")),
        "crop": A.float_lists(col("crop")), "shape": A.int_lists(col("shape")),
        "caption": A.strings(col("caption")), "json": A.strings(col("json")), "cls": A.strings(col("cls")),
        "extra": A.strings(extra),
    }
    table = pa.Table.from_arrays([arrays[c] for c in INDEX_COLUMNS], names=list(INDEX_COLUMNS))
    if meta:
        table = table.replace_schema_metadata({k: str(v) for k, v in meta.items()})
    return table


def _latent_array(latents: Sequence[torch.Tensor | None]) -> Any:
    import pyarrow as pa

    shapes = {tuple(t.shape) for t in latents if t is not None}
    if len(shapes) > 1:
        raise InputError(f"latents of one shard differ in shape ({sorted(shapes)}); parquet needs one shape")
    if not shapes:
        return pa.nulls(len(latents))  # (an all-failed shard)
    shape = shapes.pop()
    dtype = next(t.dtype for t in latents if t is not None)
    if dtype == torch.bfloat16:
        raise InputError("--format parquet cannot hold bfloat16 latents; use --dtype float16 or float32")
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    filled = np.zeros((len(latents), *shape), dtype=np_dtype)
    for i, t in enumerate(latents):
        if t is not None:
            filled[i] = t.numpy()
    from . import _arrow as A

    flat = np.ascontiguousarray(filled).reshape(-1)
    arr: Any = pa.Array.from_buffers(pa.from_numpy_dtype(np_dtype), flat.size, [None, pa.py_buffer(flat.tobytes())])
    for n in reversed(shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, n)
    if all(t is not None for t in latents):
        return pa.FixedSizeListArray.from_arrays(arr, shape[0])
    return pa.FixedSizeListArray.from_arrays(arr, shape[0], mask=A.bools([t is None for t in latents]))


def _parquet_bytes(table: Any) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_index(f: IO[bytes], rows: Sequence[dict[str, Any]], meta: dict[str, str]) -> None:
    """Write the index parquet of ``rows`` into ``f``."""
    f.write(_parquet_bytes(index_rows_to_table(rows, meta)))


def _safetensors_bytes(items: Iterable[tuple[str, torch.Tensor]], meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {k: t.contiguous() for k, t in items}
    return _canonical(save(tensors, metadata={k: str(v) for k, v in meta.items()}))


def _canonical(data: bytes) -> bytes:
    """The same file with its JSON header in sorted order: the ``safetensors`` library
    writes header entries in hash-map order, which changes from process to process, so
    equal shards would differ in bytes. Only the header's key order changes (same
    length, same offsets); anything unexpected leaves the bytes as they were."""
    n = int.from_bytes(data[:8], "little")
    raw = data[8 : 8 + n]
    try:
        header = json.loads(raw)
    except ValueError:  # pragma: no cover - the library wrote it
        return data
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # pragma: no cover
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _npy_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.numpy(), allow_pickle=False)
    return buf.getvalue()


def write_shard(
    f: IO[bytes],
    fmt: str,
    rows: Sequence[dict[str, Any]],
    latents: Sequence[torch.Tensor | None],
    meta: dict[str, str],
) -> None:
    """Write one shard's data file into ``f`` (streamed for ``webdataset``)."""
    ok = [(r["key"], t) for r, t in zip(rows, latents, strict=True) if t is not None]
    if fmt == "safetensors":
        f.write(_safetensors_bytes(ok, meta))
    elif fmt == "webdataset":
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.GNU_FORMAT) as tf:
            for r, t in zip(rows, latents, strict=True):
                if t is None:
                    continue
                key = r["key"]
                if t.dtype == torch.bfloat16:
                    _tar_add(tf, f"{key}.safetensors", _safetensors_bytes([("latent", t)], meta))
                else:
                    _tar_add(tf, f"{key}.npy", _npy_bytes(t))
                _tar_add(tf, f"{key}.json", json.dumps(_plain(r), sort_keys=True, ensure_ascii=False).encode())
                if r.get("caption") is not None:
                    _tar_add(tf, f"{key}.txt", str(r["caption"]).encode())
                if r.get("cls") is not None:
                    _tar_add(tf, f"{key}.cls", str(r["cls"]).encode())
    elif fmt == "parquet":
        import pyarrow as pa

        table = index_rows_to_table(rows)
        table = table.append_column(pa.field("latent", _latent_array(latents).type), _latent_array(latents))
        table = table.replace_schema_metadata({k: str(v) for k, v in meta.items()})
        f.write(_parquet_bytes(table))
    else:  # pragma: no cover - validated earlier
        raise InputError(f"format={fmt!r} must be one of {', '.join(FORMATS)}")


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if v is not None}


# --------------------------------------------------------------------------- reading


def read_index(data: bytes) -> list[dict[str, Any]]:
    """Index rows of an index (or ``parquet`` shard) file's bytes."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(io.BytesIO(data)).read(columns=list(INDEX_COLUMNS))  # (read_table imports pandas)
    return table.to_pylist()


def read_latents(data: bytes, fmt: str) -> dict[str, torch.Tensor]:
    """``{key: latent}`` of a shard data file's bytes (to reuse done items)."""
    if fmt == "safetensors":
        from safetensors.torch import load

        return dict(load(data))
    if fmt == "webdataset":
        out: dict[str, torch.Tensor] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition(".")
                fh = tf.extractfile(m)
                if fh is None:
                    continue
                if ext == "npy":
                    out[key] = torch.from_numpy(np.load(io.BytesIO(fh.read()), allow_pickle=False))
                elif ext == "safetensors":
                    from safetensors.torch import load

                    out[key] = load(fh.read())["latent"]
        return out
    import pyarrow.parquet as pq

    table = pq.ParquetFile(io.BytesIO(data)).read(columns=["key", "latent"])
    out = {}
    for key, lat in zip(table.column("key").to_pylist(), table.column("latent").to_pylist(), strict=True):
        if lat is not None:
            out[key] = torch.from_numpy(np.asarray(lat, dtype=np.float32))
    return out


def read_safetensors(path: str | os.PathLike[str]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Tensors (by name) and metadata of a safetensors file, through the ``safetensors``
    library; a malformed file is an :class:`InputError` with a one-line reason."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            return [(k, f.get_tensor(k)) for k in f.keys()], meta  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable safetensors file ({text})") from None
