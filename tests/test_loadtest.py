"""Unit tests of the load generator on simulated time: schedules, the coordinated-omission
correction, late sends, warm-up, retries, histogram merging, thresholds, find-max,
request building, answer validation. Deterministic: a virtual-time event loop and a
queueing-model endpoint (``asyncvae.loadtest.sim``), no sockets."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncvae.errors import InputError, ProtocolError
from asyncvae.loadtest import (
    SCHEMA,
    FindMaxSpec,
    InvalidAnswer,
    LoadSpec,
    LoopClock,
    MixEntry,
    Recorder,
    Resolution,
    Stage,
    arrival_times,
    build_request,
    parse_ramp,
    parse_resolution,
    parse_threshold,
    parse_warmup,
    run_async,
    validate_body,
)
from asyncvae.loadtest.hist import new_histogram
from asyncvae.loadtest.runner import effective_workers, schedule_of, worker_share
from asyncvae.loadtest.sim import QueueEndpoint, run_virtual
from asyncvae.loadtest.spec import Warmup, parse_duration, parse_start_at

URL = "http://sim.invalid/"


def simulate(ep, **kw):
    """Run a LoadSpec against ``ep`` on virtual time and return the Report."""
    thresholds = kw.pop("thresholds", ())
    spec = LoadSpec(URL, **kw)
    return run_virtual(run_async(spec, send=ep, clock=LoopClock(), thresholds=thresholds))


# --------------------------------------------------------------------------- schedules


def test_uniform_schedule_is_evenly_spaced():
    times = list(arrival_times([Stage(10, 10, 1.0)]))
    assert times == pytest.approx([i / 10 for i in range(10)])


def test_linear_ramp_follows_the_cumulative_rate():
    # 0 -> 10/s over 2 s: Λ(t) = 2.5 t², 10 arrivals at t = sqrt(n / 2.5)
    times = list(arrival_times([Stage(0, 10, 2.0)]))
    assert len(times) == 10
    assert times == pytest.approx([(n / 2.5) ** 0.5 for n in range(10)])


def test_stages_chain_and_limits():
    st_ = parse_ramp("10:1s,20:1s")
    times = list(arrival_times(st_))
    assert len(times) == 30
    assert times[10] == pytest.approx(1.0) and times[-1] == pytest.approx(1.95)
    assert len(list(arrival_times(st_, limit_count=7))) == 7
    assert len(list(arrival_times(st_, limit_time=0.5))) == 5
    assert len(list(arrival_times([Stage(5, 5, None)], limit_count=12))) == 12


@given(rate=st.floats(1, 500), workers=st.integers(1, 6))
@settings(max_examples=40, deadline=None)
def test_worker_phases_interleave_into_the_global_schedule(rate, workers):
    one = sorted(arrival_times([Stage(rate, rate, 2.0)]))
    parts = sorted(
        t for k in range(workers)
        for t in arrival_times([Stage(rate / workers, rate / workers, 2.0)], phase=k / workers)
    )
    assert len(parts) == pytest.approx(len(one), abs=workers)
    n = min(len(one), len(parts))
    assert parts[:n] == pytest.approx(one[:n], abs=1e-6)


def test_poisson_schedule_is_seeded_and_has_the_right_mean():
    a = list(arrival_times([Stage(100, 100, 20.0)], arrival="poisson", rng=random.Random(1)))
    b = list(arrival_times([Stage(100, 100, 20.0)], arrival="poisson", rng=random.Random(1)))
    assert a == b
    assert 1800 < len(a) < 2200


def test_parsers():
    assert parse_duration("500ms") == 0.5 and parse_duration("2m") == 120 and parse_duration("3") == 3
    assert parse_warmup("50req") == Warmup(requests=50) and parse_warmup("2s") == Warmup(seconds=2.0)
    assert parse_ramp("50:5s,100-200:10s") == (Stage(50, 50, 5.0), Stage(100, 200, 10.0))
    for bad in ("x", "50", "a:5s", "50:zz"):
        with pytest.raises(InputError):
            parse_ramp(bad)
    with pytest.raises(InputError):
        parse_duration("ten seconds")
    assert parse_start_at("+30s", now=1000.0) == 1030.0
    assert parse_start_at("2030-01-01T00:00:00Z", now=0) == 1893456000.0
    assert parse_start_at("1893456000", now=0) == 1893456000.0
    with pytest.raises(InputError, match="in the past"):
        parse_start_at("2001-01-01T00:00:00Z")
    with pytest.raises(InputError, match="--start-at"):
        parse_start_at("soon")


def test_spec_validation():
    with pytest.raises(InputError, match="no load"):
        LoadSpec(URL, duration=1)
    with pytest.raises(InputError, match="one load model"):
        LoadSpec(URL, rate=1, concurrency=2, duration=1)
    with pytest.raises(InputError, match="how long"):
        LoadSpec(URL, rate=1)
    with pytest.raises(InputError, match="preset"):
        LoadSpec(URL, rate=1, duration=1, preset="nope")
    with pytest.raises(InputError, match="not both"):
        LoadSpec(URL, rate=1, duration=1, warmup=1.0, warmup_requests=5)
    with pytest.raises(InputError, match="mix"):
        LoadSpec(URL, rate=1, duration=1, preset="sdxl", mix=(MixEntry(),))


# --------------------------------------------------------------------------- coordinated omission


def test_under_capacity_latency_is_the_service_time():
    rep = simulate(QueueEndpoint(0.010), rate=50, duration=2.0)
    d = rep.data
    assert d["requests"]["ok"] == 100 and d["requests"]["failed"] == 0
    assert d["latency_ms"]["p50"] == pytest.approx(10.0, rel=0.002)
    assert d["latency_ms"]["max"] == pytest.approx(10.0, rel=0.002)
    assert d["rate"]["sent"] == pytest.approx(50.0, rel=1e-6)
    assert rep.ok_rate == pytest.approx(50.0, rel=0.01)
    assert rep.sustained_rate == pytest.approx(50.0, rel=0.02)
    assert d["schedule"]["late"] == 0 and not d["schedule"]["fell_behind"]


def test_open_loop_includes_queueing_delay_and_closed_loop_does_not():
    # one server, 10 ms per request (capacity 100/s); open loop at 150/s for 2 s
    open_rep = simulate(QueueEndpoint(0.010), rate=150, duration=2.0, interval=0.25)
    closed_rep = simulate(QueueEndpoint(0.010), concurrency=1, duration=2.0)
    # closed loop never queues: every request takes exactly the service time
    assert closed_rep.data["latency_ms"]["p99"] == pytest.approx(10.0, rel=0.002)
    assert closed_rep.data["latency_ms"]["max"] == pytest.approx(10.0, rel=0.002)
    # open loop: request i (0-based) is due at i/150 and done at (i+1)*0.01
    expected = sorted((i + 1) * 0.010 - i / 150 for i in range(300))
    d = open_rep.data
    assert d["requests"]["ok"] == 300
    assert d["latency_ms"]["max"] == pytest.approx(expected[-1] * 1000, rel=0.002)
    assert d["latency_ms"]["p50"] == pytest.approx(expected[149] * 1000, rel=0.01)
    assert d["latency_ms"]["p50"] > 40 * closed_rep.data["latency_ms"]["p50"]
    # every scheduled request was answered in the end, but only at the endpoint's pace
    assert open_rep.ok_rate == pytest.approx(150.0, rel=0.01)
    assert open_rep.sustained_rate == pytest.approx(100.0, rel=0.02)
    p50s = [iv["p50_ms"] for iv in d["timeline"]]
    assert p50s == sorted(p50s) and p50s[-1] > 5 * p50s[0]  # queueing delay grows
    assert d["queueing"]["growing"]


def test_a_stall_is_seen_by_every_scheduled_request_not_just_one():
    """The textbook coordinated-omission case: a 1 s stall under a 50/s load."""
    def endpoint() -> QueueEndpoint:
        ep = QueueEndpoint(0.010)
        ep.stall(1.0, 1.0)
        return ep

    closed = simulate(endpoint(), concurrency=1, duration=4.0).data
    opened = simulate(endpoint(), rate=50, duration=4.0).data
    # closed loop: one slow sample among ~300 fast ones, the p99 hides the stall
    assert closed["latency_ms"]["max"] >= 990
    assert closed["latency_ms"]["p99"] == pytest.approx(10.0, rel=0.002)
    # open loop: the ~50 requests due during the stall all waited: p90 shows it
    assert opened["latency_ms"]["p99"] >= 900
    assert opened["latency_ms"]["p90"] >= 200
    slow = sum(iv["ok"] for iv in opened["timeline"] if iv["t"] == 1.0)
    assert slow == 50


def test_sends_held_back_by_the_inflight_cap_are_counted_and_not_blamed_on_the_cpu():
    # 20/s against a 100 ms server, but only 1 request may be in flight
    d = simulate(QueueEndpoint(0.100), rate=20, duration=1.0, max_inflight=1, late_ms=5).data
    assert d["requests"]["ok"] == 20
    # k6's "dropped iterations": the cap was reached and is counted, with its reason
    assert d["inflight_cap"] == {"limit": 1, "reason": "max_inflight", "reached": 19}
    assert d["requests"]["capped"] == 19 and d["schedule"]["late_capped"] == 19
    # the generator's CPU kept up: no "add --workers" advice
    assert d["schedule"]["late"] == 19 and not d["schedule"]["fell_behind"]
    text = simulate(QueueEndpoint(0.100), rate=20, duration=1.0, max_inflight=1).text()
    assert "in-flight cap of 1" in text and "fell behind" not in text
    # request i goes out at 0.1 i (due 0.05 i), done at 0.1 (i+1): latency 0.1 + 0.05 i
    assert d["latency_ms"]["max"] == pytest.approx(1050, rel=0.002)
    assert d["service_ms"]["max"] == pytest.approx(100, rel=0.002)
    assert d["schedule"]["lag_ms"]["max"] == pytest.approx(950, rel=0.002)


def test_a_generator_too_slow_for_its_schedule_is_behind():
    # each send costs the generator 20 ms of (simulated) CPU: it can do 50/s, not 100/s
    d = simulate(QueueEndpoint(0.001, servers=4, client_cost=0.020), rate=100, duration=1.0).data
    assert d["schedule"]["fell_behind"] and d["schedule"]["late_capped"] == 0


def test_warmup_is_left_out():
    d = simulate(QueueEndpoint(0.001), rate=10, duration=1.0, warmup=0.5).data
    assert d["requests"]["warmup"] == 5 and d["requests"]["sent"] == 10
    d = simulate(QueueEndpoint(0.001), rate=10, duration=1.0, warmup_requests=3).data
    assert d["requests"]["warmup"] == 3 and d["requests"]["sent"] == 10
    d = simulate(QueueEndpoint(0.001), concurrency=2, requests=20, warmup_requests=4).data
    assert d["requests"]["warmup"] == 4 and d["requests"]["sent"] == 20


def test_requests_limit_open_loop():
    d = simulate(QueueEndpoint(0.001), rate=100, requests=37).data
    assert d["requests"]["sent"] == 37 and d["requests"]["ok"] == 37
    assert d["window_s"] == pytest.approx(0.37)  # 37 slots of 10 ms
    assert d["rate"]["ok"] == pytest.approx(100.0)


def test_errors_and_retries():
    d = simulate(QueueEndpoint(0.001, fail_every=2), rate=20, duration=1.0).data
    assert d["errors"] == {"http_503": 10} and d["statuses"] == {"200": 10, "503": 10}
    assert d["error_rate"] == pytest.approx(0.5)
    assert d["requests"]["answered"] == 20
    d = simulate(QueueEndpoint(0.001, fail_every=2), rate=20, duration=1.0, retries=2).data
    r = d["requests"]
    assert r["ok"] + r["failed"] == 20 and r["failed"] < 10  # retries cured most
    assert r["attempts"] == 20 + d["retries"]["http_503"]
    # every 503 the endpoint sent was either retried or is a final error
    assert d["statuses"]["503"] == d["retries"]["http_503"] + d["errors"].get("http_503", 0)
    assert d["statuses"]["200"] == r["ok"]


def test_unfinished_requests_count_as_errors_with_a_latency_lower_bound():
    d = simulate(QueueEndpoint(1.0), rate=10, duration=1.0, drain_timeout=0.5).data
    assert d["requests"]["unfinished"] > 0
    assert d["errors"]["unfinished"] == d["requests"]["unfinished"]
    assert d["latency_ms"]["max"] >= 500


def test_long_runs_keep_only_open_intervals_in_full():
    rec_holder = {}

    async def main():
        ep = QueueEndpoint(0.05, servers=2)
        rep = await run_async(LoadSpec(URL, rate=20, duration=120.0), send=ep, clock=LoopClock())
        rec_holder["rec"] = rep.recorder
        return rep

    rep = run_virtual(main())
    rec = rec_holder["rec"]
    assert rec.open_intervals() == 0 and len(rec.timeline) == 120
    row = rec.timeline[60]
    assert isinstance(row.latency, str) and len(row.latency) < 2000  # compressed, not a 190 KB array
    assert sum(r["ok"] for r in rep.data["timeline"]) == 2400


# --------------------------------------------------------------------------- merging


def test_histogram_merge_is_exact():
    rng = random.Random(7)
    values = [int(rng.lognormvariate(10, 1.5)) + 1 for _ in range(20_000)]
    whole = new_histogram()
    parts = [new_histogram() for _ in range(4)]
    for i, v in enumerate(values):
        whole.record_value(v)
        parts[i % 4].record_value(v)
    recs = []
    for p in parts:
        r = Recorder()
        r.latency = p
        r.ok = p.get_total_count()
        recs.append(Recorder.from_partial(r.to_partial()))  # through the wire format
    merged = Recorder.merge(recs)
    assert merged.latency.get_total_count() == whole.get_total_count() == 20_000
    assert merged.ok == 20_000
    for p in (0, 50, 90, 99, 99.9, 99.99, 100):
        assert merged.latency.get_value_at_percentile(p) == whole.get_value_at_percentile(p)
    assert merged.latency.get_max_value() == whole.get_max_value()
    assert merged.latency.get_mean_value() == whole.get_mean_value()


@given(st.lists(st.integers(1, 3_600_000_000), min_size=1, max_size=200))
@settings(max_examples=60, deadline=None)
def test_fast_record_is_record_value(values):
    from asyncvae.loadtest.hist import record

    a, b = new_histogram(), new_histogram()
    for v in values:
        a.record_value(v)
        record(b, v)
    assert list(a.counts) == list(b.counts)
    assert (a.total_count, a.min_value, a.max_value) == (b.total_count, b.min_value, b.max_value)


@given(st.lists(st.floats(-1.0, 4000.0, allow_nan=False), min_size=1, max_size=300))
@settings(max_examples=60, deadline=None)
def test_bulk_record_of_seconds_is_record_value(seconds):
    from asyncvae.loadtest.hist import record_seconds

    a, b = new_histogram(), new_histogram()
    for s in seconds:
        a.record_value(min(max(1, round(s * 1e6)), 3_600_000_000))
    record_seconds(b, seconds)
    assert list(a.counts) == list(b.counts)
    assert (a.total_count, a.min_value, a.max_value) == (b.total_count, b.min_value, b.max_value)


def test_recorder_merge_of_simulated_workers_matches_sums():
    reports = [simulate(QueueEndpoint(0.005), rate=20, duration=1.0) for _ in range(3)]
    merged = Recorder.merge(r.recorder for r in reports)
    assert merged.ok == 60 and merged.sent == 60
    assert merged.latency.get_total_count() == 60
    assert sum(iv.ok for iv in merged.timeline.values()) == 60
    assert len(merged.workers) == 3


def test_worker_shares_split_the_load():
    spec = LoadSpec(URL, rate=100, duration=1, requests=10, workers=3, warmup_requests=30)
    n = effective_workers(spec)
    ws = [worker_share(spec, k, n) for k in range(n)]
    assert sum(w.rate for w in ws) == pytest.approx(100)
    assert sum(w.requests for w in ws) == 10
    assert all(w.warmup == pytest.approx(0.3) for w in ws)  # 30 requests at 100/s
    arrivals = [list(schedule_of(w, k, n)) for k, w in enumerate(ws)]
    assert sum(m for a in arrivals for _, m in a) == 10
    assert sum(not m for a in arrivals for _, m in a) == 30


# --------------------------------------------------------------------------- report


def test_report_json_has_the_documented_keys_and_no_token():
    rep = simulate(QueueEndpoint(0.010), rate=20, duration=1.0, token="hf_SECRET123",
                   headers=(("Authorization", "Bearer hf_SECRET2"),))
    doc = json.loads(rep.to_json())
    for key in ("schema", "started_at", "mode", "interrupted", "spec", "request", "workers", "window_s",
                "schedule_start_epoch", "requests", "rate", "error_rate", "bytes", "latency_ms", "service_ms",
                "ttfb_ms", "error_latency_ms", "inflight_cap", "schedule", "statuses", "errors", "retries",
                "timeline_interval_s", "timeline", "queueing", "mix", "find_max", "thresholds", "passed",
                "histograms", "recorder"):
        assert key in doc, key
    assert doc["schema"] == SCHEMA
    assert set(doc["rate"]) == {"target", "sent", "answered", "ok", "sustained"}
    for k in ("count", "min", "mean", "stdev", "p50", "p90", "p99", "p99.9", "p99.99", "max"):
        assert k in doc["latency_ms"]
    text = rep.to_json() + rep.text()
    assert "hf_SECRET" not in text
    assert doc["spec"]["token"] == "***"


def test_thresholds():
    rep = simulate(QueueEndpoint(0.010), rate=150, duration=2.0,
                   thresholds=[parse_threshold("p99<250ms"), parse_threshold("errors<1%"),
                               parse_threshold("rate>50"), parse_threshold("p50 < 2s"),
                               parse_threshold("sustained<110")])
    res = {t["expr"]: t["ok"] for t in rep.data["thresholds"]}
    assert res == {"p99<250ms": False, "errors<1%": True, "rate>50": True, "p50 < 2s": True, "sustained<110": True}
    assert not rep.passed
    assert parse_threshold("rate>=95%").check(rep.data)["observed"] == pytest.approx(100, rel=0.01)
    assert parse_threshold("sustained>=95%").check(rep.data)["observed"] == pytest.approx(66.7, rel=0.02)
    for bad in ("p99", "p99<", "p99<5%", "errors<5ms", "foo<1"):
        with pytest.raises(InputError):
            parse_threshold(bad)


def test_find_max_lands_near_capacity():
    # two replicas of 10 ms: capacity 200/s; an SLO of 100 ms
    rep = simulate(QueueEndpoint(0.010, servers=2), find_max=FindMaxSpec(slo_p99_ms=100, step_duration=3.0))
    fm = rep.data["find_max"]
    assert 190 <= fm["max_rate"] <= 210 and fm["confirmed"]
    assert fm["steps"][0]["rate"] == 10 and any(not s["ok"] for s in fm["steps"])
    assert rep.max_rate == fm["max_rate"]
    assert rep.data["mode"] == "find-max"


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    ("preset", "shape", "dtype"),
    [
        ("sd", [1, 4, 64, 64], "float16"),
        ("sdxl", [1, 4, 128, 128], "float16"),
        ("flux", [1, 16, 128, 128], "bfloat16"),
        ("flux-packed", [1, 4096, 64], "bfloat16"),
        ("hunyuan-video", [1, 16, 16, 40, 64], "float16"),
    ],
)
def test_presets_build_the_documented_latents(preset, shape, dtype):
    plan = build_request(LoadSpec(URL, rate=1, duration=1, preset=preset, output="pt"))
    params = plan.request.params
    assert [int(v) for k, v in params if k == "shape"] == shape
    assert dict(params)["dtype"] == dtype
    if preset.startswith("flux"):
        assert dict(params)["scaling_factor"] == "0.3611" and dict(params)["shift_factor"] == "0.1159"
    if preset == "flux-packed":
        assert dict(params)["height"] == "1024" and dict(params)["width"] == "1024"


def _tensor_headers(shape, dtype="uint8", nbytes=None):
    n = nbytes if nbytes is not None else int(torch.Size(shape).numel())
    return {"shape": json.dumps(list(shape)), "dtype": dtype, "Content-Length": str(n)}


def test_request_options_and_answer_checks():
    # resolution is width x height, as everywhere in asyncvae
    plan = build_request(LoadSpec(URL, rate=1, duration=1, resolution="256x128", batch=2))
    assert plan.expect_shape == (2, 128, 256, 3)
    assert validate_body(plan, _tensor_headers((2, 128, 256, 3)), [b"\0" * (2 * 128 * 256 * 3)]) == 196608
    with pytest.raises(InvalidAnswer, match="expected"):
        validate_body(plan, _tensor_headers((2, 3, 128, 256)), [])
    plan = build_request(LoadSpec(URL, rate=1, duration=1, output="jpg"))
    assert plan.request.headers["Accept"] == "image/jpeg"
    assert validate_body(plan, {}, [b"\xff", b"\xd8\xff\xe0rest"]) == 8  # magic split across chunks
    with pytest.raises(InvalidAnswer, match="format"):
        validate_body(plan, {}, [b"\x89PNG...."])
    plan = build_request(LoadSpec(URL, rate=1, duration=1, op="encode", resolution=(64, 64)))
    assert plan.expect_shape == (1, None, 8, 8)
    assert plan.request.body[:4] == b"\x89PNG"
    with pytest.raises(InputError):
        build_request(LoadSpec(URL, rate=1, duration=1, output="mp4"))
    with pytest.raises(InputError):
        build_request(LoadSpec(URL, rate=1, duration=1, preset="hunyuan-video", op="encode"))


def test_body_check_counts_and_drops_the_body():
    plan = build_request(LoadSpec(URL, rate=1, duration=1, resolution=64))
    shape = (1, 64, 64, 3)
    chunks = [b"\1" * 4096, b"\2" * 4096, b"\3" * 4096]
    assert validate_body(plan, _tensor_headers(shape), iter(chunks)) == 12288
    with pytest.raises(ProtocolError, match="truncated"):
        validate_body(plan, _tensor_headers(shape), chunks[:2])
    with pytest.raises(ProtocolError, match="longer"):
        validate_body(plan, _tensor_headers(shape), [*chunks, b"x"])
    with pytest.raises(ProtocolError, match="Content-Length"):
        validate_body(plan, _tensor_headers(shape, nbytes=100), chunks)
    with pytest.raises(ProtocolError, match="lacks"):
        validate_body(plan, {}, chunks)
    video = build_request(LoadSpec(URL, rate=1, duration=1, preset="hunyuan-video", output="mp4",
                                   resolution=64, frames=5))
    assert validate_body(video, {}, [b"\0\0\0\x18ftypisom", b"more"]) == 16
    with pytest.raises(InvalidAnswer, match="mp4"):
        validate_body(video, {}, [b"not a video at all"])


def test_one_resolution_parser_width_first():
    assert parse_resolution("768x512") == Resolution(width=768, height=512)
    assert parse_resolution(512) == parse_resolution("512") == Resolution(512, 512)
    assert parse_resolution((768, 512)) == (768, 512)
    with pytest.raises(InputError, match="multiples of 16"):
        LoadSpec(URL, rate=1, duration=1, resolution="100x100")
    # the same order as the dataset jobs' parser
    from asyncvae.jobs import parse_resolution as jobs_parse

    assert tuple(parse_resolution("768x512")) == jobs_parse("768x512")
    assert build_request(LoadSpec(URL, rate=1, duration=1, resolution="768x512")).expect_shape == (1, 512, 768, 3)


def test_latent_file(tmp_path):
    from safetensors.torch import save_file

    lat = torch.randn(1, 4, 8, 8).half()
    torch.save(lat, tmp_path / "l.pt")
    save_file({"latents": lat}, str(tmp_path / "l.safetensors"))
    for name in ("l.pt", "l.safetensors"):
        plan = build_request(LoadSpec(URL, rate=1, duration=1, latent=str(tmp_path / name)))
        assert bytes(plan.request.body) == lat.numpy().tobytes()
        assert plan.expect_shape == (1, 64, 64, 3)
    with pytest.raises(InputError):
        build_request(LoadSpec(URL, rate=1, duration=1, latent=str(tmp_path / "missing.pt")))


def test_plot_has_corrected_uncorrected_and_counts(tmp_path):
    pytest.importorskip("matplotlib")
    from asyncvae.loadtest.plot import write_plot

    ep = QueueEndpoint(0.010)
    ep.stall(1.0, 0.5)
    rep = simulate(ep, rate=50, duration=3.0, interval=0.5)
    write_plot(rep, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
