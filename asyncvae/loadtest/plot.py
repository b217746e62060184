"""``--plot FILE.png``: latency over time (corrected from the schedule, and uncorrected
from the send), sent/ok/errors per interval, and both latency percentile
distributions. Needs matplotlib (``pip install 'asyncvae[plot]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from .hist import percentile
from .report import Report, histogram_of

__all__ = ["check_plot_available", "write_plot"]

_PCTS = (0, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999)


def check_plot_available() -> None:
    """Raise :class:`InputError` when matplotlib is missing (``--plot`` needs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed: pip install 'asyncvae[plot]'") from None


def _over_time(ax: Any, d: dict[str, Any]) -> None:
    tl = d["timeline"]
    for key, label, style in (("p50_ms", "p50 (from schedule)", "-"), ("p99_ms", "p99 (from schedule)", "-"),
                              ("max_ms", "max (from schedule)", "-"), ("service_p50_ms", "p50 (from send)", "--"),
                              ("service_p99_ms", "p99 (from send)", "--")):
        pts = [(iv["t"], iv[key]) for iv in tl if iv.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.set_xlabel("scheduled time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency over time: corrected vs uncorrected")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _counts(ax: Any, d: dict[str, Any]) -> None:
    tl = d["timeline"]
    width = float(d["timeline_interval_s"])
    t = [iv["t"] for iv in tl]
    for key, label in (("sent", "sent"), ("ok", "ok"), ("errors", "errors")):
        ax.plot(t, [iv[key] / width for iv in tl], label=label, drawstyle="steps-post")
    if d["rate"]["target"]:
        ax.axhline(d["rate"]["target"], color="gray", linestyle=":", label="target")
    ax.set_xlabel("scheduled time (s)")
    ax.set_ylabel("requests per second")
    ax.set_title("sent / ok / errors per interval (by scheduled time)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _distribution(ax: Any, d: dict[str, Any]) -> None:
    for name, label in (("latency", "corrected (from schedule)"), ("service", "uncorrected (from send)")):
        h = histogram_of(d, name)
        if not h.get_total_count():
            continue
        xs = [1 / (1 - p / 100) for p in _PCTS]
        ax.plot(xs, [percentile(h, p) / 1000 for p in _PCTS], marker=".", label=label)
    ax.set_xscale("log")
    ax.set_xticks([1, 10, 100, 1000, 10000, 100000])
    ax.set_xticklabels(["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency by percentile")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def write_plot(report: Report, path: str | Path) -> None:
    """Write the three panels as a PNG (see the module doc)."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    _over_time(axes[0], report.data)
    _counts(axes[1], report.data)
    _distribution(axes[2], report.data)
    fig.suptitle(f"asyncvae loadtest — {report.data['request']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
