"""Listing a job's inputs: image folders, lists of paths, WebDataset ``.tar`` shards.

The listing is deterministic (sorted), and every item gets a stable key:

- a folder (searched recursively for ``.jpg .jpeg .png .webp``, any case): the path
  relative to the folder, without its extension (``cats/0001``);
- a list file (``.txt``/``.lst``: one path per line, ``#`` comments; ``.csv``: the
  column named ``path``/``image``/``file``/``filename``/``image_path``, else the first
  column): relative paths are resolved against the list's folder; the key is the path
  as written, without its extension;
- a ``.tar`` shard (uncompressed, WebDataset layout): the member name without its
  extension, in tar order (shards are read in the order given, folders sorted);
- a single image file: its name without its extension.

Keys are sanitised to ``[A-Za-z0-9_-]`` plus ``/`` between parts (other characters
become ``_``, no ``.`` so WebDataset keys stay intact); a key seen twice gets
``-<8 hex of the source>`` appended.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "Item", "list_inputs", "make_key", "read_item", "select_shards"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".csv"})
CSV_COLUMNS = ("path", "image", "file", "filename", "image_path", "filepath")


@dataclass(frozen=True, slots=True)
class Item:
    """One input image: its ``key``, a human-readable ``source`` (a path, or
    ``shard.tar#member``), and where its bytes live (a file, or a byte range of a tar)."""

    key: str
    source: str
    path: str
    offset: int = -1
    size: int = -1


def read_item(item: Item) -> bytes:
    """The encoded image bytes of an item (a whole file or a tar member's range)."""
    if item.offset < 0:
        with open(item.path, "rb") as f:
            return f.read()
    with open(item.path, "rb") as f:
        f.seek(item.offset)
        data = f.read(item.size)
    if len(data) != item.size:
        raise InputError(f"{item.source}: tar member is truncated ({len(data)} of {item.size} bytes)")
    return data


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def make_key(rel: str) -> str:
    """A sanitised key from a relative path (extension already removed)."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = [_UNSAFE.sub("_", p).strip("_") or "_" for p in parts]
    return "/".join(parts) or "_"


def _strip_ext(name: str) -> str:
    base, ext = os.path.splitext(name)
    return base if ext else name


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for fn in filenames:
            if not fn.startswith(".") and _is_image(fn):
                found.append(fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/"))
    found.sort()
    return found


def _read_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: list file is not UTF-8 text") from None
    if path.suffix.lower() != ".csv":
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    col = next((header.index(c) for c in CSV_COLUMNS if c in header), None)
    if col is None:
        return [r[0].strip() for r in rows if r[0].strip()]
    return [r[col].strip() for r in rows[1:] if len(r) > col and r[col].strip()]


def _tar_members(path: Path) -> list[tuple[str, int, int]]:
    try:
        with tarfile.open(path, mode="r:") as tf:
            return [
                (m.name, m.offset_data, m.size)
                for m in tf
                if m.isfile() and _is_image(m.name) and not os.path.basename(m.name).startswith(".")
            ]
    except tarfile.ReadError as e:
        raise InputError(f"{path}: not a readable uncompressed .tar shard ({e})") from None


def list_inputs(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Item]:
    """Every input image, in a deterministic order, with unique stable keys.

    Raises :class:`~asyncvae.InputError` for a missing path or an unsupported file type.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    raw: list[tuple[str, str, str, int, int]] = []  # rel-for-key, source, path, offset, size
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise InputError(f"input path {str(p)!r} does not exist")
        if p.is_dir():
            for rel in _walk(p):
                src = str(p / rel)
                raw.append((_strip_ext(rel), src, src, -1, -1))
        elif p.suffix.lower() == ".tar":
            for name, off, size in _tar_members(p):
                raw.append((_strip_ext(name), f"{p}#{name}", str(p), off, size))
        elif p.suffix.lower() in LIST_EXTENSIONS:
            base = p.parent
            for entry in _read_list(p):
                q = Path(entry)
                full = q if q.is_absolute() else base / q
                try:
                    rel = str(full.relative_to(base)) if q.is_absolute() else entry
                except ValueError:
                    rel = entry
                raw.append((_strip_ext(rel), str(full), str(full), -1, -1))
        elif _is_image(p.name):
            raw.append((_strip_ext(p.name), str(p), str(p), -1, -1))
        elif p.suffix.lower() in (".gz", ".tgz", ".bz2", ".xz", ".zst"):
            raise InputError(f"{p}: compressed tar shards are not supported; use uncompressed .tar")
        else:
            raise InputError(
                f"{p}: unsupported input (expected an image folder, a .txt/.csv list of paths, "
                f"a .tar shard or a {'/'.join(sorted(IMAGE_EXTENSIONS))} image)"
            )
    return _unique(raw)


def _unique(raw: Iterable[tuple[str, str, str, int, int]]) -> list[Item]:
    seen: set[str] = {"__metadata__"}
    items: list[Item] = []
    for rel, src, path, off, size in raw:
        key = make_key(rel)
        if key in seen:
            key = f"{key}-{hashlib.sha1(src.encode()).hexdigest()[:8]}"
            n = 1
            while key in seen:
                key = f"{key}-{n}"
                n += 1
        seen.add(key)
        items.append(Item(key, src, path, off, size))
    return items


def select_shards(n_items: int, shard_size: int, shard_index: int = 0, num_shards: int = 1) -> list[int]:
    """The global shard numbers this worker writes: shard ``g`` holds items
    ``[g * shard_size, (g + 1) * shard_size)``, and worker ``shard_index`` of
    ``num_shards`` takes every shard with ``g % num_shards == shard_index``. The
    workers' selections are disjoint and together cover every shard (hence every
    input) exactly once, and the files are named by ``g``, so splits can share one
    output folder and match a single-machine run byte for byte."""
    if shard_size < 1:
        raise InputError(f"shard size {shard_size} must be >= 1")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
    total = -(-n_items // shard_size)
    return list(range(shard_index, total, num_shards))
