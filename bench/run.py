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
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _serve import Server  # noqa: E402
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
#: Scenarios the independent server (``--server fast``) answers: cached uint8 decodes.
FAST_SCENARIOS = ("S1", "S2", "S3", "S4")


@dataclass
class Cell:
    scenario: str
    contender: str
    loop: str = "uvloop"
    extra: list[str] = field(default_factory=list)
    tag: str = ""  # "", "loop-study", "single-peak", "bufsize"


# --------------------------------------------------------------------------- cells


def _stats_or_none(srv: Server) -> dict[str, Any] | None:
    try:
        return srv.stats()
    except Exception:
        return None


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
        elif args.server == "fast" and s not in FAST_SCENARIOS:
            continue
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
    return name.startswith(("httpx", "aiohttp", "asyncvae_many", "asyncvae_calls"))


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
         tag: str = "", repeat: int | None = None) -> dict[str, Any] | None:
    for r in results:
        if (r.get("scenario") == scenario and r.get("contender") == contender and r.get("tag", "") == tag
                and "rps" in r and (loop is None or r.get("loop") in (loop, "-", "uvloop-thread"))
                and (repeat is None or r.get("repeat", 0) == repeat)):
            return r
    return None


def add_ratios(results: list[dict[str, Any]], default_loop: str) -> None:
    for r in results:
        if "rps" not in r:
            continue
        rep = r.get("repeat", 0)
        a = find(results, r["scenario"], "diffusers_seq", repeat=rep)
        d = find(results, r["scenario"], "aiohttp_64", r.get("loop") if r.get("loop") in ("uvloop", "asyncio")
                 else default_loop, repeat=rep)
        r["x_a"] = r["rps"] / a["rps"] if a and a["rps"] else None
        r["x_d"] = r["rps"] / d["rps"] if d and d["rps"] else None


def ratio(results: list[dict[str, Any]], scenario: str, a: str, b: str, loop: str | None,
          field: str = "rps") -> tuple[float, list[float]] | None:
    """The median over repeats of ``a[field] / b[field]``, each ratio taken within one
    repeat (both cells ran back to back), and the per-repeat ratios."""
    per: list[float] = []
    for rep in sorted({r.get("repeat", 0) for r in results}):
        ra = find(results, scenario, a, loop, repeat=rep)
        rb = find(results, scenario, b, loop, repeat=rep)
        if ra and rb and rb[field]:
            per.append(ra[field] / rb[field])
    if not per:
        return None
    return statistics.median(per), per


def _rs(x: tuple[float, list[float]]) -> str:
    return f"median {x[0]:.2f}x (runs: {', '.join(f'{v:.2f}' for v in x[1])})"


def targets(results: list[dict[str, Any]], loops: list[str]) -> list[tuple[str, bool | None, str]]:
    """(name, passed or None when not measured, detail)."""
    t: list[tuple[str, bool | None, str]] = []

    def line(name: str, ok: bool | None, detail: str) -> None:
        t.append((name, ok, detail))

    loop = loops[0]
    for s in ("S1", "S2", "S3", "S4"):
        for lp in loops:
            x = ratio(results, s, "asyncvae_many_default", "aiohttp_64", lp)
            if x is None:
                continue
            line(f"{s} [{lp}] decode_many (default Limits) >= 1.0x the aiohttp floor (d)", x[0] >= 1.0, _rs(x))
            c = ratio(results, s, "asyncvae_many_default", "aiohttp_64", lp, field="cpu_ms_per_req")
            if c is not None:
                g = median_of(results, s, "asyncvae_many_default", lp, "cpu_ms_per_req")
                d = median_of(results, s, "aiohttp_64", lp, "cpu_ms_per_req")
                line(f"{s} [{lp}] decode_many CPU ms/request <= the floor's", c[0] <= 1.0,
                     f"{g:.3f} vs {d:.3f} ms/req; {_rs(c)}")
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
                x6 = r6["rps"] / r5["rps"]
                line(f"S6 {c} >= 90% of its S5 rate", x6 >= 0.9, f"{r6['rps']:.1f} vs {r5['rps']:.1f} = {x6:.0%}")
    for mode in ("many", "calls"):
        x = ratio(results, "S7", f"asyncvae_{mode}_b8", f"asyncvae_{mode}_b1", loop)
        if x is None:
            continue
        b1 = find(results, "S7", f"asyncvae_{mode}_b1", loop)
        b8 = find(results, "S7", f"asyncvae_{mode}_b8", loop)
        assert b1 is not None and b8 is not None
        n = min(len(b1.get("digests", [])), len(b8.get("digests", [])))
        bad = sum(a != b for a, b in zip(b1.get("digests", [])[:n], b8.get("digests", [])[:n], strict=True))
        cs = b8.get("client_stats") or {}
        avg = cs["coalesced"] / cs["batches"] if cs.get("batches") else 0
        what = "decode_many" if mode == "many" else f"{b8.get('callers', 64)} decode() callers"
        line(f"S7 {what}: Limits(max_batch=8) >= 1.5x Limits()", x[0] >= 1.5, f"{_rs(x)}; avg batch {avg:.1f}")
        line(f"S7 {what}: coalesced results == uncoalesced", n > 0 and bad == 0, f"{n - bad}/{n} items identical")
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
        x = ratio(results, s, "asyncvae_sync_seq", "diffusers_seq", None)
        if x is not None:
            need = 3.0 if s == "S1" else 1.0
            line(f"{s} sync remote_decode sequential >= {need}x diffusers sequential", x[0] >= need, _rs(x))
    return t


def median_of(results: list[dict[str, Any]], scenario: str, contender: str, loop: str | None,
              field: str) -> float | None:
    vals = [r[field] for r in results if r.get("scenario") == scenario and r.get("contender") == contender
            and "rps" in r and not r.get("tag") and (loop is None or r.get("loop") == loop)]
    return statistics.median(vals) if vals else None


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
    hdr = ("| scen | contender | loop | run | req/s | MB/s | p50 ms | p99 ms | CPU ms/req | ΔRSS peak MiB | errors "
           "| ×(a) | ×(d) |")
    rows = [hdr, "|" + "---|" * 13]
    for r in results:
        if r.get("mode") == "single_peak":
            continue
        name = f"{CONTENDERS.get(r['contender'], ('?',))[0]}: {r['contender']}"
        if r.get("tag"):
            name += f" [{r['tag']}]"
        if "rps" not in r:
            why = r.get("failed") or r.get("skipped") or "?"
            rows.append(f"| {r['scenario']} | {name} | {r.get('loop', '')} | {r.get('repeat', 0)} | {why[:90]} |"
                        + " |" * 8)
            continue
        rss = r.get("rss_peak_growth_bytes")
        errs = str(r["errors"]) + (f" {r['error_kinds']}" if r["errors"] else "")
        rows.append(
            f"| {r['scenario']} | {name} | {r['loop']} | {r.get('repeat', 0)} | {r['rps']:.1f} | {r['mb_s']:.1f} "
            f"| {_f(r['p50_ms'], '.1f')} "
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
    p.add_argument("--repeat", type=int, default=1,
                   help="run every scenario's cells this many times, interleaved; targets use the median "
                        "of the per-run ratios (default 1)")
    p.add_argument("--server", choices=("asyncvae", "fast"), default="asyncvae",
                   help="'asyncvae': the reference server (default); 'fast': bench/fastserver.py, an "
                        "independent minimal endpoint (S1-S4 only) that makes client cost visible")
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
    fast = args.server == "fast"
    for s, cl in cells.items():
        sc = SCENARIOS[s]
        srv = Server(command=[sys.executable, os.path.join(HERE, "fastserver.py")]) if fast \
            else Server(list(sc.server_args))
        where = "bench/fastserver.py" if fast else " ".join(sc.server_args)
        print(f"[{s}] {sc.title} — server {srv.url} ({where})", flush=True)
        try:
            for rep in range(args.repeat):
                for c in cl:
                    req = args.requests or sc.max_requests[mode]
                    secs = args.seconds or sc.seconds[mode]
                    res = run_cell(c, srv.url, req, secs, not args.quiet)
                    res["repeat"] = rep
                    results.append(res)
            server_stats[s] = _stats_or_none(srv)
        finally:
            srv.stop()
    meta["elapsed_s"] = round(time.time() - t_start, 1)
    meta["server"] = args.server
    meta["repeat"] = args.repeat
    add_ratios(results, default_loop)
    tl = targets(results, [default_loop, "asyncio"] if args.loop == "both" else [default_loop])
    md = render(meta, results, tl)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{date}-{host}" + ("-quick" if args.quick else "")
                        + ("-fastserver" if fast else ""))
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
