"""The decode job: latent shards → images (``asyncvae decode``, :func:`decode_dataset`).

Inputs: shards written by ``asyncvae encode`` (``shard-*.safetensors``, or
WebDataset ``shard-*.tar`` of ``<key>.safetensors``), or any folder of
``.safetensors`` / ``.pt`` files. In an ``asyncvae`` shard every tensor is one item
named by its key; in other safetensors files a single tensor is named by the file's
stem, several by ``<stem>/<tensor name>``; a ``.pt`` file may hold a tensor or a dict
of tensors. Latents are ``[C, h, w]`` or ``[B, C, h, w]`` (B > 1 gives
``<key>/000``, ``<key>/001``, ...).

Scaling: latents whose shard metadata says they were scaled are decoded with the
recorded ``scaling_factor``/``shift_factor``; others with none (``do_scaling=False``)
unless ``scaling_factor`` is given, which overrides the metadata.

The endpoint is asked for ``output_type="pt", partial_postprocess=True,
return_type="pt"`` (uint8 ``[B, H, W, 3]``); images are encoded and written in a
thread pool. Output: ``OUT/<key>.png`` (or ``.jpg``), or with ``format="webdataset"``
one ``OUT/<input stem>.tar`` of ``<key>.png`` per input file. Existing outputs are
skipped (resume) unless ``overwrite``; failures go to ``failures.jsonl``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

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
)

__all__ = ["IMAGE_FORMATS", "decode_dataset", "decode_dataset_async"]

IMAGE_FORMATS = ("png", "jpg", "webdataset")


@dataclass
class _File:
    path: Path
    opts: tuple[tuple[str, Any], ...]
    tar_out: Path | None = None
    entries: list[tuple[str, str, torch.Tensor]] | None = None
    remaining: int = 0
    images: list[tuple[str, asyncio.Future[bytes]]] | None = None


def _st_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            return {}
        try:
            return json.loads(f.read(n)).get("__metadata__") or {}
        except ValueError:
            return {}


def _options(meta: dict[str, str], scaling_factor: float | None, shift_factor: float | None) -> tuple[tuple[str, Any], ...]:
    if scaling_factor is not None:
        return (("scaling_factor", scaling_factor), ("shift_factor", shift_factor))
    if meta.get("latents_scaled") == "true":
        sf = float(meta["scaling_factor"]) if meta.get("scaling_factor") else None
        sh = float(meta["shift_factor"]) if meta.get("shift_factor") else None
        if sf is not None:
            return (("scaling_factor", sf), ("shift_factor", sh))
    return (("do_scaling", False),)


def _load_entries(path: Path) -> list[tuple[str, str, torch.Tensor]]:
    """(key, source, latent) of every item of a latent file, in file order."""
    suffix = path.suffix.lower()
    stem = path.stem
    if suffix == ".safetensors":
        tensors, meta = S.read_safetensors(path)
        if "asyncvae_version" in meta or len(tensors) > 1:
            prefix = "" if "asyncvae_version" in meta else f"{stem}/"
            return [(prefix + k, f"{path}#{k}", t) for k, t in tensors]
        return [(stem, str(path), t) for _, t in tensors]
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"{path}: cannot load ({type(e).__name__}: {e})") from None
        if isinstance(obj, torch.Tensor):
            return [(stem, str(path), obj)]
        if isinstance(obj, dict):
            return [(f"{stem}/{k}", f"{path}#{k}", v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a tensor or a dict of tensors")
    if suffix == ".tar":
        import tarfile

        out = []
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if not m.isfile() or not m.name.endswith(".safetensors"):
                    continue
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                tensors, _ = S.parse_safetensors(data, f"{path}#{m.name}")
                if tensors:
                    out.append((m.name[: -len(".safetensors")], f"{path}#{m.name}", tensors[0][1]))
        return out
    raise InputError(f"{path}: unsupported latent file")


def _file_meta(path: Path) -> dict[str, str]:
    if path.suffix.lower() == ".safetensors":
        return _st_metadata(path)
    if path.suffix.lower() == ".tar":
        import tarfile

        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".safetensors"):
                    _, meta = S.parse_safetensors(tf.extractfile(m).read(), m.name)  # type: ignore[union-attr]
                    return meta
    return {}


def _encode_image(arr: Any, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if ext == "jpg":
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def _save_image(path: Path, arr: Any, ext: str, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    S.atomic_write(path, _encode_image(arr, ext, quality), fsync=False)


async def decode_dataset_async(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    endpoint: str | Sequence[str] | None = None,
    format: str = "png",
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    concurrency: int = 32,
    workers: int | None = None,
    overwrite: bool = False,
    jpeg_quality: int = 95,
    quiet: bool = False,
    client: Client | None = None,
    retry: Retry | None = None,
    timeout: Timeout | None = None,
    token: str | bool | None = None,
) -> JobSummary:
    """Decode latent shards or files back to images (the async core of ``asyncvae decode``).

    Args:
        inputs: latent files or folders (see the module docstring).
        out: the output folder (created).
        endpoint: endpoint URL(s); ``None`` (and no ``client``) starts the built-in server.
        format: ``"png"``, ``"jpg"`` (``OUT/<key>.<ext>``) or ``"webdataset"``
            (``OUT/<input stem>.tar`` of ``<key>.png``).
        scaling_factor, shift_factor: override the scaling recorded in the shards.
        concurrency: requests in flight; workers: image-encoding threads.
        overwrite: rewrite outputs that exist (default: skip them).
        jpeg_quality: for ``format="jpg"``.
        quiet: no progress bar, no notices.
        client, retry, timeout, token: as for :func:`~asyncvae.jobs.encode_dataset_async`.

    Returns:
        A :class:`JobSummary`; failed items are counted and listed in ``failures.jsonl``.
    """
    t_start = time.perf_counter()
    if format not in IMAGE_FORMATS:
        raise InputError(f"format={format!r} must be one of {', '.join(IMAGE_FORMATS)}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = list(S.iter_latent_files(inputs))
    out_dir = prepare_out(out)
    if not paths:
        raise InputError(f"no latent files (.safetensors, .pt, .tar) found in {', '.join(map(str, inputs))}")
    files: list[_File] = []
    for p in paths:
        meta = await asyncio.to_thread(_file_meta, p)
        f = _File(p, _options(meta, scaling_factor, shift_factor))
        if format == "webdataset":
            f.tar_out = out_dir / f"{p.stem}.tar"
            if f.tar_out.exists() and not overwrite:
                continue
        files.append(f)
    skipped_files = len(paths) - len(files)
    summary = JobSummary(out=out_dir, shards_skipped=skipped_files)
    ext = "jpg" if format == "jpg" else "png"
    failures: list[dict[str, Any]] = []
    if files:
        async with job_client(
            endpoint, client, concurrency=concurrency, retry=retry, timeout=timeout, token=token,
            quiet=quiet, command="decode",
        ) as (c, label):
            summary.endpoint = label
            await _run(c, files, out_dir, format, ext, overwrite, jpeg_quality,
                       workers or max(2, os.cpu_count() or 1), summary, failures, quiet)
    elif skipped_files:
        log(f"asyncvae decode: all {skipped_files} output shard(s) exist; nothing to do", quiet)
    return finish(summary, out_dir / "failures.jsonl", failures, t_start)


async def _run(
    client: Client,
    files: list[_File],
    out: Path,
    fmt: str,
    ext: str,
    overwrite: bool,
    quality: int,
    workers: int,
    summary: JobSummary,
    failures: list[dict[str, Any]],
    quiet: bool,
) -> None:
    loop = asyncio.get_running_loop()
    ex = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="asyncvae-save")
    prog = Progress(client, 0, "decode", enabled=not quiet)
    stats = client.stats
    base = JobSummary.client_totals(stats)
    saves: collections.deque[asyncio.Future[Any]] = collections.deque()
    seen: set[str] = set()

    def unique(key: str, source: str) -> str:
        if key in seen:
            key = f"{key}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"
        seen.add(key)
        return key

    async def drain(limit: int) -> None:
        while len(saves) > limit:
            await saves.popleft()

    def finish_file(f: _File) -> None:
        f.remaining -= 1
        if f.remaining == 0 and f.tar_out is not None:
            assert f.images is not None
            saves.append(loop.create_task(write_tar(f.tar_out, f.images)))
            f.images = None
            summary.shards_written += 1

    async def write_tar(path: Path, images: list[tuple[str, asyncio.Future[bytes]]]) -> None:
        members = [(f"{k}.{ext}", await b) for k, b in images]
        await loop.run_in_executor(ex, S.atomic_write, path, S.tar_bytes(members))

    def fail(f: _File, key: str, source: str, reason: str) -> None:
        failures.append({"key": key, "source": source, "reason": reason})
        summary.failures += 1
        summary.processed += 1
        prog.advance(failed=True)
        finish_file(f)

    groups: list[list[_File]] = []
    for f in files:
        if groups and groups[-1][0].opts == f.opts:
            groups[-1].append(f)
        else:
            groups.append([f])

    try:
        for group in groups:
            sent: collections.deque[tuple[_File, str, str]] = collections.deque()

            async def feed(group: list[_File] = group, sent: Any = sent) -> Any:
                for f in group:
                    try:
                        entries = await asyncio.to_thread(_load_entries, f.path)
                    except (InputError, OSError) as e:
                        failures.append({"key": f.path.stem, "source": str(f.path), "reason": describe_error(e)})
                        summary.failures += 1
                        continue
                    prog.bar.total = (prog.bar.total or 0) + len(entries)
                    f.remaining = len(entries) + 1  # +1: released after the loop
                    f.images = [] if f.tar_out is not None else None
                    for key, source, t in entries:
                        key = unique(key, source)
                        if f.tar_out is None and not overwrite and (out / f"{key}.{ext}").exists():
                            summary.ok += 1
                            f.remaining -= 1
                            prog.advance()
                            continue
                        lat = t.unsqueeze(0) if t.dim() == 3 else t
                        if lat.dim() != 4:
                            fail(f, key, source, f"latent has shape {list(t.shape)}; expected [C,h,w] or [B,C,h,w]")
                            continue
                        sent.append((f, key, source))
                        yield lat
                    finish_file(f)

            opts = dict(group[0].opts)
            async with contextlib.aclosing(client.decode_many(
                feed(), ordered=True, on_error="yield", output_type="pt",
                partial_postprocess=True, return_type="pt", **opts,
            )) as results:
                async for r in results:
                    f, key, source = sent.popleft()
                    if isinstance(r, ItemError):
                        fail(f, key, source, describe_error(r.error))
                        continue
                    arrs = r.numpy()
                    names = [key] if len(arrs) == 1 else [f"{key}/{i:03d}" for i in range(len(arrs))]
                    for name, arr in zip(names, arrs, strict=True):
                        if f.tar_out is not None:
                            assert f.images is not None
                            f.images.append((name, loop.run_in_executor(ex, _encode_image, arr, ext, quality)))
                        else:
                            saves.append(loop.run_in_executor(ex, _save_image, out / f"{name}.{ext}", arr, ext, quality))
                    summary.ok += 1
                    summary.processed += 1
                    prog.advance()
                    finish_file(f)
                    await drain(4 * workers)
        await drain(0)
    finally:
        prog.close()
        for s in saves:
            s.cancel()
        ex.shutdown(wait=True, cancel_futures=True)
        summary.add_client_usage(stats, base)


def decode_dataset(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    **kwargs: Any,
) -> JobSummary:
    """Synchronous :func:`decode_dataset_async` (same arguments), usable in notebooks."""
    return run_sync(decode_dataset_async(inputs, out, **kwargs))
