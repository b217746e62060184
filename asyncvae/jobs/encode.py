"""The encode job: images → latent shards (``asyncvae encode``, :func:`encode_dataset`).

Pipeline: list inputs (sorted, stable keys) → pick this worker's shards → skip the
complete ones (resume) → read + preprocess images in a thread pool, a bounded
number ahead → ``Client.encode_many`` (ordered, failures yielded in place) → collect
each shard's latents → write the shard atomically in a thread (data, index, then
``_stats.json`` last as the completion marker).

Output layout (``OUT/``)::

    job.json                      settings of the job (checked on resume)
    shard-00000.safetensors       {key: latent [C, H/8, W/8]} + metadata   (--format safetensors)
    shard-00000.tar               <key>.safetensors + <key>.json per item   (--format webdataset)
    shard-00000.jsonl             one line per input: key, source, status, size, crop, error
    shard-00000_stats.json        count, ok, failures, seconds — written last
    failures.jsonl                key, source, reason of every failed item (only if any)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..client import Client
from ..config import Retry, Timeout
from ..errors import InputError, ItemError
from . import shards as S
from ._common import (
    JobSummary,
    Progress,
    describe_error,
    finish,
    job_client,
    log,
    prepare_out,
    run_sync,
    write_jsonl,
)
from .preprocess import (
    ALPHA_MODES,
    CROP_MODES,
    WIRE_DTYPES,
    load_image,
    parse_resolution,
    to_wire_tensor,
)
from .sources import Item, list_inputs, read_item, select_shards

__all__ = ["FORMATS", "LATENT_DTYPES", "encode_dataset", "encode_dataset_async", "shard_name"]

FORMATS = ("safetensors", "webdataset")
LATENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(g: int) -> str:
    """``shard-00042`` for global shard number 42."""
    return f"shard-{g:05d}"


def _version() -> str:
    from .. import __version__

    return __version__


def _fmt_float(v: float | None) -> str:
    return "" if v is None else repr(float(v))


class _Shard:
    __slots__ = ("g", "items", "latents", "remaining", "rows", "t0")

    def __init__(self, g: int, items: list[Item]) -> None:
        self.g = g
        self.items = items
        self.rows: list[dict[str, Any]] = [
            {"key": it.key, "source": it.source, "status": "pending"} for it in items
        ]
        self.latents: list[torch.Tensor | None] = [None] * len(items)
        self.remaining = len(items)
        self.t0 = time.perf_counter()

    def fail(self, j: int, reason: str) -> None:
        row = self.rows[j]
        row["status"] = "failed"
        row["error"] = reason


def _data_path(out: Path, g: int, fmt: str) -> Path:
    return out / (shard_name(g) + (".safetensors" if fmt == "safetensors" else ".tar"))


def _complete_stats(out: Path, g: int, fmt: str) -> dict[str, Any] | None:
    """The stats of a complete shard (marker present, data and index files there)."""
    marker = out / f"{shard_name(g)}_stats.json"
    try:
        stats = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not (out / f"{shard_name(g)}.jsonl").is_file():
        return None
    if stats.get("ok", 1) and not _data_path(out, g, fmt).is_file():
        return None
    return stats


def _failed_rows(out: Path, g: int) -> list[dict[str, Any]]:
    rows = []
    with contextlib.suppress(OSError):
        for line in (out / f"{shard_name(g)}.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("status") != "ok":
                    rows.append({"key": r.get("key"), "source": r.get("source"), "reason": r.get("error", "")})
    return rows


def _clean_temps(out: Path, names: set[str]) -> None:
    for p in out.glob(".shard-*.tmp"):
        base = p.name[1:].split(".", 1)[0].replace("_stats", "")
        if base in names:
            with contextlib.suppress(OSError):
                p.unlink()


def _write_shard(out: Path, sh: _Shard, fmt: str, meta: dict[str, str]) -> dict[str, Any]:
    """Write one shard: data file, index, then the stats marker (each atomically)."""
    name = shard_name(sh.g)
    ok = [(row["key"], t) for row, t in zip(sh.rows, sh.latents, strict=True) if t is not None]
    shard_meta = dict(meta, shard=str(sh.g), count=str(len(ok)))
    data_path = _data_path(out, sh.g, fmt)
    if fmt == "safetensors":
        S.atomic_write(data_path, S.safetensors_bytes(ok, shard_meta))
    else:
        members: list[tuple[str, bytes]] = []
        by_key = {r["key"]: r for r in sh.rows}
        for key, t in ok:
            members.append((f"{key}.safetensors", S.safetensors_bytes([("latent", t)], meta)))
            members.append((f"{key}.json", json.dumps(by_key[key], sort_keys=True).encode()))
        S.atomic_write(data_path, S.tar_bytes(members))
    write_jsonl(out / f"{name}.jsonl", sh.rows)
    S.fsync_dir(out)
    failures = sum(r["status"] != "ok" for r in sh.rows)
    stats = {
        "shard": sh.g,
        "count": len(sh.rows),
        "ok": len(ok),
        "failures": failures,
        "seconds": round(time.perf_counter() - sh.t0, 3),
        "finished_at": time.time(),
        "first_key": sh.rows[0]["key"],
        "last_key": sh.rows[-1]["key"],
        "files": {data_path.name: data_path.stat().st_size},
    }
    S.atomic_write(out / f"{name}_stats.json", json.dumps(stats, indent=1) + "\n")
    S.fsync_dir(out)
    sh.latents = []  # free memory
    return stats


def _prep(item: Item, res: tuple[int, int], crop: Any, alpha: Any, wire: str) -> tuple[Any, list[int], list[float]]:
    try:
        data = read_item(item)
    except OSError as e:
        raise InputError(f"cannot read {item.source}: {e.strerror or e}") from None
    p = load_image(data, res, crop, alpha)
    return to_wire_tensor(p.pixels, wire), list(p.size), list(p.crop)


async def encode_dataset_async(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    endpoint: str | Sequence[str] | None = None,
    resolution: int | str | tuple[int, int] = 512,
    crop: str = "center",
    alpha: str = "white",
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    dtype: str = "float16",
    wire_dtype: str = "float16",
    shard_size: int = 1000,
    format: str = "safetensors",
    concurrency: int = 32,
    workers: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    retry_failed: bool = False,
    quiet: bool = False,
    client: Client | None = None,
    retry: Retry | None = None,
    timeout: Timeout | None = None,
    token: str | bool | None = None,
) -> JobSummary:
    """Encode a dataset of images into latent shards (the async core of ``asyncvae encode``).

    Args:
        inputs: image folders (recursive), ``.txt``/``.csv`` lists of paths, WebDataset
            ``.tar`` shards or image files; listed in a deterministic order.
        out: the output folder (created).
        endpoint: one or more endpoint URLs; ``None`` (and no ``client``) starts the
            built-in reference server in this process.
        resolution: ``512`` or ``"WxH"`` (multiples of 8).
        crop: ``"center"`` (resize the shorter side, centre crop) or ``"none"`` (resize
            to exactly ``W x H``).
        alpha: transparent images are composited on ``"white"`` / ``"black"`` or their
            alpha is ``"drop"``-ped.
        scaling_factor, shift_factor: sent to the endpoint, which stores
            ``(latents - shift) * scaling``; recorded in the shard metadata.
        dtype: stored latent dtype: ``float16``, ``bfloat16`` or ``float32``.
        wire_dtype: how pixels are sent: ``float16`` (default) / ``float32`` tensors in
            [-1, 1], ``uint8`` tensors, or ``png``.
        shard_size: items per shard.
        format: ``"safetensors"`` (one file per shard) or ``"webdataset"`` (a ``.tar``
            with ``<key>.safetensors`` and ``<key>.json`` per item).
        concurrency: requests in flight.
        workers: preprocessing threads (default: CPU count).
        shard_index, num_shards: write only shards ``g`` with ``g % num_shards == shard_index``.
        overwrite: redo every shard (default: skip complete shards and redo partial ones).
        retry_failed: also redo complete shards that recorded failures.
        quiet: no progress bar, no notices.
        client: an open :class:`~asyncvae.Client` to use (left open).
        retry, timeout, token: for the client this function makes.

    Returns:
        A :class:`JobSummary`. Failed items do not raise; they are counted and listed
        in ``failures.jsonl``.
    """
    t_start = time.perf_counter()
    res = parse_resolution(resolution)
    if crop not in CROP_MODES:
        raise InputError(f"crop={crop!r} must be one of {', '.join(CROP_MODES)}")
    if alpha not in ALPHA_MODES:
        raise InputError(f"alpha={alpha!r} must be one of {', '.join(ALPHA_MODES)}")
    if dtype not in LATENT_DTYPES:
        raise InputError(f"dtype={dtype!r} must be one of {', '.join(LATENT_DTYPES)}")
    if wire_dtype not in WIRE_DTYPES:
        raise InputError(f"wire dtype {wire_dtype!r} must be one of {', '.join(WIRE_DTYPES)}")
    if format not in FORMATS:
        raise InputError(f"format={format!r} must be one of {', '.join(FORMATS)}")
    out_dir = prepare_out(out)
    items = await asyncio.to_thread(list_inputs, inputs)
    if not items:
        raise InputError(f"no images (.jpg .jpeg .png .webp) found in {inputs!s}")
    mine = select_shards(len(items), shard_size, shard_index, num_shards)

    job = {
        "kind": "encode",
        "format": format,
        "resolution": f"{res[0]}x{res[1]}",
        "crop": crop,
        "alpha": alpha,
        "dtype": dtype,
        "wire_dtype": wire_dtype,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "shard_size": shard_size,
        "items": len(items),
        "keys_sha256": hashlib.sha256("\n".join(i.key for i in items).encode()).hexdigest(),
    }
    job_path = out_dir / "job.json"
    if job_path.exists() and not overwrite:
        try:
            old = json.loads(job_path.read_text())
        except ValueError:
            old = {}
        diff = sorted(k for k in job if old.get(k) != job[k])
        if old and diff:
            raise InputError(
                f"{out_dir} holds a job with other settings or inputs ({', '.join(diff)} differ); "
                "pass --overwrite to replace it, or choose another --out"
            )
    S.atomic_write(job_path, json.dumps(job, indent=1, sort_keys=True) + "\n")

    summary = JobSummary(out=out_dir, items=sum(len(items[g * shard_size : (g + 1) * shard_size]) for g in mine))
    failures: dict[int, list[dict[str, Any]]] = {}
    pending: list[int] = []
    for g in mine:
        if overwrite:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / f"{shard_name(g)}_stats.json").unlink()
            pending.append(g)
            continue
        st = _complete_stats(out_dir, g, format)
        if st is None or (retry_failed and st.get("failures")):
            pending.append(g)
            continue
        summary.shards_skipped += 1
        summary.ok += int(st.get("ok", 0))
        summary.failures += int(st.get("failures", 0))
        failures[g] = _failed_rows(out_dir, g)
    _clean_temps(out_dir, {shard_name(g) for g in pending})
    if summary.shards_skipped:
        log(f"asyncvae encode: resuming; {summary.shards_skipped} of {len(mine)} shard(s) already complete", quiet)

    if pending:
        async with job_client(
            endpoint, client, concurrency=concurrency, retry=retry, timeout=timeout, token=token,
            quiet=quiet, command="encode",
        ) as (c, label):
            summary.endpoint = label
            meta = {
                "format": "pt",
                "asyncvae_version": _version(),
                "endpoint": label,
                "latents_scaled": "true" if (scaling_factor is not None or shift_factor is not None) else "false",
                "scaling_factor": _fmt_float(scaling_factor),
                "shift_factor": _fmt_float(shift_factor),
                "dtype": dtype,
                "resolution": f"{res[0]}x{res[1]}",
                "crop": crop,
                "alpha": alpha,
                "wire_dtype": wire_dtype,
                "layout": "one tensor per item, named by its key: [C, H/8, W/8]",
            }
            await _run_shards(
                c, items, pending, shard_size, out_dir, format, meta, res, crop, alpha,
                wire_dtype, LATENT_DTYPES[dtype], scaling_factor, shift_factor,
                workers or max(2, os.cpu_count() or 1), summary, failures, quiet,
            )

    fail_name = "failures.jsonl" if num_shards == 1 else f"failures-{shard_index:05d}-of-{num_shards:05d}.jsonl"
    rows = [r for g in sorted(failures) for r in failures[g]]
    return finish(summary, out_dir / fail_name, rows, t_start)


async def _run_shards(
    client: Client,
    items: list[Item],
    pending: list[int],
    shard_size: int,
    out: Path,
    fmt: str,
    meta: dict[str, str],
    res: tuple[int, int],
    crop: Any,
    alpha: Any,
    wire: str,
    out_dtype: torch.dtype,
    scaling_factor: float | None,
    shift_factor: float | None,
    workers: int,
    summary: JobSummary,
    failures: dict[int, list[dict[str, Any]]],
    quiet: bool,
) -> None:
    shards = [_Shard(g, items[g * shard_size : (g + 1) * shard_size]) for g in pending]
    total = sum(len(s.items) for s in shards)
    stats = client.stats
    bytes0 = JobSummary.client_totals(stats)
    prog = Progress(client, total, "encode", enabled=not quiet)
    writers: list[asyncio.Task[dict[str, Any]]] = []
    sent: collections.deque[tuple[_Shard, int]] = collections.deque()
    loop = asyncio.get_running_loop()
    ex = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="asyncvae-prep")
    depth = max(4 * workers, 8)

    def check_writers() -> None:
        for w in writers:
            if w.done() and not w.cancelled() and w.exception() is not None:
                raise w.exception()  # type: ignore[misc]

    def account(sh: _Shard, failed: bool) -> None:
        sh.remaining -= 1
        summary.processed += 1
        if failed:
            summary.failures += 1
        else:
            summary.ok += 1
        prog.advance(failed=failed)
        if sh.remaining == 0:
            failures[sh.g] = [
                {"key": r["key"], "source": r["source"], "reason": r.get("error", "")}
                for r in sh.rows if r["status"] != "ok"
            ]
            writers.append(loop.create_task(asyncio.to_thread(_write_shard, out, sh, fmt, meta)))
            check_writers()

    async def feed() -> Any:
        flat = ((sh, j, it) for sh in shards for j, it in enumerate(sh.items))
        q: collections.deque[tuple[tuple[_Shard, int, Item], asyncio.Future[Any]]] = collections.deque()

        def fill() -> None:
            while len(q) < depth:
                nxt = next(flat, None)
                if nxt is None:
                    return
                q.append((nxt, loop.run_in_executor(ex, _prep, nxt[2], res, crop, alpha, wire)))

        fill()
        try:
            while q:
                (sh, j, _item), fut = q.popleft()
                fill()
                try:
                    wire_value, size, box = await fut
                except Exception as e:
                    sh.fail(j, describe_error(e))
                    account(sh, failed=True)
                    continue
                sh.rows[j].update(size=size, crop=box)
                sent.append((sh, j))
                yield wire_value
        finally:
            for _, fut in q:
                fut.cancel()

    try:
        opts = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
        async with contextlib.aclosing(client.encode_many(feed(), ordered=True, on_error="yield", **opts)) as results:
            async for r in results:
                sh, j = sent.popleft()
                if isinstance(r, ItemError):
                    sh.fail(j, describe_error(r.error))
                    account(sh, failed=True)
                    continue
                lat = r[0] if r.dim() == 4 and r.shape[0] == 1 else r
                sh.latents[j] = lat.to(out_dtype).contiguous()
                sh.rows[j]["status"] = "ok"
                sh.rows[j]["shape"] = list(lat.shape)
                account(sh, failed=False)
        for sh in shards:  # shards whose last items failed in preprocessing, after the stream
            if sh.remaining:
                raise AssertionError(f"shard {sh.g} has {sh.remaining} unaccounted items")  # pragma: no cover
        for st in await asyncio.gather(*writers):
            summary.shards_written += 1
            del st
    finally:
        prog.close()
        ex.shutdown(wait=False, cancel_futures=True)
        if writers:
            await asyncio.gather(*writers, return_exceptions=True)
        summary.add_client_usage(stats, bytes0)


def encode_dataset(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    **kwargs: Any,
) -> JobSummary:
    """Synchronous :func:`encode_dataset_async` (same arguments) for scripts and
    notebooks; works inside Jupyter's running loop. A ``client`` passed here must not
    have been used on another event loop yet."""
    return run_sync(encode_dataset_async(inputs, out, **kwargs))
