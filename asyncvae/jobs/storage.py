"""Where a job writes: a local folder, or any fsspec URL (``memory://``, ``s3://``, ...).

Every name is checked to stay under the root (no absolute names, no ``..``, no
symlink escape on a local disk). Files are written to a temporary name that carries
the host, the process id and a random part — so two machines or two retries sharing
``--out`` never write the same temporary file — then renamed into place (local:
fsync + ``os.replace``; fsspec: ``mv``), so a reader sees the old file or the whole
new one. ``create_exclusive`` creates a file only if it is absent (local:
``os.link``, atomic; fsspec: best effort, see ``docs/jobs.md``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Iterator
from typing import IO, Any

from ..errors import InputError

__all__ = ["Storage", "UnsafePath", "check_relative"]

_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:32] or "host"
TEMP_SUFFIX = ".tmp"
#: Temporary files older than this are leftovers of a dead writer (any machine).
STALE_TEMP_SECONDS = 3600.0


class UnsafePath(InputError):
    """A name that would leave the output folder (absolute, ``..``, NUL, symlink escape)."""


def check_relative(name: str) -> str:
    """``name`` as a clean relative POSIX path, or :class:`UnsafePath`."""
    if not name or "\x00" in name or "\\" in name:
        raise UnsafePath(f"unsafe output name {name!r} (empty, NUL or backslash)")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePath(f"unsafe output name {name!r} (absolute path)")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"unsafe output name {name!r} (empty, '.' or '..' part)")
    return name


def temp_name(name: str) -> str:
    """A temporary sibling of ``name`` unique to this host, process and call."""
    head, tail = posixpath.split(name)
    t = f".{tail}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    return posixpath.join(head, t) if head else t


class Storage:
    """A job's output root. ``url`` is a local path, ``file://`` URL, or fsspec URL."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        text = os.fspath(url)
        self.display = text
        if "://" in text and not text.startswith("file://"):
            try:
                import fsspec
            except ImportError:  # pragma: no cover - fsspec is a dependency
                raise InputError(f"--out {text!r} needs fsspec: pip install fsspec") from None
            try:
                fs, root = fsspec.core.url_to_fs(text)
            except (ValueError, ImportError) as e:
                raise InputError(f"--out {text!r}: {e}") from None
            self.fs: Any = fs
            self.root = root.rstrip("/") or "/"
            self.local = False
        else:
            if text.startswith("file://"):
                text = text[len("file://") :]
            self.fs = None
            self.root = os.path.abspath(text)
            self.local = True
        self._real_root: str | None = None

    def __repr__(self) -> str:
        return f"Storage({self.display!r})"

    def __str__(self) -> str:
        return self.display

    # ---- paths
    def path(self, name: str) -> str:
        """The full path of ``name`` (checked to stay under the root)."""
        check_relative(name)
        if self.local:
            p = os.path.join(self.root, *name.split("/"))
            real_root = self._real_root or os.path.realpath(self.root)
            real = os.path.realpath(os.path.dirname(p))
            if real != real_root and not real.startswith(real_root + os.sep):
                raise UnsafePath(f"unsafe output name {name!r} (leaves {self.display} through a link)")
            return p
        return f"{self.root}/{name}"

    def ensure(self) -> None:
        """Create the root and check it is writable (:class:`InputError` otherwise)."""
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
                self._real_root = os.path.realpath(self.root)
            else:
                self.fs.makedirs(self.root, exist_ok=True)
            probe = temp_name(".write-test")
            self.write_bytes(probe, b"", atomic=False)
            self.remove(probe)
        except OSError as e:
            raise InputError(
                f"output folder {self.display!r} is not writable: {getattr(e, 'strerror', None) or e}"
            ) from None

    def makedirs(self, name: str) -> None:
        if self.local:
            os.makedirs(self.path(name), exist_ok=True)
        else:
            self.fs.makedirs(self.path(name), exist_ok=True)

    # ---- reading
    def exists(self, name: str) -> bool:
        p = self.path(name)
        return os.path.exists(p) if self.local else bool(self.fs.exists(p))

    def read_bytes(self, name: str) -> bytes:
        p = self.path(name)
        if self.local:
            with open(p, "rb") as f:
                return f.read()
        with self.fs.open(p, "rb") as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def open_read(self, name: str) -> IO[bytes]:
        p = self.path(name)
        return open(p, "rb") if self.local else self.fs.open(p, "rb")

    def size(self, name: str) -> int:
        p = self.path(name)
        return os.path.getsize(p) if self.local else int(self.fs.size(p))

    def listdir(self, sub: str = "") -> list[str]:
        """Names (relative to the root) of the files directly in ``sub``."""
        if self.local:
            base = self.path(sub) if sub else self.root
            try:
                with os.scandir(base) as it:
                    return sorted((f"{sub}/{e.name}" if sub else e.name) for e in it if e.is_file())
            except FileNotFoundError:
                return []
        base = self.path(sub) if sub else self.root
        try:
            found = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for info in found:
            if info.get("type") == "file":
                nm = posixpath.basename(info["name"].rstrip("/"))
                out.append(f"{sub}/{nm}" if sub else nm)
        return sorted(out)

    # ---- writing
    def remove(self, name: str) -> None:
        p = self.path(name)
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                os.unlink(p)
            else:
                self.fs.rm_file(p)

    def write_bytes(self, name: str, data: bytes | str, *, atomic: bool = True, fsync: bool = True) -> None:
        """Write ``data`` under ``name`` (atomically by default)."""
        raw = data.encode() if isinstance(data, str) else data
        if not atomic:
            p = self.path(name)
            if self.local:
                with open(p, "wb") as f:
                    f.write(raw)
            else:
                self.fs.pipe_file(p, raw)
            return
        with self.open_atomic(name, fsync=fsync) as f:
            f.write(raw)

    @contextlib.contextmanager
    def open_atomic(self, name: str, *, fsync: bool = True) -> Iterator[IO[bytes]]:
        """A binary file to stream into; it replaces ``name`` when the block ends well and
        is removed when it raises."""
        final = self.path(name)
        tmp = self.path(temp_name(name))
        ok = False
        try:
            if self.local:
                with open(tmp, "wb") as f:
                    yield f
                    if fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
            else:
                with self.fs.open(tmp, "wb") as f:
                    yield f
                self.fs.mv(tmp, final)
            ok = True
        finally:
            if not ok:
                with contextlib.suppress(Exception):
                    if self.local:
                        os.unlink(tmp)
                    else:
                        self.fs.rm_file(tmp)

    def create_exclusive(self, name: str, data: bytes | str) -> bool:
        """Create ``name`` holding ``data`` unless it exists; True if this call created it.

        Local disks: atomic (a complete temporary file is hard-linked into place, which
        fails if the name exists), so machines sharing ``--out`` agree on one winner.
        fsspec: check-then-write (object stores have no portable create-if-absent)."""
        raw = data.encode() if isinstance(data, str) else data
        if not self.local:
            if self.exists(name):
                return False
            self.write_bytes(name, raw)
            return True
        final = self.path(name)
        tmp = self.path(temp_name(name))
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def sync(self) -> None:
        """Flush the root folder's entries (new names) to disk where the OS allows it."""
        if not self.local:
            return
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def clean_temps(self, prefixes: set[str]) -> int:
        """Remove leftover temporary files of the named outputs: those of this host whose
        process is gone, and any older than an hour. Others may belong to a live writer
        on another machine and are left alone. Returns how many were removed."""
        removed = 0
        now = time.time()
        for name in self.listdir():
            base = posixpath.basename(name)
            if not (base.startswith(".") and base.endswith(TEMP_SUFFIX)):
                continue
            target = base[1:].split(".", 1)[0].replace("_stats", "")
            if target not in prefixes:
                continue
            stale = False
            owner = base[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]  # host-pid-rand
            host, _, rest = owner.rpartition("-")[0].rpartition("-")
            pid = rest
            if host == _HOST and pid.isdigit() and not _alive(int(pid)):
                stale = True
            if not stale and self.local:
                with contextlib.suppress(OSError):
                    stale = now - os.path.getmtime(self.path(name)) > STALE_TEMP_SECONDS
            if stale:
                self.remove(name)
                removed += 1
        return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
