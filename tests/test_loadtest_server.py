"""``asyncvae loadtest`` against the real reference server (short runs, a second or two)."""

from __future__ import annotations

import json

import pytest
from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader

from asyncvae import Retry
from asyncvae.cli import main as cli_main
from asyncvae.loadtest import LoadSpec, parse_threshold, run, run_async
from asyncvae.loadtest.cli import EXIT_THRESHOLD, EXIT_USAGE
from asyncvae.server import Faults

#: small requests so the server's compute doesn't matter: [1,4,8,8] latents → 64x64 images
SMALL = ("--resolution", "64", "--quiet")


def test_open_loop_real_server_rate_and_no_errors(make_server):
    srv = make_server(replicas=2, delay_ms=5, cache=True)
    rep = run(LoadSpec(srv.url, rate=40, duration=1.5, warmup=0.25, resolution=(64, 64)))
    d = rep.data
    assert d["requests"]["failed"] == 0 and d["errors"] == {}
    assert d["requests"]["ok"] == d["requests"]["sent"] == d["requests"]["answered"] == 60
    assert d["statuses"] == {"200": 60}
    assert rep.ok_rate == pytest.approx(40, rel=0.01)  # counts over the 1.5 s schedule
    assert d["rate"]["sent"] == pytest.approx(40, rel=0.01)
    assert d["latency_ms"]["p50"] >= 5.0  # the server holds each request 5 ms
    assert d["bytes"]["in"] == 60 * 64 * 64 * 3
    assert d["bytes"]["out"] == 60 * 4 * 8 * 8 * 2
    assert d["requests"]["warmup"] == 10


async def test_run_async_closed_loop_and_encode(make_server):
    srv = make_server(replicas=2, cache=True)
    rep = await run_async(LoadSpec(srv.url, op="encode", concurrency=2, requests=20, resolution=(64, 64)))
    assert rep.data["requests"]["ok"] == 20 and rep.data["mode"] == "closed"
    assert rep.data["requests"]["peak_in_flight"] <= 2


def test_fault_statuses_are_counted_and_retries_cure_them(make_server):
    srv = make_server(replicas=2, cache=True, faults=Faults(fault_503=0.5))
    d = run(LoadSpec(srv.url, rate=50, duration=1.0, resolution=(64, 64))).data
    assert d["statuses"]["503"] > 5 and d["statuses"]["200"] > 5
    assert d["errors"]["http_503"] == d["statuses"]["503"]
    assert d["error_rate"] == pytest.approx(0.5, abs=0.25)
    fast = Retry(attempts=5, backoff_base=0.01, backoff_max=0.05)  # the client's policy object
    d = run(LoadSpec(srv.url, rate=50, duration=1.0, resolution=(64, 64), retry=fast)).data
    assert d["retries"]["http_503"] > 5
    assert d["requests"]["failed"] <= 8  # ~50 × 0.5⁵ expected


def test_bad_answers_are_errors_and_their_status_is_counted(make_server):
    srv = make_server(cache=False, faults=Faults(fault_bad_headers=1.0))
    d = run(LoadSpec(srv.url, rate=20, duration=0.5, resolution=(64, 64))).data
    assert d["requests"]["ok"] == 0 and d["requests"]["failed"] == 10
    assert set(d["errors"]) <= {"protocol", "invalid_response"}
    # the server did answer (200 with broken headers): answered, and the status is counted
    assert d["statuses"] == {"200": 10} and d["requests"]["answered"] == 10


def test_cli_thresholds_json_and_no_token(make_server, tmp_path, capsys, monkeypatch):
    srv = make_server(replicas=2, delay_ms=5, cache=True)
    out = tmp_path / "r.json"
    monkeypatch.setenv("HF_TOKEN", "hf_envSECRET")
    rc = cli_main(["loadtest", srv.url, "--rate", "30", "--duration", "1s", *SMALL, "--json", str(out),
                   "--token", "hf_cliSECRET", "--threshold", "p99<1ms", "--threshold", "errors<1%"])
    assert rc == EXIT_THRESHOLD
    text = capsys.readouterr()
    assert "FAIL p99<1ms" in text.out and "PASS errors<1%" in text.out
    doc = json.loads(out.read_text())
    assert doc["schema"] == "asyncvae.loadtest/2"
    assert [t["ok"] for t in doc["thresholds"]] == [False, True]
    assert doc["requests"]["ok"] == 30 and not doc["passed"]
    assert doc["spec"]["token"] == "***"
    everything = out.read_text() + text.out + text.err
    assert "SECRET" not in everything
    rc = cli_main(["loadtest", srv.url, "--rate", "30", "--requests", "10", *SMALL,
                   "--threshold", "p99<5s", "--threshold", "rate>5"])
    assert rc == 0


def test_cli_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["loadtest", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--rate", "--mix", "--start-at", "--interval", "--hgrm", "--hlog", "--min-samples", "--no-confirm",
                 "--unavailable-patience", "merge"):
        assert flag in help_text, flag
    with pytest.raises(SystemExit) as e:
        cli_main(["loadtest", "http://127.0.0.1:9/", "--rate", "1", "--duration", "1s", "--threshold", "bogus"])
    assert e.value.code == 2
    assert cli_main(["loadtest", "http://127.0.0.1:9/", "--find-max"]) == EXIT_USAGE  # needs --slo-p99
    assert "--slo-p99" in capsys.readouterr().err
    assert cli_main(["loadtest", "http://127.0.0.1:9/", "--duration", "1s"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no load given" in err and len(err.strip().splitlines()) == 1
    # a bare number is ambiguous for --warmup: it must say which unit
    with pytest.raises(SystemExit) as e:
        cli_main(["loadtest", "http://127.0.0.1:9/", "--rate", "1", "--duration", "1s", "--warmup", "2"])
    assert e.value.code == 2
    assert "2s for seconds or 2req for requests" in capsys.readouterr().err


def test_cli_plot_without_matplotlib_says_how_to_install(capsys, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("matplotlib is installed")
    rc = cli_main(["loadtest", "http://127.0.0.1:9/", "--rate", "1", "--duration", "1s", "--plot",
                   str(tmp_path / "p.png")])
    assert rc == 1
    assert "pip install 'asyncvae[plot]'" in capsys.readouterr().err


def test_connection_refused_counts_as_errors_not_answers():
    d = run(LoadSpec("http://127.0.0.1:9/", rate=20, duration=0.25, timeout=2)).data
    assert d["requests"]["failed"] == 5 and d["errors"] == {"connection": 5}
    assert d["requests"]["answered"] == 0 and d["rate"]["answered"] == 0
    assert d["statuses"] == {} and d["bytes"]["out"] == 0  # nothing reached an endpoint
    assert parse_threshold("errors<1%").check(d)["ok"] is False


def test_mix_file_sends_each_kind_in_proportion(make_server, tmp_path):
    srv = make_server(replicas=2, cache=True)
    mix = tmp_path / "mix.toml"
    mix.write_text('[[request]]\nname = "tensor"\nresolution = 64\nweight = 3\n\n'
                   '[[request]]\nname = "jpeg"\nresolution = "64x32"\noutput = "jpg"\nweight = 1\n')
    out = tmp_path / "mix.json"
    rc = cli_main(["loadtest", srv.url, "--mix", str(mix), "--rate", "40", "--requests", "40", "--quiet",
                   "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["requests"]["ok"] == 40 and d["errors"] == {}
    by = {m["label"]: m for m in d["mix"]}
    assert by["tensor"]["sent"] == 30 and by["jpeg"]["sent"] == 10
    assert by["tensor"]["weight"] == 3 and by["jpeg"]["ok"] == 10
    assert d["bytes"]["in"] > 30 * 64 * 64 * 3  # the tensor answers plus the JPEGs
    assert "mix of 75% tensor" in d["request"]


def test_hgrm_and_hlog_outputs_read_back(make_server, tmp_path):
    srv = make_server(replicas=2, delay_ms=2, cache=True)
    hgrm, hlog, js = tmp_path / "r.hgrm", tmp_path / "r.hlog", tmp_path / "r.json"
    rc = cli_main(["loadtest", srv.url, "--rate", "40", "--duration", "1.5s", "--interval", "500ms", *SMALL,
                   "--hgrm", str(hgrm), "--hlog", str(hlog), "--json", str(js)])
    assert rc == 0
    d = json.loads(js.read_text())
    assert d["timeline_interval_s"] == 0.5 and len(d["timeline"]) == 3
    lines = hgrm.read_text().splitlines()
    assert lines[0].split() == ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    assert "Total count    =           60" in hgrm.read_text()
    assert (tmp_path / "r.service.hgrm").exists()
    reader = HistogramLogReader(str(hlog), HdrHistogram(1, 3_600_000_000, 3))
    total = 0
    tags = set()
    while (h := reader.get_next_interval_histogram()) is not None:
        tags.add(h.get_tag())
        if h.get_tag() == "latency":
            total += h.get_total_count()
    assert tags == {"latency", "service"} and total == 60


def test_merge_of_runs_started_together(make_server, tmp_path, capsys):
    srv = make_server(replicas=4, delay_ms=2, cache=True)
    files = []
    for name in ("a", "b"):
        f = tmp_path / f"{name}.json"
        rc = cli_main(["loadtest", srv.url, "--rate", "20", "--duration", "1s", "--start-at", "+0.5s",
                       *SMALL, "--json", str(f)])
        assert rc == 0
        files.append(f)
    a, b = (json.loads(f.read_text()) for f in files)
    out = tmp_path / "all.json"
    capsys.readouterr()
    rc = cli_main(["loadtest", "merge", *map(str, files), "--json", str(out), "--hgrm", str(tmp_path / "all.hgrm"),
                   "--threshold", "p99<10s"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["mode"] == "merged" and m["workers"] == 2
    assert m["requests"]["ok"] == a["requests"]["ok"] + b["requests"]["ok"] == 40
    assert m["latency_ms"]["count"] == 40
    expected = HdrHistogram.decode(a["histograms"]["latency"])
    expected.add(HdrHistogram.decode(b["histograms"]["latency"]))
    merged = HdrHistogram.decode(m["histograms"]["latency"])
    for p in (50, 90, 99, 100):
        assert merged.get_value_at_percentile(p) == expected.get_value_at_percentile(p)
    # these two ran one after the other: the report says their rates don't add up
    assert m["merge"]["start_spread_s"] > 0.5 and m["merge"]["notes"]
    assert "merged from 2 runs" in capsys.readouterr().out
    assert cli_main(["loadtest", "merge", str(files[0])]) == 1


def test_find_max_real_server_with_workers_kept_across_steps(make_server):
    # one replica of 50 ms: capacity 20/s
    srv = make_server(replicas=1, delay_ms=50, cache=True)
    from asyncvae.loadtest import FindMaxSpec

    fm = FindMaxSpec(slo_p99_ms=1000, start_rate=12, step_duration=1.0, min_samples=10, precision=0.5,
                     confirm=False, final_duration=1.5, step_slos=1.0)
    rep = run(LoadSpec(srv.url, find_max=fm, resolution=64, workers=2))
    f = rep.data["find_max"]
    assert 14 <= f["max_rate"] <= 24, f["steps"]
    pids = {tuple(s["pids"]) for s in f["steps"]}
    assert len(pids) == 1 and len(next(iter(pids))) == 2  # the same two processes ran every step
    assert f["steps"][-1]["role"] == "final" and f["confirmed"]
