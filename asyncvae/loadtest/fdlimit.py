"""How many requests this process can have in flight: each holds a connection, i.e. a
file descriptor. The soft ``RLIMIT_NOFILE`` is raised to the hard limit first; what
is left after the descriptors already open (and a reserve) caps the in-flight count,
so the generator never blames its own exhaustion on the endpoint."""

from __future__ import annotations

import os

__all__ = ["inflight_cap", "open_fds", "raise_fd_limit"]

#: Descriptors kept for everything else (the event loop, pipes, files, DNS).
RESERVE = 64
#: Highest soft limit asked for when the hard limit is unlimited.
CEILING = 1 << 20


def raise_fd_limit() -> tuple[int | None, int | None]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after it
    (``None`` for unlimited or where the platform has no such limit)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, CEILING)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    inf = resource.RLIM_INFINITY
    return (None if soft == inf else soft), (None if hard == inf else hard)


def open_fds() -> int:
    """File descriptors this process has open now (an estimate where /proc is missing)."""
    for d in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(d))
        except OSError:
            continue
    return RESERVE  # pragma: no cover


def inflight_cap(requested: int) -> tuple[int, str]:
    """(cap, reason): ``requested`` (reason ``max_inflight``), or fewer when the file
    descriptor limit leaves less room (the reason says so and how to raise it)."""
    soft, hard = raise_fd_limit()
    if soft is None:
        return requested, "max_inflight"
    room = soft - open_fds() - RESERVE
    if room >= requested:
        return requested, "max_inflight"
    hard_s = "unlimited" if hard is None else str(hard)
    return max(1, room), (
        f"fd limit: this process may open {soft} files (RLIMIT_NOFILE, hard limit {hard_s}) and each request "
        f"in flight holds a connection; raise it (ulimit -n) or add --workers"
    )
