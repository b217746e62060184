"""Load generation for remote VAE endpoints (``asyncvae loadtest``).

Honest latency at a fixed arrival rate: the open loop sends on a schedule and
measures each request from its *scheduled* time (coordinated-omission corrected,
like wrk2), so queueing delay at the endpoint shows up; the closed loop
(``concurrency``) is there for comparison. Figures live in HdrHistograms and merge
exactly across generator processes and machines (``merge_reports``).

::

    from asyncvae.loadtest import LoadSpec, run, parse_threshold

    report = run(LoadSpec("http://127.0.0.1:8000/", rate=100, duration=10, warmup=1.0),
                 thresholds=[parse_threshold("p99<250ms")])
    print(report.text()); report.p99_ms; report.ok_rate; report.data  # JSON document

``await run_async(spec)`` inside an event loop. See docs/loadtest.md.
"""

from __future__ import annotations

from .._resolution import Resolution, parse_resolution
from .engine import Answer, ClientSideError, Clock, InvalidAnswer, LoopClock, MonotonicClock, Sender
from .findmax import step_verdict
from .http import BodyCheck, validate_body
from .merge import load_report, merge_reports
from .recorder import Recorder
from .report import SCHEMA, Report, Threshold, parse_threshold
from .requests import RequestPlan, build_plans, build_request
from .runner import ProgressCallback, run, run_async
from .schedule import Schedule, arrival_times
from .spec import (
    PRESETS,
    FindMaxSpec,
    LoadSpec,
    MixEntry,
    Stage,
    load_mix,
    parse_ramp,
    parse_warmup,
)

__all__ = [
    "PRESETS",
    "SCHEMA",
    "Answer",
    "BodyCheck",
    "ClientSideError",
    "Clock",
    "FindMaxSpec",
    "InvalidAnswer",
    "LoadSpec",
    "LoopClock",
    "MixEntry",
    "MonotonicClock",
    "ProgressCallback",
    "Recorder",
    "Report",
    "RequestPlan",
    "Resolution",
    "Schedule",
    "Sender",
    "Stage",
    "Threshold",
    "arrival_times",
    "build_plans",
    "build_request",
    "load_mix",
    "load_report",
    "merge_reports",
    "parse_ramp",
    "parse_resolution",
    "parse_threshold",
    "parse_warmup",
    "run",
    "run_async",
    "step_verdict",
    "validate_body",
]
