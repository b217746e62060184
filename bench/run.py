"""asyncvae client benchmark: ``python -m bench [--quick]`` (or ``python bench/run.py``).

For each scenario it starts the reference server (``python -m asyncvae serve --cache``,
its own process), then runs each contender in its own process
(``bench/contenders.py``), one at a time, and collects one JSON line from each.
Results go to ``bench/results/<date>-<host>.json`` and ``.md``; the table and the
PASS/FAIL target lines are printed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from contenders import CONTENDERS  # noqa: E402
from scenarios import S7_SIDES, SCENARIOS  # noqa: E402

MAIN = ["diffusers_seq", "diffusers_threads8", "diffusers_threads32", "httpx_8", "httpx_64", "aiohttp_64",
        "wrk", "asyncvae_sync_seq", "asyncvae_many_default", "asyncvae_many_tuned", "asyncvae_batch"]
QUICK = ["diffusers_seq", "aiohttp_64", "wrk", "asyncvae_sync_seq", "asyncvae_many_default",
         "asyncvae_many_tuned"]
QUICK_S56 = ["aiohttp_64", "asyncvae_many_default", "asyncvae_many_tuned"]
ASYNCVAE_ALL = ["asyncvae_sync_seq", "asyncvae_many_default", "asyncvae_many_tuned", "asyncvae_batch"]
NOTE = ("Client and server share this machine's cores (the server is one Python process); "
        "every figure is the client's view, and contenders that burn more CPU also slow the server.")


@dataclass
class Cell:
    scenario: str
    contender: str
    loop: str = "uvloop"
    extra: list[str] = field(default_factory=list)
    tag: str = ""  # "", "loop-study", "single-peak", "bufsize"


# --------------------------------------------------------------------------- server


class Server:
    def __init__(self, args: list[str]):
        self.args = ["--port", "0", *args]
        cmd = [sys.executable, "-m", "asyncvae", "serve", *self.args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = ""
        deadline = time.time() + 60
        assert self.proc.stdout is not None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"server did not start: {' '.join(cmd)}")

    def stats(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.url.rstrip("/") + "/stats", timeout=5) as r:
                return json.loads(r.read())
        except Exception:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- cells


def run_cell(cell: Cell, url: str, requests: int, seconds: float, verbose: bool) -> dict[str, Any]:
    cmd = [sys.executable, os.path.join(HERE, "contenders.py"), cell.contender, "--url", url,
           "--scenario", cell.scenario, "--requests", str(requests), "--seconds", str(seconds),
           "--loop", cell.loop, *cell.extra]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 150)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = e.stdout or "", (e.stderr or "") + "\n[bench] timed out", -9
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    m = re.search(r"^BENCHJSON (\{.*\})$", out, re.M)
    if m:
        res = json.loads(m.group(1))
    else:
        tail = (err or out).strip().splitlines()[-3:]
        res = {"contender": cell.contender, "scenario": cell.scenario, "failed": f"rc={rc}: {' | '.join(tail)}"}
    res["loop"] = res.get("loop", cell.loop)
    res["tag"] = cell.tag
    res["cell_wall_s"] = round(time.time() - t0, 1)
    if cell.extra:
        res["args"] = cell.extra
    if verbose:
        print(f"  {cell.scenario} {cell.contender:24s} {cell.loop:8s} {cell.tag:12s} -> {_brief(res)}", flush=True)
    return res


def _brief(r: dict[str, Any]) -> str:
    if "failed" in r:
        return "FAILED " + r["failed"][:200]
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    if r.get("mode") == "single_peak":
        return f"one call grew RSS {r['rss_peak_growth_bytes'] / 2**20:.1f} MiB ({r['growth_over_response']:.2f}x response)"
    return (f"{r['rps']:.1f} req/s, {r['ok']} ok, {r['errors']} err, cpu {r['cpu_ms_per_req']:.2f} ms/req"
            f" ({r['cell_wall_s']} s)")


def plan(args: argparse.Namespace) -> dict[str, list[Cell]]:
    quick = args.quick
    scen = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    chosen = _select(args.contenders) if args.contenders else None
    loops = ["uvloop", "asyncio"] if args.loop == "both" else [args.loop]
    out: dict[str, list[Cell]] = {}
    for s in scen:
        cells: list[Cell] = []
        if s == "S7":
            names = [n for n in S7_SIDES if chosen is None or n in chosen or "asyncvae_many_tuned" in chosen]
            cells += [Cell(s, n, loops[0], ["--digests"]) for n in names]
        else:
            base = (QUICK_S56 if s in ("S5", "S6") else QUICK) if quick else MAIN
            names = [n for n in (chosen or base) if n in MAIN]
            if quick and chosen is None and s in ("S2", "S4"):
                names = [n for n in names if n != "wrk"]  # quick: the ceiling on S1 and S3 is enough
            for n in names:
                for lp in (loops if _is_async(n) else loops[:1]):
                    cells.append(Cell(s, n, lp))
        # loop study: (d) and (g) under both loops on S1 and S2/S3 (and read_bufsize probe)
        if args.loop_study and s in (("S3",) if quick else ("S1", "S2", "S3")) and len(loops) == 1:
            other = "asyncio" if loops[0] == "uvloop" else "uvloop"
            study = ["aiohttp_64", "asyncvae_many_tuned"] + ([] if quick else ["asyncvae_many_default"])
            for n in study:
                if chosen is None or n in chosen:
                    cells.append(Cell(s, n, other, tag="loop-study"))
            if s == "S3" and not quick and (chosen is None or "aiohttp_64" in chosen):
                for lp in ("uvloop", "asyncio"):
                    cells.append(Cell(s, "aiohttp_64", lp, ["--read-bufsize", str(1 << 20)], tag="bufsize-1MiB"))
        if s == "S4" and args.rss_single and (chosen is None or {"diffusers_seq", "asyncvae_sync_seq"} & chosen):
            for n in ("asyncvae_sync_seq", "diffusers_seq"):
                if chosen is None or n in chosen:
                    cells.append(Cell(s, n, loops[0], ["--single-peak"], tag="single-peak"))
        if cells:
            out[s] = cells
    return out


def _is_async(name: str) -> bool:
    return name.startswith(("httpx", "aiohttp", "asyncvae_many"))


def _select(spec: str) -> set[str]:
    got: set[str] = set()
    for tok in spec.split(","):
        tok = tok.strip()
        if not tok:
            continue
        hits = [n for n, (letter, _) in CONTENDERS.items() if tok in (n, letter) or n.startswith(tok)]
        if not hits:
            raise SystemExit(f"--contenders: {tok!r} matches nothing; names: {', '.join(CONTENDERS)} "
                             "(or letters a-h)")
        got.update(hits)
    return got


# --------------------------------------------------------------------------- analysis


def _key(r: dict[str, Any]) -> tuple[str, str, str]:
    return (r["scenario"], r["contender"], r.get("loop", ""))


def find(results: list[dict[str, Any]], scenario: str, contender: str, loop: str | None = None,
         tag: str = "") -> dict[str, Any] | None:
    for r in results:
        if (r.get("scenario") == scenario and r.get("contender") == contender and r.get("tag", "") == tag
                and "rps" in r and (loop is None or r.get("loop") in (loop, "-", "uvloop-thread"))):
            return r
    return None


def add_ratios(results: list[dict[str, Any]], default_loop: str) -> None:
    for r in results:
        if "rps" not in r:
            continue
        a = find(results, r["scenario"], "diffusers_seq")
        d = find(results, r["scenario"], "aiohttp_64", r.get("loop") if r.get("loop") in ("uvloop", "asyncio")
                 else default_loop)
        r["x_a"] = r["rps"] / a["rps"] if a and a["rps"] else None
        r["x_d"] = r["rps"] / d["rps"] if d and d["rps"] else None


def targets(results: list[dict[str, Any]], loop: str) -> list[tuple[str, bool | None, str]]:
    """(name, passed or None when not measured, detail)."""
    t: list[tuple[str, bool | None, str]] = []

    def line(name: str, ok: bool | None, detail: str) -> None:
        t.append((name, ok, detail))

    for s in ("S1", "S2", "S3", "S4"):
        d = find(results, s, "aiohttp_64", loop)
        for which in ("default", "tuned"):
            g = find(results, s, f"asyncvae_many_{which}", loop)
            if d and g:
                x = g["rps"] / d["rps"]
                line(f"{s} decode_many[{which}] >= 0.9x (d) aiohttp floor", x >= 0.9,
                     f"{g['rps']:.1f} vs {d['rps']:.1f} req/s = {x:.2f}x")
            elif g or d:
                line(f"{s} decode_many[{which}] >= 0.9x (d)", None, "one side not measured")
    for c in ("asyncvae_many_default", "asyncvae_many_tuned", "asyncvae_batch"):
        r5 = find(results, "S5", c, loop)
        if r5:
            floor = find(results, "S5", "aiohttp_64", loop)
            ctx = f" (aiohttp floor on this box: {floor['rps']:.1f} = {floor['rps'] / 320:.0%})" if floor else ""
            line(f"S5 {c} >= 95% of 320 req/s", r5["rps"] >= 304,
                 f"{r5['rps']:.1f} req/s = {r5['rps'] / 320:.0%}{ctx}")
        r6 = find(results, "S6", c, loop)
        if r6:
            lost = r6["errors"]
            line(f"S6 {c} loses 0 items", lost == 0, f"{lost} lost of {r6['ok'] + lost}; retries "
                 f"{(r6.get('client_stats') or {}).get('retries')}")
            if r5:
                x = r6["rps"] / r5["rps"]
                line(f"S6 {c} >= 90% of its S5 rate", x >= 0.9, f"{r6['rps']:.1f} vs {r5['rps']:.1f} = {x:.0%}")
    b1 = find(results, "S7", "asyncvae_many_b1", loop)
    b8 = find(results, "S7", "asyncvae_many_b8", loop)
    if b1 and b8:
        x = b8["rps"] / b1["rps"]
        n = min(len(b1.get("digests", [])), len(b8.get("digests", [])))
        same = b1.get("digests", [])[:n] == b8.get("digests", [])[:n] and n > 0
        bad = sum(a != b for a, b in zip(b1.get("digests", [])[:n], b8.get("digests", [])[:n], strict=True))
        cs = b8.get("client_stats") or {}
        avg = cs["coalesced"] / cs["batches"] if cs.get("batches") else 0
        line("S7 coalescing max_batch=8 >= 1.45x max_batch=1", x >= 1.45,
             f"{b8['rps']:.1f} vs {b1['rps']:.1f} items/s = {x:.2f}x (avg batch {avg:.1f})")
        line("S7 coalesced results == uncoalesced", same, f"{n - bad}/{n} items identical")
    mib = 1 << 20
    for which, limit in (("default", 1 << 30), ("tuned", SCENARIOS["S4"].tuned.get("max_inflight_bytes", 1 << 30))):
        g = find(results, "S4", f"asyncvae_many_{which}", loop)
        if g and "rss_peak_growth_bytes" in g:
            grow = g["rss_peak_growth_bytes"]
            line(f"S4 decode_many[{which}] peak RSS growth <= in-flight limit + 15%", grow <= 1.15 * limit,
                 f"{grow / mib:.0f} MiB vs limit {limit / mib:.0f} MiB")
    sp = find_peak(results, "asyncvae_sync_seq")
    if sp:
        line("S4 sync remote_decode of one 56 MiB answer grows RSS <= 1.2x", sp["growth_over_response"] <= 1.2,
             f"{sp['rss_peak_growth_bytes'] / mib:.1f} MiB = {sp['growth_over_response']:.2f}x "
             f"(diffusers: {_peak_txt(find_peak(results, 'diffusers_seq'))})")
    for s in ("S1", "S2", "S3", "S4"):
        f = find(results, s, "asyncvae_sync_seq")
        a = find(results, s, "diffusers_seq")
        if f and a:
            x = f["rps"] / a["rps"]
            need = 1.3 if s == "S1" else 1.0
            line(f"{s} sync remote_decode sequential >= {need}x diffusers sequential", x >= need,
                 f"{f['rps']:.1f} vs {a['rps']:.1f} req/s = {x:.2f}x")
    return t


def find_peak(results: list[dict[str, Any]], contender: str) -> dict[str, Any] | None:
    for r in results:
        if r.get("mode") == "single_peak" and r.get("contender") == contender and r.get("ok"):
            return r
    return None


def _peak_txt(r: dict[str, Any] | None) -> str:
    return "n/a" if r is None else f"{r['rss_peak_growth_bytes'] / 2**20:.1f} MiB = {r['growth_over_response']:.2f}x"


# --------------------------------------------------------------------------- report


def _f(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def table(results: list[dict[str, Any]]) -> str:
    hdr = ("| scen | contender | loop | req/s | MB/s | p50 ms | p99 ms | CPU ms/req | ΔRSS peak MiB | errors "
           "| ×(a) | ×(d) |")
    rows = [hdr, "|" + "---|" * 12]
    for r in results:
        if r.get("mode") == "single_peak":
            continue
        name = f"{CONTENDERS.get(r['contender'], ('?',))[0]}: {r['contender']}"
        if r.get("tag"):
            name += f" [{r['tag']}]"
        if "rps" not in r:
            why = r.get("failed") or r.get("skipped") or "?"
            rows.append(f"| {r['scenario']} | {name} | {r.get('loop', '')} | {why[:90]} |" + " |" * 8)
            continue
        rss = r.get("rss_peak_growth_bytes")
        errs = str(r["errors"]) + (f" {r['error_kinds']}" if r["errors"] else "")
        rows.append(
            f"| {r['scenario']} | {name} | {r['loop']} | {r['rps']:.1f} | {r['mb_s']:.1f} | {_f(r['p50_ms'], '.1f')} "
            f"| {_f(r['p99_ms'], '.1f')} | {r['cpu_ms_per_req']:.2f} | {_f(None if rss is None else rss / 2**20, '.1f')} "
            f"| {errs} | {_f(r.get('x_a'), '.2f')} | {_f(r.get('x_d'), '.2f')} |")
    return "\n".join(rows)


def render(meta: dict[str, Any], results: list[dict[str, Any]], tl: list[tuple[str, bool | None, str]]) -> str:
    lines = [f"# asyncvae client benchmark — {meta['date']} on {meta['host']}", "",
             f"mode: {meta['mode']}; {meta['cpus']} CPUs; load average at start {meta['loadavg_start']}; "
             f"python {meta['python']}; torch {meta['versions'].get('torch')}, aiohttp "
             f"{meta['versions'].get('aiohttp')}, httpx {meta['versions'].get('httpx')}, uvloop "
             f"{meta['versions'].get('uvloop')}", "", f"**Note:** {NOTE}", "",
             "Scenarios:", ""]
    for name in meta["scenarios"]:
        s = SCENARIOS[name]
        lines.append(f"- {name}: {s.title}; server `{' '.join(s.server_args)}`; tuned Limits {s.tuned}")
    lines += ["", "Columns: req/s = answers turned into tensors per second (S7: items/s); MB/s = response "
              "payload MB (1e6) per second; p50/p99 = per-request latency (decode_many/batch: item intake → "
              "result, includes the client's own queue); CPU = client process user+sys per answered request; "
              "ΔRSS = peak RSS over the idle baseline (after imports + one warm-up request); "
              "×(a) = req/s over diffusers sequential, ×(d) = over the minimal aiohttp loop (same event loop).",
              "", table(results), ""]
    peaks = [r for r in results if r.get("mode") == "single_peak"]
    if peaks:
        lines += ["One S4 call (56 MiB uint8 answer), peak RSS growth:", ""]
        for r in peaks:
            lines.append(f"- {r['contender']}: {_peak_txt(r)}")
        lines.append("")
    lines += ["## Targets", ""]
    for name, ok, detail in tl:
        lines.append(f"- {'PASS' if ok else ('FAIL' if ok is False else 'N/A ')} {name}: {detail}")
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "aiohttp", "httpx", "uvloop", "diffusers", "requests", "asyncvae"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "missing"
    out["wrk"] = shutil.which("wrk") or "missing"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer contenders, ~1 s cells (a smoke run, ~2-3 min)")
    p.add_argument("--contenders", help="comma list of names, prefixes or letters a-h (default: all / quick set)")
    p.add_argument("--scenarios", help="comma list, e.g. S1,S5 (default: S1-S7)")
    p.add_argument("--loop", choices=("uvloop", "asyncio", "both"), default="uvloop",
                   help="event loop of the async contenders (default uvloop; 'both' runs each twice)")
    p.add_argument("--no-loop-study", dest="loop_study", action="store_false",
                   help="skip the extra uvloop-vs-asyncio and read_bufsize cells")
    p.add_argument("--no-rss-single", dest="rss_single", action="store_false",
                   help="skip the one-call S4 RSS measurement")
    p.add_argument("--seconds", type=float, help="override the per-cell time budget")
    p.add_argument("--requests", type=int, help="override the per-cell request cap")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-cell progress lines")
    args = p.parse_args(argv)
    for s in (args.scenarios or "").split(","):
        if s and s not in SCENARIOS:
            raise SystemExit(f"--scenarios: unknown {s!r}; known: {', '.join(SCENARIOS)}")
    default_loop = "uvloop" if args.loop == "both" else args.loop
    mode = 0 if args.quick else 1
    cells = plan(args)
    host = socket.gethostname()
    date = dt.datetime.now().strftime("%Y-%m-%d")
    meta = {"date": date, "host": host, "mode": "quick" if args.quick else "full", "cpus": os.cpu_count(),
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()), "python": platform.python_version(),
            "versions": versions(), "scenarios": list(cells), "note": NOTE, "argv": sys.argv[1:]}
    print(f"asyncvae bench ({meta['mode']}): {sum(map(len, cells.values()))} cells over {', '.join(cells)}; "
          f"load average {meta['loadavg_start']} on {meta['cpus']} CPUs", flush=True)
    if not shutil.which("wrk"):
        print("  note: wrk not installed; contender (e) is skipped (apt-get install -y wrk)", flush=True)
    results: list[dict[str, Any]] = []
    server_stats: dict[str, Any] = {}
    t_start = time.time()
    for s, cl in cells.items():
        sc = SCENARIOS[s]
        srv = Server(list(sc.server_args))
        print(f"[{s}] {sc.title} — server {srv.url} ({' '.join(sc.server_args)})", flush=True)
        try:
            for c in cl:
                req = args.requests or sc.max_requests[mode]
                secs = args.seconds or sc.seconds[mode]
                results.append(run_cell(c, srv.url, req, secs, not args.quiet))
            server_stats[s] = srv.stats()
        finally:
            srv.stop()
    meta["elapsed_s"] = round(time.time() - t_start, 1)
    add_ratios(results, default_loop)
    tl = targets(results, default_loop)
    md = render(meta, results, tl)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{date}-{host}" + ("-quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results, "targets": [
            {"name": n, "pass": ok, "detail": d} for n, ok, d in tl], "server_stats": server_stats}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print()
    print(md)
    print(f"wrote {stem}.json and {stem}.md ({meta['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
