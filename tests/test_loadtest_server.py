"""``asyncvae loadtest`` against the real reference server (short runs, a second or two)."""

from __future__ import annotations

import json

import pytest

from asyncvae.cli import main as cli_main
from asyncvae.loadtest import LoadSpec, parse_threshold, run, run_async
from asyncvae.loadtest.cli import EXIT_THRESHOLD
from asyncvae.server import Faults

#: small requests so the server's compute doesn't matter: [1,4,8,8] latents → 64x64 images
SMALL = ("--resolution", "64", "--quiet")


def test_open_loop_real_server_rate_and_no_errors(make_server):
    srv = make_server(replicas=2, delay_ms=5, cache=True)
    rep = run(LoadSpec(srv.url, rate=40, duration=1.5, warmup=0.25, resolution=(64, 64)))
    d = rep.data
    assert d["requests"]["failed"] == 0 and d["errors"] == {}
    assert d["requests"]["ok"] == d["requests"]["sent"] == 60
    assert d["statuses"] == {"200": 60}
    assert rep.achieved_rate == pytest.approx(40, rel=0.15)
    assert d["rate"]["sent"] == pytest.approx(40, rel=0.15)
    assert d["latency_ms"]["p50"] >= 5.0  # the server holds each request 5 ms
    assert d["bytes"]["in"] == 60 * 64 * 64 * 3
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
    d = run(LoadSpec(srv.url, rate=50, duration=1.0, resolution=(64, 64), retries=4)).data
    assert d["retries"]["http_503"] > 5
    assert d["requests"]["failed"] <= 8  # ~50 × 0.5⁵ expected


def test_bad_answers_are_errors(make_server):
    srv = make_server(cache=False, faults=Faults(fault_bad_headers=1.0))
    d = run(LoadSpec(srv.url, rate=20, duration=0.5, resolution=(64, 64))).data
    assert d["requests"]["ok"] == 0 and d["requests"]["failed"] == 10
    assert set(d["errors"]) <= {"protocol", "invalid_response"}


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
    assert doc["schema"] == "asyncvae.loadtest/1"
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
    assert "--rate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["loadtest", "http://127.0.0.1:9/", "--rate", "1", "--duration", "1s", "--threshold", "bogus"])
    assert e.value.code == 2
    assert cli_main(["loadtest", "http://127.0.0.1:9/", "--find-max"]) == 1  # needs --slo-p99
    assert "--slo-p99" in capsys.readouterr().err


def test_cli_plot_without_matplotlib_says_how_to_install(make_server, capsys, tmp_path):
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


def test_connection_refused_counts_as_errors():
    d = run(LoadSpec("http://127.0.0.1:9/", rate=20, duration=0.25, timeout=2)).data
    assert d["requests"]["failed"] == 5 and d["errors"] == {"connection": 5}
    assert parse_threshold("errors<1%").check(d)["ok"] is False


@pytest.mark.slow
def test_workers_merge_real_runs(make_server):
    srv = make_server(replicas=2, delay_ms=2, cache=True)
    rep = run(LoadSpec(srv.url, rate=40, duration=1.0, workers=2, resolution=(64, 64)))
    d = rep.data
    assert d["workers"] == 2 and len(d["schedule"]["workers"]) == 2
    assert d["requests"]["ok"] == 40 and d["latency_ms"]["count"] == 40
    assert rep.latency.get_total_count() == 40
