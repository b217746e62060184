"""Listing a job's inputs: image folders, lists of paths, WebDataset ``.tar`` shards.

The listing is deterministic (sorted) and every item gets a stable key that does not
depend on how the input was spelled (``ds``, ``/abs/ds`` or a symlinked mount give the
same keys and sources):

- a folder (searched recursively for ``.jpg .jpeg .png .webp``, any case; symlinks
  followed, each real folder visited once, so a link loop cannot repeat images): the
  path relative to the folder without its extension (``cats/0001``). Sidecars with the
  same stem in the same folder (``0001.txt``, ``0001.json``, ``0001.cls``, as
  img2dataset writes them) are carried into the output;
- a list file (``.txt``/``.lst``: one path per line, ``#`` comments; ``.csv``: a header
  row is recognised by its column names, the path column is ``path``/``image``/``file``
  /``filename``/``image_path``/``filepath`` (else the first), a ``caption``/``text``/
  ``prompt`` column becomes the caption and every other column is carried as
  ``extra``): relative paths are resolved against the list's folder; the key is the
  path as written, without its extension;
- a ``.tar`` shard (uncompressed, WebDataset layout): members are grouped into samples
  by WebDataset's rule — the key is the member's folder plus its basename up to the
  FIRST dot (``0002.input.jpg`` and ``0002.mask.png`` are one sample, ``0002``); the
  sample's image is its ``jpg``/``jpeg``/``png``/``webp`` field (else the first image
  member), and its ``txt``/``json``/``cls`` fields are carried. Each tar becomes one
  output shard of its own (a 1:1 mapping);
- a single image file: its name without its extension.

Keys are sanitised to ``[A-Za-z0-9_-]`` plus ``/`` between parts; a key seen twice
gets ``-<8 hex>`` of its input number and relative path appended.

Problems met while listing — an unreadable folder, a tar whose headers turn to garbage
before its end, a list naming a missing file — are collected in
:attr:`Listing.problems`; :func:`list_inputs` raises on them, the jobs refuse to start
unless told to skip them (``--skip-bad-inputs``).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Item",
    "Listing",
    "check_inputs",
    "list_inputs",
    "make_key",
    "read_item",
    "read_sidecars",
    "scan_inputs",
    "select_shards",
    "wds_split",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
SIDECAR_FIELDS = ("txt", "json", "cls")
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".csv"})
PATH_COLUMNS = ("path", "image", "file", "filename", "image_path", "filepath", "url")
CAPTION_COLUMNS = ("caption", "text", "prompt", "title")
KNOWN_COLUMNS = frozenset(PATH_COLUMNS + CAPTION_COLUMNS + ("key", "id", "width", "height", "label", "cls"))


@dataclass(frozen=True, slots=True)
class Item:
    """One input image.

    Attributes:
        key: the stable, sanitised key.
        source: where it came from, relative to its input (``part0/a.jpg``,
            ``shard.tar#0001.jpg``), the same on every machine.
        path: the file to read (an image file or a tar).
        offset, size: the byte range of a tar member (``-1`` for whole files).
        sidecars: ``(field, path, offset, size)`` of ``txt``/``json``/``cls`` sidecars.
        caption: a caption from a CSV list.
        extra: other CSV columns, as ``((name, value), ...)``.
        unit: the input tar this item belongs to (its own output shard), or ``""``.
        error: set when the item is bad before reading (a hostile member name).
    """

    key: str
    source: str
    path: str
    offset: int = -1
    size: int = -1
    sidecars: tuple[tuple[str, str, int, int], ...] = ()
    caption: str | None = None
    extra: tuple[tuple[str, str], ...] = ()
    unit: str = ""
    error: str | None = None


@dataclass
class Listing:
    """The result of :func:`scan_inputs`: items in order, and problems met."""

    items: list[Item] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    units: list[str] = field(default_factory=list)


def _read_range(path: str, offset: int, size: int, what: str) -> bytes:
    if offset < 0:
        with open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise InputError(f"{what}: tar member is truncated ({len(data)} of {size} bytes)")
    return data


def read_item(item: Item) -> bytes:
    """The encoded image bytes of an item (a whole file or a tar member's range)."""
    if item.error:
        raise InputError(item.error)
    try:
        return _read_range(item.path, item.offset, item.size, item.source)
    except OSError as e:
        raise InputError(f"cannot read {item.source}: {e.strerror or e}") from None


def read_sidecars(item: Item) -> dict[str, str]:
    """``{"txt": ..., "json": ..., "cls": ...}`` of the item's sidecars (UTF-8 text)."""
    out: dict[str, str] = {}
    for fld, path, off, size in item.sidecars:
        try:
            out[fld] = _read_range(path, off, size, item.source).decode("utf-8", "replace")
        except (OSError, InputError):
            continue
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def make_key(rel: str) -> str:
    """A sanitised key from a relative path (extension already removed)."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = [_UNSAFE.sub("_", p).strip("_") or "_" for p in parts]
    return "/".join(parts) or "_"


def wds_split(name: str) -> tuple[str, str]:
    """WebDataset's rule: ``dir/0002.input.jpg`` → (``dir/0002``, ``input.jpg``): the key is
    the folder plus the basename up to its first dot; the field is the rest (lower case)."""
    head, _, base = name.rpartition("/")
    stem, dot, fld = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, fld.lower() if dot else ""


def _strip_ext(name: str) -> str:
    base, ext = os.path.splitext(name)
    return base if ext else name


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hostile(name: str) -> bool:
    return name.startswith("/") or "\\" in name or "\x00" in name or any(p == ".." for p in name.split("/"))


# --------------------------------------------------------------------------- folders


def _walk(root: Path, problems: list[tuple[str, str]]) -> list[tuple[str, tuple[tuple[str, str, int, int], ...]]]:
    """(relative image path, sidecars) of every image below ``root``, sorted; each real
    folder (device, inode) is visited once, so symlink loops and repeated links to
    one folder add nothing twice."""
    found: list[tuple[str, tuple[tuple[str, str, int, int], ...]]] = []
    seen: set[tuple[int, int]] = set()

    def visit(path: str, rel: str) -> None:
        try:
            st = os.stat(path)
        except OSError as e:
            problems.append((rel or ".", f"cannot read folder: {e.strerror or e}"))
            return
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            return
        seen.add(ident)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append((rel or ".", f"cannot read folder: {e.strerror or e}"))
            return
        files: dict[str, str] = {}
        dirs: list[tuple[str, str]] = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir(follow_symlinks=True)
                is_file = not is_dir and e.is_file(follow_symlinks=True)
            except OSError as err:
                problems.append((f"{rel}/{e.name}" if rel else e.name, f"cannot stat: {err.strerror or err}"))
                continue
            if is_dir:
                dirs.append((e.path, f"{rel}/{e.name}" if rel else e.name))
            elif is_file:
                files[e.name] = e.path
            elif e.is_symlink():
                problems.append((f"{rel}/{e.name}" if rel else e.name, "broken symbolic link"))
        by_stem: dict[str, list[tuple[str, str]]] = {}
        for name, full in files.items():
            stem, ext = os.path.splitext(name)
            if ext.lower()[1:] in SIDECAR_FIELDS:
                by_stem.setdefault(stem, []).append((ext.lower()[1:], full))
        entries_out: list[tuple[str, tuple[tuple[str, str, int, int], ...]]] = []
        for name in files:
            if _is_image(name):
                stem = os.path.splitext(name)[0]
                side = tuple(sorted((fld, full, -1, -1) for fld, full in by_stem.get(stem, ())))
                entries_out.append((f"{rel}/{name}" if rel else name, side))
        found.extend(entries_out)
        for full, sub in dirs:
            visit(full, sub)

    visit(str(root), "")
    found.sort(key=lambda t: t[0])
    return found


# --------------------------------------------------------------------------- lists


def _is_header(row: list[str], nxt: list[str] | None) -> bool:
    cells = [c.strip().lower() for c in row]
    if any(c in KNOWN_COLUMNS for c in cells):
        return True
    if any(_is_image(c) or "/" in c for c in cells):
        return False
    return nxt is not None and any(_is_image(c.strip()) for c in nxt)


def _read_list(path: Path) -> list[tuple[str, str | None, tuple[tuple[str, str], ...]]]:
    """(path as written, caption, extra columns) of every entry of a list file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: list file is not UTF-8 text") from None
    if path.suffix.lower() != ".csv":
        return [
            (ln.strip(), None, ())
            for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")
        ]
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        return []
    if not _is_header(rows[0], rows[1] if len(rows) > 1 else None):
        return [(r[0].strip(), None, ()) for r in rows if r[0].strip()]
    header = [c.strip() for c in rows[0]]
    low = [c.lower() for c in header]
    col = next((low.index(c) for c in PATH_COLUMNS if c in low), 0)
    cap = next((low.index(c) for c in CAPTION_COLUMNS if c in low), None)
    out = []
    for r in rows[1:]:
        if len(r) <= col or not r[col].strip():
            continue
        value = r[col].strip()
        if "://" in value:
            raise InputError(
                f"{path}: column {header[col]!r} holds URLs ({value[:60]}); asyncvae encode reads "
                "local files: download the images first (e.g. with img2dataset) and list their paths"
            )
        caption = r[cap] if cap is not None and len(r) > cap else None
        extra = tuple(
            (header[i], r[i]) for i in range(min(len(r), len(header))) if i not in (col, cap) and header[i]
        )
        out.append((value, caption, extra))
    return out


# --------------------------------------------------------------------------- tars


def _tar_samples(path: Path, label: str, unit: str, problems: list[tuple[str, str]]) -> list[tuple[str, Item]]:
    """(raw key, item) of every sample of a WebDataset tar, in tar order."""
    groups: dict[str, list[tuple[str, str, int, int]]] = {}
    order: list[str] = []
    try:
        fsize = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tf:
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if base.startswith("."):
                        continue
                    if m.offset_data + m.size > fsize:
                        problems.append((f"{label}#{m.name}", "tar member runs past the end of the file (truncated tar)"))
                        break
                    key, fld = wds_split(m.name)
                    if key not in groups:
                        groups[key] = []
                        order.append(key)
                    groups[key].append((fld, m.name, m.offset_data, m.size))
            except (tarfile.TarError, EOFError, OSError) as e:
                problems.append((label, f"corrupt tar after {len(order)} sample(s): {e}"))
            end = tf.offset
        with open(path, "rb") as f:
            f.seek(end)
            while chunk := f.read(1 << 16):
                if chunk.count(0) != len(chunk):
                    problems.append((label, f"corrupt tar: unreadable header at byte {end} "
                                            f"(after {len(order)} sample(s)); the rest of the shard is lost"))
                    break
    except tarfile.ReadError as e:
        problems.append((label, f"not a readable uncompressed .tar shard ({e})"))
        return []
    except OSError as e:
        problems.append((label, f"cannot read: {e.strerror or e}"))
        return []
    out: list[tuple[str, Item]] = []
    for key in order:
        members = groups[key]
        image = next((m for pref in IMAGE_FIELDS for m in members if m[0] == pref), None)
        if image is None:
            image = next((m for m in members if _is_image(m[1])), None)
        if image is None:
            continue
        side = tuple(sorted((fld, str(path), off, size) for fld, _n, off, size in members if fld in SIDECAR_FIELDS))
        err = f"unsafe member name {image[1]!r} in {label}" if _hostile(image[1]) else None
        out.append((key, Item("", f"{label}#{image[1]}", str(path), image[2], image[3], side, unit=unit, error=err)))
    return out


# --------------------------------------------------------------------------- listing


def check_inputs(inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Cheap checks before listing: each input exists and is of a supported kind."""
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise InputError(f"input path {str(p)!r} does not exist")
        if p.is_dir():
            continue
        suffix = p.suffix.lower()
        if suffix == ".tar" or suffix in LIST_EXTENSIONS or _is_image(p.name):
            continue
        if suffix in (".gz", ".tgz", ".bz2", ".xz", ".zst"):
            raise InputError(f"{p}: compressed tar shards are not supported; use uncompressed .tar")
        raise InputError(
            f"{p}: unsupported input (expected an image folder, a .txt/.csv list of paths, "
            f"a .tar shard or a {'/'.join(sorted(IMAGE_EXTENSIONS))} image)"
        )


def _as_list(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str | os.PathLike[str]]:
    return [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)


def scan_inputs(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Listing:
    """Every input image in a deterministic order with unique stable keys, and the
    problems met (see the module docstring). Raises :class:`InputError` for a missing
    path or an unsupported file type."""
    ins = _as_list(inputs)
    check_inputs(ins)
    listing = Listing()
    multi = len(ins) > 1
    raw: list[tuple[int, str, Item]] = []  # input number, raw key, item (key unset)
    unit_names: set[str] = set()
    for n, inp in enumerate(ins):
        p = Path(inp)
        label = p.name or str(p)
        prefix = f"{label}/" if multi else ""
        if p.is_dir():
            for rel, side in _walk(p, listing.problems):
                full = os.path.join(str(p), *rel.split("/"))
                raw.append((n, _strip_ext(rel), Item("", prefix + rel, full, sidecars=side)))
        elif p.suffix.lower() == ".tar":
            unit = make_key(_strip_ext(label)).replace("/", "_")
            base, k = unit, 1
            while unit in unit_names:
                unit = f"{base}-{k}"
                k += 1
            unit_names.add(unit)
            listing.units.append(unit)
            for key, item in _tar_samples(p, label, unit, listing.problems):
                raw.append((n, key, item))
        elif p.suffix.lower() in LIST_EXTENSIONS:
            base_dir = p.parent
            for entry, caption, extra in _read_list(p):
                q = Path(entry)
                full = q if q.is_absolute() else base_dir / q
                if not full.is_file():
                    listing.problems.append((f"{label}: {entry}", "listed file does not exist"))
                    continue
                raw.append((n, _strip_ext(entry), Item("", entry, str(full), caption=caption, extra=extra)))
        else:
            raw.append((n, _strip_ext(p.name), Item("", p.name, str(p))))
    listing.items = _unique(raw)
    return listing


def list_inputs(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Item]:
    """Every input image (see :func:`scan_inputs`); raises :class:`InputError` naming the
    first problem met while listing."""
    listing = scan_inputs(inputs)
    if listing.problems:
        where, what = listing.problems[0]
        more = f" (and {len(listing.problems) - 1} more)" if len(listing.problems) > 1 else ""
        raise InputError(f"{where}: {what}{more}")
    return listing.items


def _unique(raw: list[tuple[int, str, Item]]) -> list[Item]:
    from dataclasses import replace

    seen: set[str] = {"__metadata__"}
    items: list[Item] = []
    for n, rel, item in raw:
        key = make_key(rel)
        if key in seen:
            key = f"{key}-{hashlib.sha1(f'{n}:{item.source}'.encode()).hexdigest()[:8]}"
            k = 1
            while key in seen:
                key = f"{key}-{k}"
                k += 1
        seen.add(key)
        items.append(replace(item, key=key))
    return items


def select_shards(n_shards: int, shard_size: int = 1, shard_index: int = 0, num_shards: int = 1) -> list[int]:
    """Positions of the shards this worker writes: worker ``shard_index`` of
    ``num_shards`` takes every shard at position ``p`` with ``p % num_shards ==
    shard_index``. Disjoint, and together they cover every shard exactly once.

    (Kept for callers that count items: with ``shard_size > 1``, ``n_shards`` is an item
    count and the shard count is ``ceil(n / shard_size)``.)"""
    if shard_size < 1:
        raise InputError(f"shard size {shard_size} must be >= 1")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
    total = -(-n_shards // shard_size)
    return list(range(shard_index, total, num_shards))
