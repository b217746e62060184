"""The decode job: latent shards → images (``asyncvae decode``, :func:`decode_dataset`).

Inputs: shards written by ``asyncvae encode`` (``.safetensors``, WebDataset ``.tar`` of
``<key>.npy``/``<key>.safetensors``, or ``--format parquet`` files), or any folder of
``.safetensors`` / ``.pt`` latent files. In an ``asyncvae`` shard every tensor is one
item named by its key; in other files a single tensor is named by the file's path
(relative to its input folder, without extension), several by ``<path>/<name>``.
Latents are ``[C, h, w]`` or ``[B, C, h, w]`` (B > 1 gives ``<key>/000``, ...).

Every name is checked before anything is written: an absolute name, a ``..`` part, a
NUL or a backslash makes that item an input failure ("unsafe name"), and every output
path is checked to stay under ``--out``; other characters are replaced by ``_``.

Scaling: latents whose shard says they were scaled are decoded with the recorded
``scaling_factor``/``shift_factor`` (a shift alone is undone too, with scale 1);
``--scaling-factor``/``--shift-factor`` override the shards.

Each input file is a unit with an index (``OUT/<unit>.parquet``) and a completion
marker (``OUT/<unit>_stats.json``, written only when no item failed at the endpoint),
like encode's shards; ``job.json`` records settings and endpoint. A re-run skips
complete units and, in the others, items whose images all exist.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import io
import json
import os
import re
import tarfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..client import Client
from ..errors import InputError
from . import manifest as M
from .accounting import FailureGuard, JobSummary, Progress, failures_text
from .encode import _logger
from .endpoint import JobAborted, describe, endpoint_identity, open_client, resolve_endpoints
from .formats import read_index, write_index
from .pipeline import PipelineSettings, Run, run_pipeline
from .prep import available_cpus
from .settings import IMAGE_FORMATS, DecodeSettings, RunSettings, split_kwargs
from .storage import Storage, UnsafePath, check_relative

__all__ = ["IMAGE_FORMATS", "decode_dataset", "decode_dataset_async", "safe_key"]

LATENT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".tar", ".parquet")
_PART = re.compile(r"[^A-Za-z0-9._-]+")


def safe_key(name: str) -> str:
    """An output-safe key from a foreign name: :class:`UnsafePath` (an input failure)
    for absolute names, ``..`` parts, NUL or backslash; other characters become ``_``."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePath(f"unsafe name {name!r} (absolute, NUL or backslash): not written")
    parts = name.split("/")
    if any(p == ".." for p in parts):
        raise UnsafePath(f"unsafe name {name!r} ('..' would leave the output folder): not written")
    clean = [_PART.sub("_", p) for p in parts if p not in ("", ".")]
    clean = [("_" + p[1:]) if p.startswith(".") else p for p in clean]
    if not clean:
        raise UnsafePath(f"unsafe name {name!r} (empty): not written")
    return check_relative("/".join(clean))


# --------------------------------------------------------------------------- inputs


def _find_files(inputs: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """(file, path relative to its input without extension) of every latent file."""
    out: list[tuple[Path, str]] = []
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise InputError(f"input path {str(p)!r} does not exist")
        if p.is_dir():
            seen: set[tuple[int, int]] = set()
            for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
                st = os.stat(dirpath)
                if (st.st_dev, st.st_ino) in seen:
                    dirnames[:] = []
                    continue
                seen.add((st.st_dev, st.st_ino))
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    q = Path(dirpath) / fn
                    if fn.startswith(".") or q.suffix.lower() not in LATENT_EXTENSIONS:
                        continue
                    if q.suffix.lower() == ".parquet" and not _is_latent_parquet(q):
                        continue  # an index, not data
                    rel = os.path.relpath(q, p).replace(os.sep, "/")
                    out.append((q, os.path.splitext(rel)[0]))
        elif p.suffix.lower() in LATENT_EXTENSIONS:
            out.append((p, p.stem))
        else:
            raise InputError(f"{p}: unsupported latent file (expected .safetensors, .pt/.pth, .tar or .parquet)")
    out.sort(key=lambda t: t[1])
    return out


def _is_latent_parquet(path: Path) -> bool:
    try:
        import pyarrow.parquet as pq

        return "latent" in pq.read_schema(path).names
    except Exception:
        return False


def _sibling_meta(path: Path) -> dict[str, str]:
    """Metadata of the index beside a WebDataset shard (scaling, dtype)."""
    idx = path.with_suffix(".parquet")
    try:
        import pyarrow.parquet as pq

        return {k.decode(): v.decode() for k, v in (pq.read_schema(idx).metadata or {}).items()}
    except Exception:
        return {}


def _join(rel: str, name: str) -> str:
    """``rel/name``, except that an absolute ``name`` stays absolute (and is refused)."""
    return name if name.startswith("/") else f"{rel}/{name}"


def _entries(path: Path, rel: str) -> tuple[list[tuple[str, str, Any]], dict[str, str]]:
    """(raw key, source, locator) of every latent of a file, and its metadata. Raises
    :class:`InputError` with a one-line reason for a malformed file."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                names = list(f.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{path.name}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None
        ours = "asyncvae_version" in meta
        if ours:
            return [(n, f"{path.name}#{n}", ("st", str(path), n)) for n in names], meta
        if len(names) == 1:
            return [(rel, path.name, ("st", str(path), names[0]))], meta
        return [(_join(rel, n), f"{path.name}#{n}", ("st", str(path), n)) for n in names], meta
    if suffix in (".pt", ".pth"):
        obj = _load_pt(str(path))
        if isinstance(obj, torch.Tensor):
            return [(rel, path.name, ("pt", str(path), None))], {}
        if isinstance(obj, dict):
            return [(_join(rel, str(k)), f"{path.name}#{k}", ("pt", str(path), k))
                    for k, v in obj.items() if isinstance(v, torch.Tensor)], {}
        raise InputError(f"{path.name}: holds a {type(obj).__name__}, not a tensor or a dict of tensors")
    if suffix == ".tar":
        out = []
        try:
            with tarfile.open(path, mode="r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.rpartition(".")
                    if ext in ("safetensors", "npy"):
                        out.append((key, f"{path.name}#{m.name}", ("tar", str(path), (m.offset_data, m.size, ext))))
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"{path.name}: not a readable .tar ({e})") from None
        return out, _sibling_meta(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
            t = pf.read(columns=["key", "status"])
        except Exception as e:
            raise InputError(f"{path.name}: not a readable parquet shard ({type(e).__name__}: {e})") from None
        keys, status = t.column("key").to_pylist(), t.column("status").to_pylist()
        return [(k, f"{path.name}#{k}", ("pq", str(path), i)) for i, (k, s) in enumerate(zip(keys, status, strict=True))
                if s == "ok"], meta
    raise InputError(f"{path}: unsupported latent file")


@functools.lru_cache(maxsize=4)
def _load_pt(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{os.path.basename(path)}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


_pt_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _pq_latents(path: str) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read(columns=["latent"]).column("latent")


def load_latent(loc: tuple[str, str, Any]) -> torch.Tensor:
    """One latent by its locator (runs in the pool)."""
    kind, path, what = loc
    if kind == "st":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(what)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{os.path.basename(path)}#{what}: unreadable tensor ({e})") from None
    if kind == "pt":
        with _pt_lock:
            obj = _load_pt(path)
        t = obj if what is None else obj[what]
        return t
    if kind == "tar":
        off, size, ext = what
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(size)
        try:
            if ext == "npy":
                return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
            from safetensors.torch import load

            return next(iter(load(data).values()))
        except Exception as e:
            raise InputError(f"{os.path.basename(path)}: unreadable member ({type(e).__name__}: {e})") from None
    if kind == "pq":
        return torch.from_numpy(np.asarray(_pq_latents(path)[what].as_py(), dtype=np.float32))
    raise InputError(f"unknown latent locator {kind!r}")  # pragma: no cover


def _to_batch(t: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{where}: not a tensor")
    lat = t.unsqueeze(0) if t.dim() == 3 else t
    if lat.dim() != 4:
        raise InputError(f"{where}: latent has shape {list(t.shape)}; expected [C,h,w] or [B,C,h,w]")
    if not lat.is_floating_point():
        raise InputError(f"{where}: latent has dtype {t.dtype}; expected a float tensor")
    return lat


def scaling_options(meta: dict[str, str], dec: DecodeSettings) -> dict[str, Any]:
    """Request options that undo the scaling of a file's latents (``do_scaling=False`` when
    they were stored unscaled and nothing overrides that)."""
    sf, sh = dec.scaling_factor, dec.shift_factor
    if sf is None and sh is None and meta.get("latents_scaled") == "true":
        sf = float(meta["scaling_factor"]) if meta.get("scaling_factor") else None
        sh = float(meta["shift_factor"]) if meta.get("shift_factor") else None
    if sf is None and sh is None:
        return {"do_scaling": False}
    return {"scaling_factor": 1.0 if sf is None else sf, "shift_factor": sh}


# --------------------------------------------------------------------------- units


def _encode_image(arr: np.ndarray, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if ext == "jpg":
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


class _File:
    """One latent input file as a pipeline unit."""

    def __init__(self, ctx: _Ctx, name: str, path: Path, rel: str) -> None:
        self.ctx = ctx
        self.name = name
        self.path = path
        self.rel = rel
        self.touched = False
        self.rows: list[dict[str, Any]] = []
        self.locs: list[Any] = []
        self.todo: list[int] = []
        self.remaining = 0
        self.options: dict[str, Any] = {}
        self.saves: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self.members: list[tuple[str, concurrent.futures.Future[bytes]]] = []
        self.t0 = time.perf_counter()

    def load(self, done_rows: dict[str, dict[str, Any]] | None) -> None:
        """List the file's latents (in a thread) and what an earlier run did."""
        entries, meta = _entries(self.path, self.rel)
        self.options = scaling_options(meta, self.ctx.dec)
        store = self.ctx.store
        for raw, source, loc in entries:
            row: dict[str, Any] = {"key": raw, "source": source, "status": "pending"}
            try:
                key = safe_key(raw)
                row["key"] = key
            except UnsafePath as e:
                row.update(status="failed", error_class="input", error_kind="input", error=str(e))
                self.rows.append(row)
                self.locs.append(None)
                continue
            old = (done_rows or {}).get(key)
            if old and old.get("status") == "ok" and self.ctx.dec.format != "webdataset":
                outs = json.loads(old.get("json") or "[]")
                if outs and all(store.exists(o) for o in outs):
                    self.rows.append({k: v for k, v in old.items() if v is not None})
                    self.locs.append(None)
                    continue
            self.rows.append(row)
            self.locs.append(loc)
        self.todo = [j for j, r in enumerate(self.rows) if r["status"] == "pending"]
        self.remaining = len(self.todo)

    def pending(self) -> Any:
        for j in self.todo:
            yield j, (self.locs[j], self.rows[j]["source"])

    def label(self, slot: int) -> str:
        return self.rows[slot]["source"]

    def accept(self, slot: int, result: Any) -> None:
        row = self.rows[slot]
        arrs = result.numpy()
        key = row["key"]
        names = [key] if len(arrs) == 1 else [f"{key}/{i:03d}" for i in range(len(arrs))]
        ctx = self.ctx
        outs = []
        for name, arr in zip(names, arrs, strict=True):
            if ctx.dec.format == "webdataset":
                self.members.append((f"{name}.png", ctx.pool.submit(_encode_image, arr, "png", 0)))
                outs.append(f"{self.name}.tar#{name}.png")
            else:
                rel = f"{name}.{ctx.ext}"
                ctx.store.path(rel)  # checked to stay under --out
                self.saves.append(ctx.pool.submit(_save, ctx.store, rel, arr, ctx.ext, ctx.dec.jpeg_quality))
                outs.append(rel)
        row.update(status="ok", shape=list(result.shape), json=json.dumps(outs))
        for k in ("error", "error_class", "error_kind"):
            row.pop(k, None)
        self.remaining -= 1

    async def wait_room(self) -> None:
        limit = 4 * self.ctx.workers
        while len(self.saves) > limit:
            await asyncio.wrap_future(self.saves.popleft())

    def reject(self, slot: int, error: BaseException, klass: str, kind: str) -> None:
        self.rows[slot].update(status="failed", error_class=klass, error_kind=kind, error=describe(error))
        self.remaining -= 1

    def finish(self) -> None:
        store = self.ctx.store
        for fut in self.saves:
            fut.result()
        self.saves.clear()
        store.remove(M.marker_name(self.name))
        if self.ctx.dec.format == "webdataset":
            with store.open_atomic(f"{self.name}.tar") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.GNU_FORMAT) as tf:
                for member, fut in self.members:
                    data = fut.result()
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tf.addfile(info, io.BytesIO(data))
            self.members = []
        with store.open_atomic(f"{self.name}.parquet") as f:
            write_index(f, self.rows, {"input": self.rel})
        endpoint_bad = sum(r["status"] == "failed" and r.get("error_class") != "input" for r in self.rows)
        pending = sum(r["status"] == "pending" for r in self.rows)
        ok = sum(r["status"] == "ok" for r in self.rows)
        if endpoint_bad == 0 and pending == 0:
            M.write_marker(store, self.name, {
                "unit": self.name, "input": self.rel, "count": len(self.rows), "ok": ok,
                "failures": len(self.rows) - ok, "endpoint": self.ctx.ident,
                "seconds": round(time.perf_counter() - self.t0, 3),
            })
            with self.ctx.lock:
                self.ctx.summary.shards_written += 1
        else:
            with self.ctx.lock:
                self.ctx.summary.shards_incomplete += 1


def _save(store: Storage, rel: str, arr: np.ndarray, ext: str, quality: int) -> None:
    if "/" in rel:
        store.makedirs(rel.rsplit("/", 1)[0])
    store.write_bytes(rel, _encode_image(arr, ext, quality), fsync=False)


class _Ctx:
    def __init__(self, store: Storage, dec: DecodeSettings, ident: list[str], summary: JobSummary, workers: int,
                 pool: concurrent.futures.Executor) -> None:
        self.store = store
        self.dec = dec
        self.ext = "jpg" if dec.format == "jpg" else "png"
        self.ident = ident
        self.summary = summary
        self.workers = workers
        self.pool = pool
        self.lock = threading.Lock()


def _prepare(arg: tuple[Any, str]) -> torch.Tensor:
    loc, source = arg
    return _to_batch(load_latent(loc), source)


# --------------------------------------------------------------------------- job


async def decode_dataset_async(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    endpoint: str | Sequence[str] | None = None,
    client: Client | None = None,
    settings: DecodeSettings | None = None,
    run: RunSettings | None = None,
    **kwargs: Any,
) -> JobSummary:
    """Decode latent shards or files back to images (the async core of ``asyncvae decode``).

    Args:
        inputs: latent files or folders (see the module docstring).
        out: the output folder, or an fsspec URL.
        endpoint: endpoint URL(s) or ``"builtin"``; required unless ``client`` is given.
        client: an open :class:`~asyncvae.Client` (left open).
        settings: a :class:`DecodeSettings`; run: a :class:`RunSettings`; or their fields
            as keywords (``format="jpg", concurrency=16, ...``).

    Returns:
        A :class:`JobSummary`; failed items are counted, classed and listed in the
        failures file. Raises like :func:`~asyncvae.jobs.encode_dataset_async`.
    """
    t_start = time.perf_counter()
    dec_kw, run_kw = split_kwargs(kwargs, DecodeSettings, RunSettings)
    if (settings is not None and dec_kw) or (run is not None and run_kw):
        raise InputError("pass either the settings objects or their fields as keywords, not both")
    dec = settings or DecodeSettings(**dec_kw)
    rs = run or RunSettings(**run_kw)
    ins = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files = await asyncio.to_thread(_find_files, ins)
    store = Storage(out)
    await asyncio.to_thread(store.ensure)
    urls = endpoint_identity(client.endpoints) if client is not None else resolve_endpoints(endpoint)
    if not files:
        raise InputError(f"no latent files (.safetensors, .pt, .tar, .parquet) found in {', '.join(map(str, ins))}")
    log = _logger("decode", rs.quiet)
    ident = endpoint_identity(urls)
    M.check_job(store, {"kind": "decode", "settings": dec.record(), "endpoint": ident,
                        "inputs": [os.path.basename(os.path.normpath(str(p))) for p in ins]},
                overwrite=rs.overwrite, allow_endpoint_change=rs.allow_endpoint_change, log=log)
    names: dict[str, int] = {}
    plan: list[tuple[str, Path, str]] = []
    for path, rel in files:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace("/", "__")).lstrip(".") or "_"
        n = names.get(base, 0)
        names[base] = n + 1
        plan.append((base if n == 0 else f"{base}-{n}", path, rel))
    mine = plan[rs.shard_index :: rs.num_shards]
    summary = JobSummary(out=str(store), endpoint=",".join(ident))
    workers = rs.workers or available_cpus()
    pool = concurrent.futures.ThreadPoolExecutor(max(2, workers), thread_name_prefix="asyncvae-decode")
    ctx = _Ctx(store, dec, ident, summary, workers, pool)
    failures: list[dict[str, Any]] = []
    units: list[_File] = []

    def setup() -> None:
        for name, path, rel in mine:
            marker = None if rs.overwrite else M.read_marker(store, name)
            if marker is not None and marker.get("input") == rel:
                summary.shards_skipped += 1
                summary.items += int(marker.get("count", 0))
                summary.ok += int(marker.get("ok", 0))
                if marker.get("failures"):
                    with contextlib.suppress(Exception):
                        failures.extend(_failure_rows(name, read_index(store.read_bytes(f"{name}.parquet"))))
                        summary.failures += int(marker["failures"])
                        summary.input_failures += int(marker["failures"])
                continue
            done = None
            if not rs.overwrite and store.exists(f"{name}.parquet"):
                with contextlib.suppress(Exception):
                    done = {r["key"]: r for r in read_index(store.read_bytes(f"{name}.parquet"))}
            unit = _File(ctx, name, path, rel)
            try:
                unit.load(done)
            except InputError as e:
                summary.items += 1
                summary.count("failed", "input")
                failures.append({"key": None, "source": path.name, "shard": name, "class": "input",
                                 "kind": "input", "reason": str(e)})
                log(f"skipping {path.name}: {e}")
                continue
            summary.items += len(unit.rows)
            for r in unit.rows:
                if r["status"] == "ok":
                    summary.ok += 1
                elif r["status"] == "failed":
                    summary.count("failed", "input")
            units.append(unit)

    try:
        await asyncio.to_thread(setup)
        if summary.shards_skipped:
            log(f"resuming: {summary.shards_skipped} of {len(mine)} input file(s) already complete")
        if units:
            groups: list[tuple[dict[str, Any], list[_File]]] = []
            for u in units:  # consecutive files with the same scaling share one decode_many
                if groups and groups[-1][0] == u.options:
                    groups[-1][1].append(u)
                else:
                    groups.append((u.options, [u]))
            out_opts = {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"}  # uint8 [B,H,W,3]
            runs = [Run({**opts, **out_opts}, group) for opts, group in groups]

            async def go(c: Client) -> None:
                todo = sum(u.remaining for u in units)
                prog = Progress(c, todo, "decode", enabled=not rs.quiet)
                base = JobSummary.client_totals(c.stats)
                try:
                    await run_pipeline(
                        c, runs, prepare=_prepare, wrap=lambda v, u, s: v, pool=pool,
                        settings=PipelineSettings("decode", depth=max(8, 2 * workers), writers=rs.writers),
                        summary=summary, guard=FailureGuard(rs.max_failure_rate), progress=prog,
                    )
                except JobAborted as e:
                    e.summary = summary  # type: ignore[attr-defined]
                    raise
                finally:
                    prog.close()
                    summary.add_client_usage(c.stats, base)
                    # results beyond the last write: decode returns uint8 [B,H,W,3]

            if client is not None:
                await go(client)
            else:
                async with open_client(urls, concurrency=rs.concurrency, retry=rs.retry, timeout=rs.timeout,
                                       token=rs.token, log=log) as c:
                    await go(c)
        for u in units:
            failures.extend(_failure_rows(u.name, u.rows))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    name = "failures.jsonl" if rs.num_shards == 1 else f"failures-{rs.shard_index:05d}-of-{rs.num_shards:05d}.jsonl"
    if failures:
        store.write_bytes(name, failures_text(failures))
        summary.failures_path = store.path(name) if store.local else f"{store.display.rstrip('/')}/{name}"
    else:
        store.remove(name)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _failure_rows(unit: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"key": r["key"], "source": r.get("source"), "shard": unit, "class": r.get("error_class") or "input",
         "kind": r.get("error_kind") or "input", "reason": r.get("error") or ""}
        for r in rows if r.get("status") == "failed"
    ]


def decode_dataset(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    **kwargs: Any,
) -> JobSummary:
    """Synchronous :func:`decode_dataset_async` (same arguments), usable in notebooks."""
    from .runner import run_sync

    return run_sync(decode_dataset_async(inputs, out, **kwargs))
