"""One test per defect reproduced in issue 12 (each failed before the fix), on simulated
time where the defect is in the generator's logic, against the reference server where
it is in what goes over the wire or in the process (fd limit, Ctrl-C, memory)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from asyncvae import Retry
from asyncvae.cli import main as cli_main
from asyncvae.errors import EndpointError
from asyncvae.loadtest import (
    Answer,
    FindMaxSpec,
    LoadSpec,
    LoopClock,
    Stage,
    parse_threshold,
    run,
    run_async,
)
from asyncvae.loadtest.sim import QueueEndpoint, run_virtual

URL = "http://sim.invalid/"
ROOT = Path(__file__).resolve().parent.parent


def simulate(ep, **kw):
    thresholds = kw.pop("thresholds", ())
    return run_virtual(run_async(LoadSpec(URL, **kw), send=ep, clock=LoopClock(), thresholds=thresholds))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(("service", "servers", "slo_ms"), [(0.4, 8, 1000), (1.5, 30, 3000)])
def test_find_max_at_slow_service_times_finds_the_capacity(service, servers, slo_ms):
    """Was: the rate window ended at the last answer, so a 100/s endpoint at 400 ms came
    out as 15/s and a 67/s one at 1.5 s as 0.86/s. Capacity here: 20/s."""
    rep = simulate(QueueEndpoint(service, servers=servers), find_max=FindMaxSpec(slo_p99_ms=slo_ms))
    capacity = servers / service
    assert abs(rep.max_rate - capacity) <= 0.1 * capacity, rep.text()


def test_rate_threshold_passes_on_a_healthy_slow_endpoint():
    """Was: ``rate>=98%`` failed on a healthy 400 ms endpoint (R·D/(D+L))."""
    rep = simulate(QueueEndpoint(0.4, servers=40), rate=50, duration=10.0,
                   thresholds=[parse_threshold("rate>=98%")])
    assert rep.passed, rep.data["thresholds"]


def test_find_max_confirms_passing_and_failing_steps_alike():
    """Was: only failing steps were re-run (noise biased the result upward)."""
    fm = simulate(QueueEndpoint(0.010, servers=2), find_max=FindMaxSpec(slo_p99_ms=100)).data["find_max"]
    runs: dict[float, list[bool]] = {}
    for s in fm["steps"]:
        if s.get("role") != "final":
            runs.setdefault(s["rate"], []).append(s["ok"])
    assert any(all(v) for v in runs.values()) and any(not any(v) for v in runs.values())
    assert all(len(v) >= 2 for v in runs.values()), runs  # every rate, passing or failing, ran twice


def test_find_max_steps_have_a_minimum_sample_count():
    """Was: 3 s at 10/s, so the first step's "p99" was its maximum of 30 samples."""
    fm = simulate(QueueEndpoint(0.010, servers=2), find_max=FindMaxSpec(slo_p99_ms=100, start_rate=10,
                                                                       step_duration=3.0)).data["find_max"]
    assert fm["steps"][0]["rate"] == 10 and fm["steps"][0].get("samples", 0) >= 100


def test_find_max_reports_a_client_bound_generator_instead_of_an_endpoint_limit():
    """Was: a step the generator could not keep was reported as the endpoint's limit."""
    # each send costs the generator 10 ms: it can't do more than ~100/s; the endpoint does 1000/s
    ep = QueueEndpoint(0.010, servers=10, client_cost=0.010)
    fm = simulate(ep, find_max=FindMaxSpec(slo_p99_ms=50)).data["find_max"]
    assert fm["client_bound_at"] is not None and fm["client_bound_at"] > 60
    assert any(s["verdict"] == "client" for s in fm["steps"])
    assert fm["max_rate"] is not None and fm["max_rate"] < fm["client_bound_at"]


def test_find_max_ends_with_a_confirmation_run_at_the_found_rate():
    """Was: the best step's figures were reported, never re-checked."""
    fm = simulate(QueueEndpoint(0.010, servers=2), find_max=FindMaxSpec(slo_p99_ms=100)).data["find_max"]
    last = fm["steps"][-1]
    assert fm.get("confirmed") is True and last.get("role") == "final" and last["rate"] == fm["max_rate"]


def test_latency_threshold_fails_when_nothing_succeeded(capsys):
    """Was: an empty histogram summarised as 0 ms, so 'p99<250ms' PASSED on a closed port."""
    rc = cli_main(["loadtest", "http://127.0.0.1:9/", "--rate", "20", "--duration", "0.25s", "--quiet",
                   "--threshold", "p99<250ms"])
    out = capsys.readouterr().out
    assert rc == 3 and "FAIL p99<250ms (no data)" in out
    d = simulate(QueueEndpoint(0.001, fail_every=1), rate=10, duration=1.0,
                 thresholds=[parse_threshold("p99<250ms"), parse_threshold("max<1s")]).data
    assert d["latency_ms"]["count"] == 0 and d["latency_ms"]["p99"] is None
    assert [t["ok"] for t in d["thresholds"]] == [False, False]


# --------------------------------------------------------------------------- accounting


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_NOFILE in a child process")
def test_fd_exhaustion_is_the_generators_not_the_endpoints(make_server, tmp_path):
    """Was: with ``ulimit -n 256``, 159/400 requests were blamed on the endpoint as
    ``connection`` errors. Now the in-flight cap follows the fd limit and says so."""
    srv = make_server(replicas=400, delay_ms=1000, cache=True)
    out = tmp_path / "fd.json"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
            "from asyncvae.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run(
        [sys.executable, "-c", code, "loadtest", srv.url, "--rate", "400", "--duration", "1s", "--resolution",
         "64", "--quiet", "--json", str(out)],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert d["requests"]["ok"] == 400 and d["errors"] == {}, d["errors"]
    cap = d["inflight_cap"]
    assert cap["limit"] < 256 and "fd limit" in cap["reason"] and cap["reached"] > 0
    assert "ulimit -n" in proc.stdout


def test_client_side_failures_have_their_own_kind():
    from asyncvae.loadtest.engine import error_kind
    from asyncvae.loadtest.http import classify_client_error

    e = classify_client_error(OSError(errno.EMFILE, "Too many open files"))
    assert e is not None and error_kind(e) == "client_fd_limit" and "not the endpoint" in str(e)
    e = classify_client_error(OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    assert e is not None and error_kind(e) == "client_ports"
    assert classify_client_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None


def test_timeouts_are_latency_lower_bounds(make_server):
    """Was: timeouts were left out of the latency percentiles (unfinished ones were in)."""
    srv = make_server(replicas=8, delay_ms=400, cache=True)
    d = run(LoadSpec(srv.url, rate=20, duration=0.5, timeout=0.1, resolution=(64, 64))).data
    assert d["errors"] == {"timeout": 10}
    assert d["latency_ms"]["count"] == 10 and d["latency_ms"]["p50"] >= 100
    assert d["requests"].get("lower_bounds") == 10 and d["requests"].get("answered") == 0
    assert parse_threshold("p99<50ms").check(d)["ok"] is False


def test_a_ramp_cut_by_duration_reports_the_target_of_what_ran():
    """Was: the full ramp's mean rate (50/s) for a 0→100/s ramp cut at 5 s of 10."""
    d = simulate(QueueEndpoint(0.001, servers=4), stages=(Stage(0, 100, 10.0),), duration=5.0).data
    assert d["rate"]["target"] == pytest.approx(25.0, rel=0.01)
    assert d["requests"]["sent"] == 125


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_poisson_requests_with_warmup_measure_exactly_n(seed):
    """Was: the warm-up was counted on a uniform schedule and subtracted from a poisson one."""
    d = simulate(QueueEndpoint(0.001, servers=4), rate=10, requests=37, warmup=2.0, arrival="poisson",
                 seed=seed).data
    assert d["requests"]["sent"] == 37


def test_requests_below_workers_sends_exactly_n():
    """Was: ``--requests 2 --workers 3`` gave the third worker 1 request: 3 sent."""
    from asyncvae.loadtest.runner import effective_workers, schedule_of, worker_share

    spec = LoadSpec(URL, rate=20, requests=2, workers=3)
    n = effective_workers(spec)
    assert n == 2
    sent = sum(m for k in range(n) for _, m in schedule_of(worker_share(spec, k, n), k, n))
    assert sent == 2


def test_count_warmup_before_a_ramp_from_zero_starts_at_zero():
    """Was: 50 warm-up requests before a 0→100/s ramp were sent at 100/s (a burst)."""
    times: list[float] = []

    async def send(plan=None):
        loop_time = LoopClock().now()
        times.append(loop_time)
        return Answer(200, 0.001, 10)

    spec = LoadSpec(URL, stages=(Stage(0, 100, 10.0),), warmup_requests=50)
    rep = run_virtual(run_async(spec, send=send, clock=LoopClock()))
    assert rep.data["requests"]["warmup"] == 50
    warm = times[:50]
    # the warm-up replays the start of the ramp: Λ(t) = 5 t² reaches 50 at t ≈ 3.16 s
    assert warm[-1] - warm[0] > 3.0


def test_warmup_seconds_do_not_depend_on_int_or_float():
    """Was: ``warmup=2`` meant 2 requests and ``warmup=2.0`` two seconds."""
    a = simulate(QueueEndpoint(0.001), rate=10, duration=1.0, warmup=2).data
    b = simulate(QueueEndpoint(0.001), rate=10, duration=1.0, warmup=2.0).data
    assert a["requests"]["warmup"] == b["requests"]["warmup"] == 20


def test_bytes_out_counts_only_requests_that_went_out():
    """Was: every attempt added its body to bytes_out, even a refused connection."""
    d = run(LoadSpec("http://127.0.0.1:9/", rate=20, duration=0.25, timeout=2)).data
    assert d["requests"]["failed"] == 5 and d["bytes"]["out"] == 0


def test_the_live_line_is_labelled_and_per_interval():
    """Was: cumulative counters with no labels."""
    from asyncvae.loadtest.progress import describe

    a = {"elapsed": 1.0, "sent": 100, "ok": 90, "failed": 0, "in_flight": 10, "late": 0, "capped": 0, "target": 100}
    b = {"elapsed": 2.0, "sent": 200, "ok": 150, "failed": 20, "in_flight": 30, "late": 1, "capped": 0, "target": 100}
    line = describe(b, a)
    assert "last 1.0s: sent 100.0/s ok 60.0/s failed 20.0/s" in line
    assert "in flight 30" in line and "total sent 200" in line


def test_retries_wait_out_503s_like_the_client():
    """Was: the retry loop ignored ``Retry.unavailable_patience`` (not the client's policy)."""
    def endpoint():
        clock = LoopClock()

        async def send(plan=None):
            if clock.now() < 3.0:  # a replica starting: 503 for 3 s
                raise EndpointError({"error": "503 Service Unavailable"}, status=503)
            return Answer(200, 0.001, 10)
        return send

    patient = Retry(attempts=2, unavailable_patience=10.0, backoff_base=0.1, backoff_max=0.2)
    d = simulate(endpoint(), rate=10, duration=1.0, retry=patient).data
    assert d["requests"]["ok"] == 10 and d["requests"]["failed"] == 0
    impatient = Retry(attempts=2, unavailable_patience=0.0, backoff_base=0.1, backoff_max=0.2)
    d = simulate(endpoint(), rate=10, duration=1.0, retry=impatient).data
    assert d["errors"] == {"http_503": 10}


# --------------------------------------------------------------------------- Ctrl-C, memory


def test_ctrl_c_writes_the_report_marked_interrupted(serve_subprocess, tmp_path):
    """Was: Ctrl-C threw the run away: no report, no --json."""
    srv = serve_subprocess("--replicas", "2", "--delay-ms", "5", "--cache")
    out = tmp_path / "int.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncvae", "loadtest", srv.url, "--rate", "20", "--duration", "60s",
         "--resolution", "64", "--json", str(out)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    started = threading.Event()
    err: list[str] = []

    def read_progress() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first progress line: the schedule is running
            err.append(line)
            started.set()

    threading.Thread(target=read_progress, daemon=True).start()
    assert started.wait(120), "no progress line"
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    stderr = "".join(err)
    assert proc.returncode == 130, stderr
    assert "INTERRUPTED" in stdout
    d = json.loads(out.read_text())
    assert d["interrupted"] is True and d["requests"]["ok"] > 0
    assert d["window_s"] < 60 and d["rate"]["ok"] == pytest.approx(20, rel=0.3)


def test_memory_stays_flat_over_a_long_run():
    """Was: every 1 s interval held a full 1 µs–1 h histogram (~650 MiB per hour)."""
    def peak(seconds: float) -> int:
        tracemalloc.start()
        try:
            simulate(QueueEndpoint(0.02, servers=2), rate=10, duration=seconds)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    short, long = peak(30.0), peak(300.0)
    assert long - short < 1 << 20, (short, long)  # 270 more intervals: under 1 MiB (was ~50 MB)


def test_answers_are_validated_without_being_kept(serve_subprocess):
    """Was: every answer body was fully buffered just to validate it (6 MB here, per request in flight)."""
    srv = serve_subprocess("--replicas", "4", "--cache")
    spec = dict(resolution=(1024, 1024), output="pt", concurrency=4, timeout=120)
    run(LoadSpec(srv.url, requests=1, **spec))  # the server computes and caches its answer
    tracemalloc.start()
    try:
        d = run(LoadSpec(srv.url, requests=8, **spec)).data
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert d["requests"]["ok"] == 8 and d["bytes"]["in"] == 8 * 3 * 1024 * 1024 * 2
    assert peak < 12 << 20, peak  # 4 answers of 6 MiB in flight: 24 MiB when buffered
