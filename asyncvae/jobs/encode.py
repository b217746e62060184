"""The encode job: images → latent shards (``asyncvae encode``, :func:`encode_dataset`).

Steps: check the inputs and ``--out`` → list the inputs (:mod:`.sources`) → create or
check ``job.json`` and extend the shard manifest (:mod:`.manifest`) → pick this
machine's shards → skip complete ones, reuse the done items of incomplete ones → run
the rest through the pipeline (:mod:`.pipeline`: a preprocessing pool →
``Client.encode_many`` → shard writers) → write the failures file.

Output layout (``OUT/``, a local folder or any fsspec URL)::

    job.json                      settings, endpoint (no token) and model identity
    manifest.arrow              which keys each shard holds (extended by later runs)
    shard-00000.safetensors       {key: latent [C, H/8, W/8]} + metadata   (--format safetensors)
    shard-00000.tar               <key>.npy + <key>.json (+ .txt/.cls)      (--format webdataset)
    shard-00000.parquet           the index: one row per input (key, source, caption, status,
                                  error class/kind/reason, size, crop, shape, sidecars);
                                  with --format parquet it also holds the latents
    shard-00000_stats.json        written last, only when the shard is complete
    failures.jsonl                key, source, class, kind, reason of every failed item
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..client import Client
from ..errors import InputError
from . import manifest as M
from .accounting import FailureGuard, JobSummary, Progress, failures_text
from .endpoint import JobAborted, endpoint_identity, open_client, resolve_endpoints
from .formats import (
    FORMATS,
    data_name,
    index_name,
    read_index,
    read_latents,
    write_index,
    write_shard,
)
from .pipeline import PipelineSettings, Run, run_pipeline
from .prep import (
    PROCESS_MIN_ITEMS,
    ImageSpec,
    Prepared,
    available_cpus,
    prepare_item,
    start_processes,
    thread_pool,
)
from .settings import LATENT_DTYPES, EncodeSettings, RunSettings, split_kwargs
from .sources import Item, check_inputs, scan_inputs
from .storage import Storage

__all__ = ["FORMATS", "LATENT_DTYPES", "encode_dataset", "encode_dataset_async"]


_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _version() -> str:
    from .. import __version__

    return __version__


def _fmt_float(v: float | None) -> str:
    return "" if v is None else repr(float(v))


class _Context:
    """What every shard of one run shares."""

    def __init__(self, store: Storage, enc: EncodeSettings, run: RunSettings, job: dict[str, Any],
                 summary: JobSummary, log: Any) -> None:
        self.store = store
        self.enc = enc
        self.run = run
        self.job = job
        self.summary = summary
        self.log = log
        self.dtype = _TORCH_DTYPES[enc.dtype]
        self.model_checked = False
        self.wrong_model = False
        self.manifest: _ManifestSave
        self.summary_lock = threading.Lock()
        self.meta = {
            "format": "pt",
            "asyncvae_version": _version(),
            "endpoint": ",".join(job["endpoint"]),
            "latents_scaled": "true" if (enc.scaling_factor is not None or enc.shift_factor is not None) else "false",
            "scaling_factor": _fmt_float(enc.scaling_factor),
            "shift_factor": _fmt_float(enc.shift_factor),
            "dtype": enc.dtype,
            "resolution": f"{enc.resolution[0]}x{enc.resolution[1]}",
            "crop": enc.crop,
            "alpha": enc.alpha,
            "wire_dtype": enc.wire_dtype,
            "layout": "one tensor per item, named by its key: [C, H/8, W/8]",
        }
        if job.get("model"):
            self.meta["latent_channels"] = str(job["model"].get("latent_channels", ""))

    def check_model(self, lat: torch.Tensor) -> None:
        """On the first result: the endpoint's model must be the dataset's."""
        if self.model_checked:
            return
        model = {"latent_channels": int(lat.shape[0]), "latent_downsample": int(self.enc.resolution[1] // lat.shape[-2])}
        why = M.model_mismatch(self.job, model)
        if why:
            self.wrong_model = True
            raise JobAborted(why)
        if not self.job.get("model"):
            M.record_model(self.store, self.job, model)
        self.meta["latent_channels"] = str(model["latent_channels"])
        self.model_checked = True


class _ManifestSave:
    """Saves a new shard plan in a thread while the job gets going (it is off the
    critical path of an extending run); shards wait for it before they are written."""

    def __init__(self, store: Storage, plan: M.Manifest | None) -> None:
        self.error: BaseException | None = None
        self.done = threading.Event()
        if plan is None:
            self.done.set()
            return

        def save() -> None:
            try:
                M.save_manifest(store, plan)
            except BaseException as e:
                self.error = e
            finally:
                self.done.set()

        threading.Thread(target=save, name="asyncvae-manifest", daemon=True).start()

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class _Shard:
    """One output shard as a pipeline unit."""

    def __init__(self, ctx: _Context, plan: M.ShardPlan, items: dict[str, Item]) -> None:
        self.ctx = ctx
        self.name = plan.name
        self.plan = plan
        self.touched = False
        self.t0 = time.perf_counter()
        self.items: list[Item | None] = [items.get(k) for k in plan.keys]
        self.rows: list[dict[str, Any]] = []
        for key, it in zip(plan.keys, self.items, strict=True):
            row: dict[str, Any] = {"key": key, "source": it.source if it else None, "status": "pending"}
            if it is not None and it.caption is not None:
                row["caption"] = it.caption
            if it is not None and it.extra:
                row["extra"] = dict(it.extra)
            self.rows.append(row)
        self.latents: list[torch.Tensor | None] = [None] * len(plan.keys)
        self.todo: list[int] = list(range(len(plan.keys)))
        self.remaining = len(self.todo)

    # ---- resume
    def reuse(self, retry_failed: bool) -> tuple[int, int]:
        """Take the done items of an earlier, incomplete run of this shard; returns
        (reused ok, reused input failures)."""
        store, fmt = self.ctx.store, self.ctx.enc.format
        try:
            old_rows = {r["key"]: r for r in read_index(store.read_bytes(index_name(self.name)))}
            old_lat = read_latents(store.read_bytes(data_name(self.name, fmt)), fmt) if any(
                r["status"] == "ok" for r in old_rows.values()) else {}
        except Exception:
            return 0, 0
        ok = bad = 0
        todo = []
        for j in self.todo:
            key = self.plan.keys[j]
            old = old_rows.get(key)
            if old and old["status"] == "ok" and key in old_lat:
                self.rows[j] = {k: v for k, v in old.items() if v is not None}
                if isinstance(self.rows[j].get("extra"), str):
                    self.rows[j]["extra"] = json.loads(self.rows[j]["extra"])
                self.latents[j] = old_lat[key].to(self.ctx.dtype)
                ok += 1
            elif old and old["status"] == "failed" and old.get("error_class") == "input" and not retry_failed:
                self.rows[j] = {k: v for k, v in old.items() if v is not None}
                if isinstance(self.rows[j].get("extra"), str):
                    self.rows[j]["extra"] = json.loads(self.rows[j]["extra"])
                bad += 1
            else:
                todo.append(j)
        self.todo = todo
        self.remaining = len(todo)
        return ok, bad

    # ---- pipeline unit
    def pending(self) -> Any:
        for j in self.todo:
            it = self.items[j]
            if it is None:
                continue
            yield j, it

    def missing(self) -> list[int]:
        """Slots whose input is gone from the listing (kept keys of an earlier plan)."""
        return [j for j in self.todo if self.items[j] is None]

    def label(self, slot: int) -> str:
        return self.rows[slot].get("source") or self.rows[slot]["key"]

    def take(self, slot: int, p: Prepared) -> Any:
        row = self.rows[slot]
        row["width"], row["height"] = int(p.size[0]), int(p.size[1])
        row["crop"] = [float(v) for v in p.crop]
        side = p.sidecars
        if "txt" in side and row.get("caption") is None:
            row["caption"] = side["txt"]
        if "json" in side:
            row["json"] = side["json"]
        if "cls" in side:
            row["cls"] = side["cls"].strip()
        if self.ctx.enc.wire_dtype == "png":
            from PIL import Image

            return Image.fromarray(p.array)
        return torch.from_numpy(p.array).unsqueeze(0)

    def accept(self, slot: int, result: Any) -> None:
        lat = result[0] if result.dim() == 4 and result.shape[0] == 1 else result
        self.ctx.check_model(lat)
        self.latents[slot] = lat.to(self.ctx.dtype).contiguous()
        row = self.rows[slot]
        row["status"] = "ok"
        row["shape"] = list(lat.shape)
        for k in ("error", "error_class", "error_kind"):
            row.pop(k, None)
        self.remaining -= 1

    def reject(self, slot: int, error: BaseException, klass: str, kind: str) -> None:
        from .endpoint import describe

        row = self.rows[slot]
        row.update(status="failed", error_class=klass, error_kind=kind, error=describe(error))
        self.remaining -= 1

    def finish(self) -> None:
        """Write data, index, then (only when complete) the marker."""
        if self.ctx.wrong_model:
            return
        self.ctx.manifest.wait()  # no shard before the plan it belongs to is on disk
        store, fmt = self.ctx.store, self.ctx.enc.format
        store.remove(M.marker_name(self.name))
        ok = sum(r["status"] == "ok" for r in self.rows)
        input_bad = sum(r["status"] == "failed" and r.get("error_class") == "input" for r in self.rows)
        endpoint_bad = sum(r["status"] == "failed" and r.get("error_class") != "input" for r in self.rows)
        pending = sum(r["status"] == "pending" for r in self.rows)
        meta = dict(self.ctx.meta, shard=self.name, count=str(ok), keys_sha256=self.plan.digest)
        if self.plan.unit:
            meta["input_shard"] = self.plan.unit
        with store.open_atomic(data_name(self.name, fmt)) as f:
            write_shard(f, fmt, self.rows, self.latents, meta)
        if fmt != "parquet":
            with store.open_atomic(index_name(self.name)) as f:
                write_index(f, self.rows, meta)
        complete = endpoint_bad == 0 and pending == 0
        if complete:
            M.write_marker(store, self.name, {
                "shard": self.name,
                "count": len(self.rows),
                "ok": ok,
                "failures": input_bad,
                "input_failures": input_bad,
                "endpoint_failures": 0,
                "keys_sha256": self.plan.digest,
                "first_key": self.rows[0]["key"] if self.rows else None,
                "last_key": self.rows[-1]["key"] if self.rows else None,
                "endpoint": self.ctx.job["endpoint"],
                "model": self.ctx.job.get("model"),
                "seconds": round(time.perf_counter() - self.t0, 3),
                "files": {data_name(self.name, fmt): store.size(data_name(self.name, fmt))},
            })
        store.sync()
        with self.ctx.summary_lock:
            if complete:
                self.ctx.summary.shards_written += 1
            else:
                self.ctx.summary.shards_incomplete += 1
        self.latents = []  # free memory


def _failure_rows(shard: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"key": r["key"], "source": r.get("source"), "shard": shard, "class": r.get("error_class") or "input",
         "kind": r.get("error_kind") or "input", "reason": r.get("error") or ""}
        for r in rows if r.get("status") == "failed"
    ]


def _make_settings(settings: EncodeSettings | None, run: RunSettings | None, kwargs: dict[str, Any]) -> tuple[EncodeSettings, RunSettings]:
    enc_kw, run_kw = split_kwargs(kwargs, EncodeSettings, RunSettings)
    if settings is not None and enc_kw:
        raise InputError("pass either settings=EncodeSettings(...) or its fields as keywords, not both")
    if run is not None and run_kw:
        raise InputError("pass either run=RunSettings(...) or its fields as keywords, not both")
    return settings or EncodeSettings(**enc_kw), run or RunSettings(**run_kw)


async def encode_dataset_async(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    endpoint: str | Sequence[str] | None = None,
    client: Client | None = None,
    settings: EncodeSettings | None = None,
    run: RunSettings | None = None,
    **kwargs: Any,
) -> JobSummary:
    """Encode a dataset of images into latent shards (the async core of ``asyncvae encode``).

    Args:
        inputs: image folders (recursive), ``.txt``/``.csv`` lists of paths, WebDataset
            ``.tar`` shards or image files.
        out: the output folder, or any fsspec URL (``memory://...``, ``s3://...``).
        endpoint: endpoint URL(s), or ``"builtin"`` for the built-in demo model started in
            this process. Required unless ``client`` is given.
        client: an open :class:`~asyncvae.Client` to use (left open).
        settings: an :class:`EncodeSettings`; run: a :class:`RunSettings`. Their fields
            may be passed as keywords instead (``resolution=512, concurrency=64, ...``).

    Returns:
        A :class:`JobSummary`. Failed items do not raise; they are counted, classed
        (``input`` / ``endpoint``) and listed in the failures file.

    Raises:
        InputError: bad arguments, a folder holding another job, listing problems.
        JobAborted: the endpoint refused the job (401/403/404), failures passed
            ``max_failure_rate``, or its model differs from the dataset's.
    """
    t_start = time.perf_counter()
    enc, rs = _make_settings(settings, run, kwargs)
    ins = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not ins:
        raise InputError("no INPUT given: pass image folders, .txt/.csv lists or .tar shards (or --demo)")
    check_inputs(ins)  # cheap checks first, in the loop: no thread exists yet (see start_processes)
    store = Storage(out)
    store.ensure()
    urls = endpoint_identity(client.endpoints) if client is not None else resolve_endpoints(endpoint)
    procs = start_processes(rs.workers) if rs.pool in ("process", "auto") else None
    try:
        return await _encode(ins, store, urls, client, enc, rs, procs, t_start)
    finally:
        if procs is not None:
            procs.shutdown(wait=False, cancel_futures=True)


async def _encode(ins: list[Any], store: Storage, urls: list[str], client: Client | None, enc: EncodeSettings,
                  rs: RunSettings, procs: Any, t_start: float) -> JobSummary:
    log = _logger("encode", rs.quiet)

    listing = await asyncio.to_thread(scan_inputs, ins)
    if listing.problems and not rs.skip_bad_inputs:
        where, what = listing.problems[0]
        more = f" (and {len(listing.problems) - 1} more)" if len(listing.problems) > 1 else ""
        raise InputError(f"{where}: {what}{more}; fix it, or pass --skip-bad-inputs to go on without it")
    for where, what in listing.problems:
        log(f"skipping bad input: {where}: {what}")
    if not listing.items:
        raise InputError(f"no images (.jpg .jpeg .png .webp) found in {', '.join(map(str, ins))}")

    ident = endpoint_identity(urls)
    job = M.check_job(store, {
        "kind": "encode", "settings": enc.record(), "endpoint": ident,
        "inputs": [os.path.basename(os.path.normpath(str(p))) for p in ins],
    }, overwrite=rs.overwrite, allow_endpoint_change=rs.allow_endpoint_change, log=log)

    old = None if rs.overwrite else await asyncio.to_thread(M.load_manifest, store)
    plan = M.plan_shards(listing.items, listing.units, enc.shard_size, old)
    if rs.overwrite and rs.shard_index == 0:
        await asyncio.to_thread(_remove_stale, store, plan)  # reads the previous manifest first
    manifest_saved = _ManifestSave(store, plan if old is None or not plan.same_plan(old) else None)
    known = {it.key for it in listing.items}
    gone = sum(1 for s in plan.shards for k in s.keys if k not in known)
    if gone:
        log(f"{gone} item(s) of earlier runs are no longer in the inputs; their shards are kept "
            "(pass --overwrite to rebuild from the current inputs)")

    mine = [plan.shards[p] for p in range(rs.shard_index, len(plan.shards), rs.num_shards)]
    summary = JobSummary(out=str(store), items=sum(len(s.keys) for s in mine), endpoint=",".join(ident))
    ctx = _Context(store, enc, rs, job, summary, log)
    ctx.manifest = manifest_saved
    by_key = {it.key: it for it in listing.items}
    failures: list[dict[str, Any]] = []
    units: list[_Shard] = []

    def setup() -> None:
        if rs.overwrite:
            for s in mine:
                store.remove(M.marker_name(s.name))
        store.clean_temps({s.name for s in mine})
        for s in mine:
            marker = None if rs.overwrite else M.read_marker(store, s.name)
            complete = (marker is not None and marker.get("keys_sha256") == s.digest
                        and store.exists(data_name(s.name, enc.format)))
            if complete and not (rs.retry_failed and marker.get("failures")):
                summary.shards_skipped += 1
                summary.ok += int(marker.get("ok", 0))
                summary.failures += int(marker.get("failures", 0))
                summary.input_failures += int(marker.get("failures", 0))
                if marker.get("failures"):
                    try:
                        rows = read_index(store.read_bytes(index_name(s.name)))
                    except Exception:
                        rows = []
                    failures.extend(_failure_rows(s.name, rows))
                continue
            unit = _Shard(ctx, s, by_key)
            if not rs.overwrite:
                ok, bad = unit.reuse(rs.retry_failed)
                summary.ok += ok
                summary.failures += bad
                summary.input_failures += bad
            units.append(unit)

    await asyncio.to_thread(setup)
    if summary.shards_skipped:
        log(f"resuming: {summary.shards_skipped} of {len(mine)} shard(s) already complete")
    todo = sum(unit.remaining for unit in units)
    summary.extra["listing_problems"] = len(listing.problems)
    failures.extend({"key": None, "source": where, "shard": None, "class": "input", "kind": "listing", "reason": what}
                    for where, what in listing.problems)

    try:
        if units:
            await _run(ctx, client, urls, units, todo, summary, rs, procs)
    finally:
        await asyncio.to_thread(manifest_saved.wait)
    for unit in units:
        failures.extend(_failure_rows(unit.name, unit.rows))
    _write_failures(store, rs, failures, summary)
    summary.seconds = time.perf_counter() - t_start
    return summary


async def _run(ctx: _Context, client: Client | None, urls: list[str], units: list[_Shard], todo: int,
               summary: JobSummary, rs: RunSettings, procs: Any) -> None:
    enc = ctx.enc
    spec = ImageSpec(enc.resolution, enc.crop, enc.alpha, enc.wire_dtype, enc.max_pixels, enc.resample)
    workers = rs.workers or available_cpus()

    def wrap(value: Prepared, unit: Any, slot: int) -> Any:
        return unit.take(slot, value)

    async def go(c: Client) -> None:
        # slots whose input vanished from the listing fail as input errors, before sending
        for unit in units:
            for j in unit.missing():
                unit.reject(j, InputError(f"{unit.rows[j]['key']}: no longer in the inputs"), "input", "input")
                summary.processed += 1
                summary.count("failed", "input")
        use_procs = procs is not None and (rs.pool == "process" or todo >= PROCESS_MIN_ITEMS)
        pool = procs if use_procs else (thread_pool(workers) if todo else None)
        prog = Progress(c, todo, "encode", enabled=not rs.quiet)
        base = JobSummary.client_totals(c.stats)
        try:
            await run_pipeline(
                c, [Run({"scaling_factor": enc.scaling_factor, "shift_factor": enc.shift_factor}, units)],
                prepare=functools.partial(prepare_item, spec=spec), wrap=wrap, pool=pool,
                settings=PipelineSettings("encode", depth=max(8, 4 * workers), writers=rs.writers, quiet=rs.quiet),
                summary=summary, guard=FailureGuard(rs.max_failure_rate), progress=prog,
            )
        except JobAborted as e:
            e.summary = summary  # type: ignore[attr-defined]
            raise
        finally:
            prog.close()
            if pool is not None and pool is not procs:
                pool.shutdown(wait=False, cancel_futures=True)
            summary.add_client_usage(c.stats, base)

    if client is not None:
        await go(client)
        return
    async with open_client(urls, concurrency=rs.concurrency, retry=rs.retry, timeout=rs.timeout,
                           token=rs.token, log=ctx.log) as c:
        await go(c)


def _remove_stale(store: Storage, plan: M.Manifest) -> None:
    """--overwrite: remove the files of shards the new plan no longer has — shards of the
    previous manifest, and ``shard-NNNNN`` files; never other files in ``--out``."""
    try:
        previous = M.load_manifest(store)
    except InputError:
        previous = None
    known = {s.name for s in previous.shards} if previous else set()
    planned = {s.name for s in plan.shards}
    suffixes = (".safetensors", ".tar", ".parquet", "_stats.json")
    for name in store.listdir():
        for suf in suffixes:
            if name.endswith(suf):
                base = name[: -len(suf)]
                if base not in planned and (base in known or M._LOOSE.match(base)):
                    store.remove(name)
                break


def _write_failures(store: Storage, rs: RunSettings, rows: list[dict[str, Any]], summary: JobSummary) -> None:
    name = "failures.jsonl" if rs.num_shards == 1 else f"failures-{rs.shard_index:05d}-of-{rs.num_shards:05d}.jsonl"
    if rows:
        store.write_bytes(name, failures_text(rows))
        summary.failures_path = store.path(name) if store.local else f"{store.display.rstrip('/')}/{name}"
    else:
        store.remove(name)


def _logger(command: str, quiet: bool) -> Any:
    import sys

    def log(msg: str) -> None:
        if not quiet:
            print(f"asyncvae {command}: {msg}", file=sys.stderr, flush=True)

    return log


def encode_dataset(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    **kwargs: Any,
) -> JobSummary:
    """Synchronous :func:`encode_dataset_async` (same arguments) for scripts and
    notebooks; works inside Jupyter's running loop. A ``client`` passed here must not
    have been used on another event loop yet."""
    from .runner import run_sync

    return run_sync(encode_dataset_async(inputs, out, **kwargs))

