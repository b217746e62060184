"""Load generation for remote VAE endpoints (``asyncvae loadtest``).

Honest latency at a fixed arrival rate: the open loop sends on a schedule and
measures each request from its *scheduled* time (coordinated-omission corrected,
like wrk2), so queueing delay at the endpoint shows up; the closed loop
(``concurrency``) is there for comparison. Figures live in HdrHistograms and merge
exactly across generator processes.

::

    from asyncvae.loadtest import LoadSpec, run, parse_threshold

    report = run(LoadSpec("http://127.0.0.1:8000/", rate=100, duration=10, warmup=1.0),
                 thresholds=[parse_threshold("p99<250ms")])
    print(report.text()); report.p99_ms; report.achieved_rate; report.data  # JSON document

``await run_async(spec)`` inside an event loop. See docs/loadtest.md.
"""

from __future__ import annotations

from .engine import Answer, Clock, InvalidAnswer, LoopClock, MonotonicClock, Recorder, Sender
from .report import SCHEMA, Report, Threshold, parse_threshold
from .runner import ProgressCallback, open_arrivals, run, run_async
from .schedule import arrival_times
from .spec import PRESETS, FindMaxSpec, LoadSpec, Stage, build_request, parse_ramp

__all__ = [
    "PRESETS",
    "SCHEMA",
    "Answer",
    "Clock",
    "FindMaxSpec",
    "InvalidAnswer",
    "LoadSpec",
    "LoopClock",
    "MonotonicClock",
    "ProgressCallback",
    "Recorder",
    "Report",
    "Sender",
    "Stage",
    "Threshold",
    "arrival_times",
    "build_request",
    "open_arrivals",
    "parse_ramp",
    "parse_threshold",
    "run",
    "run_async",
]
