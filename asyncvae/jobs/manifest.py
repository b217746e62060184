"""A job's records in ``--out``: ``job.json`` (settings, endpoint, model), the shard
manifest, and the shards' completion markers — the resume logic of both jobs.

``job.json`` is created atomically (one winner when several machines start at once);
a later run with other settings is refused (``--overwrite`` replaces the job), one
against another endpoint is refused unless ``allow_endpoint_change``.

The manifest (``manifest.arrow``, an Arrow IPC file — not ``.parquet``, so that
``OUT/*.parquet`` names the shards only: one row per key with its shard, and the
shard list in the schema metadata) fixes which keys each shard holds. A run lists the inputs,
then *extends* the manifest like img2dataset's incremental mode: shards keep their
keys; new inputs fill the last loose shard (it is redone, reusing its done latents)
and then go into new shards; a WebDataset input tar is one shard of its own (1:1), so
a new tar adds one shard and a changed tar redoes only its shard. Planning is a pure
function of (old manifest, listing) and applying it twice changes nothing, so
machines sharing ``--out`` that list the same inputs write the same manifest.
``--overwrite`` plans from scratch and removes the files of shards that are gone.

A shard is complete when its marker ``<shard>_stats.json`` exists and names the key
list the manifest gives it. The marker is written last, and only when no item failed
at the endpoint; a shard with endpoint failures is written (data + index) without a
marker, and the next run resends only those items.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .endpoint import same_endpoint
from .sources import Item
from .storage import Storage

__all__ = ["Manifest", "ShardPlan", "check_job", "keys_digest", "plan_shards", "read_marker"]

JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.arrow"
_LOOSE = re.compile(r"^shard-(\d{5,})$")


def keys_digest(keys: Sequence[str]) -> str:
    """sha256 of the key list, one key per line."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(b"\n")
    return h.hexdigest()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


# --------------------------------------------------------------------------- job.json


def check_job(
    store: Storage,
    job: dict[str, Any],
    *,
    overwrite: bool,
    allow_endpoint_change: bool,
    log: Any,
) -> dict[str, Any]:
    """Create ``job.json`` or check this run against it; returns the job record in force.

    ``job`` holds ``kind``, ``settings``, ``endpoint`` (and informational ``inputs``).
    Raises :class:`InputError` with a one-line reason when the folder holds another job.
    """
    text = _dumps(job)
    if overwrite:
        store.write_bytes(JOB_FILE, text)
        return job
    if store.create_exclusive(JOB_FILE, text):
        return job
    try:
        old = json.loads(store.read_text(JOB_FILE))
    except (OSError, ValueError):
        old = {}
    if old.get("kind") != job["kind"] or "settings" not in old:
        what = old.get("kind") or "an older or unreadable"
        raise InputError(
            f"{store} holds {what} job; pass --overwrite to replace it, or choose another --out"
        )
    diff = sorted(k for k in set(job["settings"]) | set(old["settings"])
                  if old["settings"].get(k) != job["settings"].get(k))
    if diff:
        shown = ", ".join(f"{k}: {old['settings'].get(k)!r} -> {job['settings'].get(k)!r}" for k in diff[:4])
        raise InputError(
            f"{store} holds a job with other settings ({shown}); pass --overwrite to replace it, "
            "or choose another --out"
        )
    if not same_endpoint(old.get("endpoint") or [], job["endpoint"]):
        if not allow_endpoint_change:
            raise InputError(
                f"{store} was made with endpoint {', '.join(old.get('endpoint') or ['?'])}, not "
                f"{', '.join(job['endpoint'])}; pass --allow-endpoint-change if it serves the same "
                "model, or choose another --out"
            )
        log(f"endpoint changed from {', '.join(old.get('endpoint') or ['?'])} (--allow-endpoint-change)")
        merged = dict(old, endpoint=job["endpoint"],
                      previous_endpoints=sorted(set(old.get("previous_endpoints", [])) | set(old.get("endpoint", []))))
        store.write_bytes(JOB_FILE, _dumps(merged))
        return merged
    return old


def record_model(store: Storage, job: dict[str, Any], model: dict[str, Any]) -> None:
    """Add the model identity to ``job.json`` (once: it is checked against later)."""
    job["model"] = model
    store.write_bytes(JOB_FILE, _dumps(job))


def model_mismatch(job: dict[str, Any], model: dict[str, Any]) -> str | None:
    """Why ``model`` is not the model the job's shards were made with, or ``None``."""
    old = job.get("model")
    if not old:
        return None
    diff = [k for k in model if k in old and old[k] != model[k]]
    if not diff:
        return None
    k = diff[0]
    return (
        f"the endpoint's model gives {k}={model[k]}, but this dataset was made with {k}={old[k]} "
        f"(endpoint {', '.join(job.get('endpoint', []))}); its latents would be mixed with another "
        "model's: use another --out, or --overwrite to redo the dataset with this endpoint"
    )


# --------------------------------------------------------------------------- manifest


@dataclass
class ShardPlan:
    """One output shard: its name, its keys in order, and its input tar (``unit``) if any."""

    name: str
    keys: list[str]
    unit: str = ""
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = keys_digest(self.keys)


@dataclass
class Manifest:
    """The shards of a job, in order."""

    shards: list[ShardPlan] = field(default_factory=list)
    generation: int = 0

    def to_bytes(self) -> bytes:
        import pyarrow as pa

        from . import _arrow as A

        codes: list[int] = []
        keys: list[str] = []
        for i, s in enumerate(self.shards):
            codes.extend([i] * len(s.keys))
            keys.extend(s.keys)
        meta = {
            "asyncvae_manifest": json.dumps({
                "generation": self.generation,
                "shards": [{"name": s.name, "items": len(s.keys), "unit": s.unit, "keys_sha256": s.digest}
                           for s in self.shards],
            }),
        }
        # built from buffers: pa.array() would import pandas (~0.3-1 s) just to look for it
        shard = pa.DictionaryArray.from_arrays(A.ints(codes), A.strings([s.name for s in self.shards]))
        table = pa.Table.from_arrays([shard, A.strings(keys)], names=["shard", "key"])
        table = table.replace_schema_metadata(meta)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
            w.write_table(table)
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        import pyarrow as pa

        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        meta = json.loads((table.schema.metadata or {})[b"asyncvae_manifest"])
        keys = table.column("key").to_pylist()
        shards, pos = [], 0
        for s in meta["shards"]:
            n = s["items"]
            shards.append(ShardPlan(s["name"], keys[pos : pos + n], s.get("unit", ""), s["keys_sha256"]))
            pos += n
        return cls(shards, int(meta.get("generation", 0)))

    def same_plan(self, other: Manifest) -> bool:
        return [(s.name, s.digest, s.unit) for s in self.shards] == [(s.name, s.digest, s.unit) for s in other.shards]


def load_manifest(store: Storage) -> Manifest | None:
    """The manifest in ``store``, or ``None``; an unreadable one is an :class:`InputError`."""
    if not store.exists(MANIFEST_FILE):
        return None
    try:
        return Manifest.from_bytes(store.read_bytes(MANIFEST_FILE))
    except Exception as e:
        raise InputError(f"{store}/{MANIFEST_FILE} is unreadable ({type(e).__name__}: {e}); pass --overwrite") from None


def plan_shards(items: Sequence[Item], units: Sequence[str], shard_size: int, old: Manifest | None) -> Manifest:
    """The job's shards after this listing (see the module docstring)."""
    if shard_size < 1:
        raise InputError(f"shard size {shard_size} must be >= 1")
    by_unit: dict[str, list[str]] = {}
    loose: list[str] = []
    for it in items:
        if it.unit:
            by_unit.setdefault(it.unit, []).append(it.key)
        else:
            loose.append(it.key)
    shards: list[ShardPlan] = []
    assigned: set[str] = set()
    names: set[str] = set()
    old_units: set[str] = set()
    for sp in (old.shards if old else []):
        if sp.unit:
            old_units.add(sp.unit)
            keys = by_unit.get(sp.unit, sp.keys)
        else:
            keys = list(sp.keys)
        shards.append(ShardPlan(sp.name, keys, sp.unit, "" if keys != sp.keys else sp.digest))
        assigned.update(keys)
        names.add(sp.name)
    for unit in units:
        if unit in old_units:
            continue
        name = unit if not _LOOSE.match(unit) and unit not in names else f"{unit}-tar"
        keys = [k for k in by_unit.get(unit, []) if k not in assigned]
        shards.append(ShardPlan(name, keys, unit))
        assigned.update(keys)
        names.add(name)
    new = [k for k in loose if k not in assigned]
    loose_shards = [s for s in shards if not s.unit]
    if new and loose_shards and len(loose_shards[-1].keys) < shard_size:
        last = loose_shards[-1]
        take = shard_size - len(last.keys)
        last.keys = last.keys + new[:take]
        last.digest = keys_digest(last.keys)
        new = new[take:]
    numbers = [int(m.group(1)) for s in shards if (m := _LOOSE.match(s.name))]
    nxt = max(numbers) + 1 if numbers else 0
    for i in range(0, len(new), shard_size):
        name = f"shard-{nxt:05d}"
        while name in names:
            nxt += 1
            name = f"shard-{nxt:05d}"
        shards.append(ShardPlan(name, new[i : i + shard_size]))
        names.add(name)
        nxt += 1
    gen = (old.generation if old else 0)
    m = Manifest(shards, gen)
    if old is None or not m.same_plan(old):
        m.generation = gen + 1
    return m


def save_manifest(store: Storage, manifest: Manifest) -> None:
    """Write the manifest, then check what is there now: a machine that listed other
    inputs may have written a different plan at the same time."""
    store.write_bytes(MANIFEST_FILE, manifest.to_bytes())
    now = load_manifest(store)
    if now is None or not now.same_plan(manifest):
        raise InputError(
            f"another run wrote a different shard plan into {store} at the same time (its inputs "
            "differ from this run's); run again once every machine sees the same inputs"
        )


# --------------------------------------------------------------------------- markers


def marker_name(shard: str) -> str:
    return f"{shard}_stats.json"


def read_marker(store: Storage, shard: str) -> dict[str, Any] | None:
    """A shard's completion marker, or ``None`` when absent or unreadable."""
    try:
        return json.loads(store.read_text(marker_name(shard)))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def write_marker(store: Storage, shard: str, stats: dict[str, Any]) -> None:
    store.write_bytes(marker_name(shard), json.dumps(stats, indent=1, sort_keys=True) + "\n")
