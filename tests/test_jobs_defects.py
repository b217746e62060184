"""Issue 11: each reproduced defect of the dataset jobs, pinned through the CLI and the
public API, against the real reference server on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import asyncvae
from asyncvae.cli import main
from asyncvae.jobs import (
    JobAborted,
    decode_dataset,
    encode_dataset,
    list_inputs,
    load_image,
    read_safetensors,
    scan_inputs,
)
from asyncvae.jobs.storage import Storage, temp_name
from asyncvae.server import Faults, LocalServer, ServerConfig

RES = 32


def _img(path: Path, seed: int, size: tuple[int, int] = (48, 40), fmt: str | None = None) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _folder(root: Path, n: int, start: int = 0) -> Path:
    for i in range(start, start + n):
        _img(root / f"img_{i:03d}.png", i)
    return root


def _rows(out: Path, pattern: str = "shard-*.parquet") -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for p in sorted(out.glob(pattern)):
        rows += [{k: v for k, v in r.items() if v is not None and k != "latent"} for r in pq.read_table(p).to_pylist()]
    return rows


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def srv():
    with LocalServer(ServerConfig(replicas=2)) as s:
        yield s


def _enc(inputs, out, url, **kw):
    kw.setdefault("resolution", RES)
    kw.setdefault("quiet", True)
    kw.setdefault("concurrency", 4)
    return encode_dataset(inputs, out, endpoint=url, **kw)


# --------------------------------------------------------------------------- endpoint identity


def test_no_endpoint_is_refused_with_the_choices(tmp_path: Path, capsys):
    _folder(tmp_path / "in", 2)
    rc, err = _run(["encode", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "-q"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "--endpoint URL" in err and "--endpoint builtin" in err and "--demo" in err
    assert not (tmp_path / "o" / "job.json").exists()
    with pytest.raises(asyncvae.InputError, match="no endpoint"):
        encode_dataset(tmp_path / "in", tmp_path / "o2", resolution=RES, quiet=True)


def test_endpoint_and_model_are_recorded_and_checked_on_resume(tmp_path: Path, srv, make_server, capsys):
    _folder(tmp_path / "in", 6)
    out = tmp_path / "o"
    url = srv.url.rstrip("/") + "/?token=secret"  # a query is never recorded
    s = _enc(tmp_path / "in", out, url, shard_size=4)
    assert s.ok == 6
    job = json.loads((out / "job.json").read_text())
    assert job["endpoint"] == [srv.url] and job["model"] == {"latent_channels": 4, "latent_downsample": 8}
    assert "secret" not in (out / "job.json").read_text()
    meta = read_safetensors(out / "shard-00000.safetensors")[1]
    assert meta["endpoint"] == srv.url and meta["latent_channels"] == "4"
    # another endpoint: refused unless the user says so
    other = make_server()
    _folder(tmp_path / "in", 1, start=6)
    rc, err = _run(["encode", str(tmp_path / "in"), "--out", str(out), "--endpoint", other.url,
                    "--resolution", str(RES), "--shard-size", "4", "-q"], capsys)
    assert rc == 1 and "--allow-endpoint-change" in err and srv.url in err
    rc, err = _run(["encode", str(tmp_path / "in"), "--out", str(out), "--endpoint", other.url,
                    "--resolution", str(RES), "--shard-size", "4", "-q", "--allow-endpoint-change"], capsys)
    assert rc == 0, err
    # an endpoint whose model gives 16-channel latents: aborted before anything is mixed in
    flux = make_server(latent_channels=16)
    _folder(tmp_path / "in", 1, start=7)
    before = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    rc, err = _run(["encode", str(tmp_path / "in"), "--out", str(out), "--endpoint", flux.url,
                    "--resolution", str(RES), "--shard-size", "4", "-q", "--allow-endpoint-change"], capsys)
    assert rc == 4 and "latent_channels=16" in err and "latent_channels=4" in err
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == before


# --------------------------------------------------------------------------- failure classes


def test_outage_leaves_shards_incomplete_and_a_rerun_resends_only_those(tmp_path: Path, make_server, capsys):
    _folder(tmp_path / "in", 10)
    down = make_server(faults=Faults(fault_502_html=1.0))
    out = tmp_path / "o"
    args = ["encode", str(tmp_path / "in"), "--out", str(out), "--resolution", str(RES), "--shard-size", "4",
            "--retries", "1", "-q", "--allow-failures"]
    rc, err = _run([*args, "--endpoint", down.url], capsys)
    assert rc == 3 and "run the same command again" in err  # --allow-failures never hides endpoint failures
    assert not list(out.glob("*_stats.json"))  # nothing looks complete
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert len(fails) == 10 and {f["class"] for f in fails} == {"endpoint"} and fails[0]["kind"] == "http_502"
    # the endpoint is back: the same command finishes the job
    down.set_faults(Faults())
    rc, err = _run([*args, "--endpoint", down.url, "--json"], capsys)
    assert rc == 0, err
    assert len(list(out.glob("*_stats.json"))) == 3 and not (out / "failures.jsonl").exists()
    # a partial outage: only the failed items are sent again
    out2 = tmp_path / "o2"
    flaky = make_server(faults=Faults(fault_502_html=0.5), seed=3)
    s1 = _enc(tmp_path / "in", out2, flaky.url, shard_size=4, retry=asyncvae.Retry.none(), max_failure_rate=1.0)
    assert 0 < s1.endpoint_failures < 10 and s1.input_failures == 0
    flaky.set_faults(Faults())
    s2 = _enc(tmp_path / "in", out2, flaky.url, shard_size=4)
    assert s2.sent == s1.endpoint_failures and s2.ok == 10 and s2.failures == 0


def test_input_and_endpoint_failures_are_told_apart(tmp_path: Path, srv):
    _folder(tmp_path / "in", 3)
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    s = _enc(tmp_path / "in", tmp_path / "o", srv.url)
    assert (s.input_failures, s.endpoint_failures) == (1, 0)
    assert (tmp_path / "o" / "shard-00000_stats.json").exists()  # a bad input is final: complete
    row = next(r for r in _rows(tmp_path / "o") if r["key"] == "bad")
    assert row["error_class"] == "input" and row["error_kind"] == "input"


@pytest.mark.parametrize("path, status", [("nope/", 404)])
def test_fatal_statuses_abort_at_once(tmp_path: Path, srv, capsys, path: str, status: int):
    _folder(tmp_path / "in", 5)
    rc, err = _run(["encode", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--endpoint", srv.url + path,
                    "--resolution", str(RES), "-q"], capsys)
    assert rc == 4 and len(err.strip().splitlines()) == 1
    assert f"HTTP {status}" in err and "check the endpoint URL" in err
    assert not list((tmp_path / "o").glob("*_stats.json"))


def test_max_failure_rate_aborts_a_job_failing_wholesale(tmp_path: Path, make_server, capsys):
    _folder(tmp_path / "in", 60)
    down = make_server(faults=Faults(fault_502_html=1.0))
    rc, err = _run(["encode", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--endpoint", down.url,
                    "--resolution", str(RES), "--retries", "1", "--max-failure-rate", "0.5", "-q",
                    "--concurrency", "2", "--shard-size", "100"], capsys)
    assert rc == 4 and "--max-failure-rate" in err and "HTTP 502" in err
    assert not list((tmp_path / "o").glob("*_stats.json"))


# --------------------------------------------------------------------------- safe paths


def test_decode_never_writes_outside_out(tmp_path: Path, srv, capsys):
    from safetensors.torch import save_file

    src = tmp_path / "lat"
    src.mkdir()
    z = torch.zeros(4, 2, 2)
    save_file({"../../evil_st": z.clone(), "/tmp/abs_evil": z.clone(), "fine": z.clone()}, str(src / "a.safetensors"),
              metadata={"asyncvae_version": "0.1.0"})
    torch.save({"../evil_pt": z.clone(), "/abs_pt": z.clone(), "ok": z.clone()}, src / "b.pt")
    with tarfile.open(src / "c.tar", "w") as tf:
        buf = io.BytesIO()
        np.save(buf, z.numpy())
        for name in ("../../evil_tar.npy", "good.npy"):
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    out = tmp_path / "deep" / "out"
    rc, err = _run(["decode", str(src), "--out", str(out), "--endpoint", srv.url, "-q", "--allow-failures"], capsys)
    assert rc == 0, err
    leaked = [p for p in tmp_path.rglob("*evil*") if p.suffix == ".png"] + list(Path("/tmp").glob("abs_evil*"))
    assert leaked == []
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["b/ok.png", "fine.png", "good.png"]
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert len(fails) == 5 and all(f["class"] == "input" and "unsafe name" in f["reason"] for f in fails)


def test_storage_checks_every_name(tmp_path: Path):
    st = Storage(tmp_path / "o")
    st.ensure()
    for bad in ("../x", "/etc/passwd", "a/../../x", "a\\b", ""):
        with pytest.raises(asyncvae.InputError):
            st.path(bad)
    (tmp_path / "o" / "link").symlink_to(tmp_path)
    with pytest.raises(asyncvae.InputError, match="link"):
        st.path("link/escape.png")


# --------------------------------------------------------------------------- extend


def test_adding_inputs_extends_instead_of_refusing(tmp_path: Path, srv):
    src = _folder(tmp_path / "in", 10)
    out = tmp_path / "o"
    s = _enc(src, out, srv.url, shard_size=4)
    assert (s.ok, s.shards_written) == (10, 3)
    before = {p.name: p.read_bytes() for p in out.glob("shard-0000[01].*")}
    _img(src / "img_004b.png", 99)  # sorts in the middle: nothing shifts
    s = _enc(src, out, srv.url, shard_size=4)
    assert s.sent == 1 and s.ok == 11 and s.shards_written == 1 and s.shards_skipped == 2
    assert {p.name: p.read_bytes() for p in out.glob("shard-0000[01].*")} == before
    assert [r["key"] for r in _rows(out, "shard-00002.parquet")] == ["img_008", "img_009", "img_004b"]
    for i in range(3):
        _img(src / f"new_{i}.png", 200 + i)
    s = _enc(src, out, srv.url, shard_size=4)
    assert s.sent == 3 and s.ok == 14 and sorted(p.name for p in out.glob("*_stats.json"))[-1] == "shard-00003_stats.json"


def test_overwrite_with_fewer_inputs_removes_stale_shards(tmp_path: Path, srv):
    src = _folder(tmp_path / "in", 9)
    out = tmp_path / "o"
    assert _enc(src, out, srv.url, shard_size=3).shards_written == 3
    for p in sorted(src.glob("*.png"))[4:]:
        p.unlink()
    (out / "notes.parquet").write_bytes(b"not ours")  # a user's file is never removed
    s = _enc(src, out, srv.url, shard_size=3, overwrite=True)
    assert (out / "notes.parquet").read_bytes() == b"not ours"
    assert s.ok == 4 and s.shards_written == 2
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00000.parquet", "shard-00000.safetensors", "shard-00000_stats.json",
        "shard-00001.parquet", "shard-00001.safetensors", "shard-00001_stats.json",
    ]
    keys = [k for p in out.glob("shard-*.safetensors") for k, _ in read_safetensors(p)[0]]
    assert sorted(keys) == [f"img_{i:03d}" for i in range(4)]


def _tar(path: Path, names: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in names.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_tars_map_one_to_one_and_group_by_first_dot(tmp_path: Path, srv):
    a = _tar(tmp_path / "00000.tar", {
        "0001.input.jpg": _png_bytes(1), "0001.mask.png": _png_bytes(2), "0001.txt": b"a cat",
        "0001.json": b'{"id": 1}', "0001.cls": b"7", "0002.png": _png_bytes(3),
    })
    b = _tar(tmp_path / "00001.tar", {"0003.png": _png_bytes(4)})
    items = list_inputs([a, b])
    assert [i.key for i in items] == ["0001", "0002", "0003"]  # one sample per key, not per member
    out = tmp_path / "o"
    s = _enc([a, b], out, srv.url, format="webdataset", shard_size=100)
    assert s.ok == 3 and sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    row = next(r for r in _rows(out, "00000.parquet") if r["key"] == "0001")
    assert row["caption"] == "a cat" and json.loads(row["json"]) == {"id": 1} and row["cls"] == "7"
    assert row["source"] == "00000.tar#0001.input.jpg"
    with tarfile.open(out / "00000.tar") as tf:
        assert tf.extractfile("0001.txt").read() == b"a cat"  # type: ignore[union-attr]
    c = _tar(tmp_path / "00002.tar", {"0004.png": _png_bytes(5)})
    s = _enc([a, b, c], out, srv.url, format="webdataset", shard_size=100)
    assert s.sent == 1 and s.shards_skipped == 2 and (out / "00002.tar").exists()


# --------------------------------------------------------------------------- listing


def test_symlink_loop_and_broken_links_are_handled(tmp_path: Path, srv, capsys):
    src = _folder(tmp_path / "in", 6)
    (src / "loop").symlink_to(src)
    (src / "sub").mkdir()
    (src / "sub" / "back").symlink_to(src)
    assert len(list_inputs(src)) == 6
    (src / "dangling").symlink_to(tmp_path / "nowhere")
    listing = scan_inputs(src)
    assert len(listing.items) == 6 and listing.problems and "broken" in listing.problems[0][1]
    rc, err = _run(["encode", str(src), "--out", str(tmp_path / "o"), "--endpoint", srv.url,
                    "--resolution", str(RES), "-q"], capsys)
    assert rc == 1 and "dangling" in err and "--skip-bad-inputs" in err
    rc, err = _run(["encode", str(src), "--out", str(tmp_path / "o"), "--endpoint", srv.url,
                    "--resolution", str(RES), "-q", "--skip-bad-inputs", "--allow-failures"], capsys)
    assert rc == 0
    assert "dangling" in (tmp_path / "o" / "failures.jsonl").read_text()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder_is_reported(tmp_path: Path):  # pragma: no cover - root in CI
    src = _folder(tmp_path / "in", 2)
    (src / "private").mkdir()
    _img(src / "private" / "x.png", 1)
    os.chmod(src / "private", 0)
    try:
        assert scan_inputs(src).problems
    finally:
        os.chmod(src / "private", 0o755)


def test_corrupt_tar_is_detected(tmp_path: Path, srv, capsys):
    t = _tar(tmp_path / "c.tar", {f"{i:04d}.png": _png_bytes(i) for i in range(4)})
    raw = bytearray(t.read_bytes())
    with tarfile.open(t) as tf:
        members = [m.offset for m in tf]
    raw[members[2] + 100 : members[2] + 108] = b"garbage!"  # the third header's mode field
    t.write_bytes(bytes(raw))
    listing = scan_inputs(t)
    assert len(listing.items) == 2 and "corrupt tar" in listing.problems[0][1]
    rc, err = _run(["encode", str(t), "--out", str(tmp_path / "o"), "--endpoint", srv.url,
                    "--resolution", str(RES), "-q"], capsys)
    assert rc == 1 and "corrupt tar" in err


def test_keys_and_index_do_not_depend_on_how_the_root_is_spelled(tmp_path: Path, srv, monkeypatch):
    src = _folder(tmp_path / "ds", 3)
    _img(src / "img_000.jpg", 50, fmt="JPEG")  # same stem as img_000.png: a deduplicated key
    (tmp_path / "mnt").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    spellings = ["ds", str(src), str(tmp_path / "mnt"), "./ds/"]
    listings = [[(i.key, i.source) for i in list_inputs(s)] for s in spellings]
    assert all(lst == listings[0] for lst in listings)
    out = tmp_path / "o"
    _enc("ds", out, srv.url)
    index = (out / "shard-00000.parquet").read_bytes()
    s = _enc(str(tmp_path / "mnt"), out, srv.url)  # a second machine mounting it elsewhere
    assert s.sent == 0 and s.shards_skipped == 1
    assert (out / "shard-00000.parquet").read_bytes() == index


def test_sidecars_and_csv_columns_are_carried(tmp_path: Path, srv):
    src = _folder(tmp_path / "in", 2)
    (src / "img_000.txt").write_text("a red square")
    (src / "img_000.json").write_text('{"url": "http://example/x.jpg"}')
    lst = tmp_path / "list.csv"
    lst.write_text(f"url,caption,aesthetic\n{src / 'img_001.png'},a blue thing,6.5\n")  # img2dataset-style header
    items = list_inputs(lst)
    assert len(items) == 1 and items[0].caption == "a blue thing" and dict(items[0].extra) == {"aesthetic": "6.5"}
    out = tmp_path / "o"
    _enc([src, lst], out, srv.url, format="parquet")
    rows = {r["source"]: r for r in _rows(out)}
    assert rows["in/img_000.png"]["caption"] == "a red square"
    assert json.loads(rows["in/img_000.png"]["json"]) == {"url": "http://example/x.jpg"}
    listed = rows[str(src / "img_001.png")]
    assert listed["caption"] == "a blue thing" and json.loads(listed["extra"]) == {"aesthetic": "6.5"}


# --------------------------------------------------------------------------- pixels


def test_16_bit_images_are_scaled_not_white(tmp_path: Path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "eight.png")
    deep = load_image(tmp_path / "deep.png", (RES, RES)).pixels.astype(int)
    eight = load_image(tmp_path / "eight.png", (RES, RES)).pixels.astype(int)
    assert deep.mean() < 200 and np.abs(deep - eight).max() <= 1
    big = np.full((8, 8), 70000, np.int32)
    with pytest.raises(asyncvae.InputError, match="range is unknown"):
        from asyncvae.jobs import prepare

        prepare(Image.fromarray(big, "I"), (8, 8))


def test_pixel_cap_is_checked_before_decoding(tmp_path: Path, srv):
    Image.new("L", (10000, 10000)).save(tmp_path / "huge.png", optimize=True)  # ~100 KB on disk
    _img(tmp_path / "fine.png", 1)
    s = _enc(tmp_path, tmp_path / "o", srv.url)
    assert s.ok == 1 and s.input_failures == 1
    row = next(r for r in _rows(tmp_path / "o") if r["key"] == "huge")
    assert "10000x10000" in row["error"] and "--max-pixels" in row["error"]


def test_preprocessing_uses_the_cpus_this_process_may_use():
    from asyncvae.jobs.prep import available_cpus

    assert available_cpus() == len(os.sched_getaffinity(0))


def test_process_pool_gives_the_same_latents_as_threads(tmp_path: Path, srv):
    src = _folder(tmp_path / "in", 8)
    a = _enc(src, tmp_path / "p", srv.url, pool="process", workers=2)
    b = _enc(src, tmp_path / "t", srv.url, pool="thread")
    assert a.ok == b.ok == 8
    assert (tmp_path / "p" / "shard-00000.safetensors").read_bytes() == (tmp_path / "t" / "shard-00000.safetensors").read_bytes()


# --------------------------------------------------------------------------- formats


def test_parquet_output_loads_with_datasets(tmp_path: Path, srv):
    datasets = pytest.importorskip("datasets")
    src = _folder(tmp_path / "in", 5)
    (src / "img_001.txt").write_text("caption one")
    out = tmp_path / "o"
    _enc(src, out, srv.url, format="parquet", shard_size=3)
    ds = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train").with_format("numpy")
    assert len(ds) == 5 and ds[0]["latent"].shape == (4, RES // 8, RES // 8)
    assert ds[1]["caption"] == "caption one" and ds[1]["key"] == "img_001"
    _enc(src, tmp_path / "st", srv.url)
    expected = dict(read_safetensors(tmp_path / "st" / "shard-00000.safetensors")[0])
    np.testing.assert_array_equal(ds[2]["latent"].astype(np.float16), expected["img_002"].numpy())


def test_fsspec_urls_as_out(tmp_path: Path, srv):
    import fsspec

    src = _folder(tmp_path / "in", 3)
    s = _enc(src, "memory://asyncvae-test/latents", srv.url)
    assert s.ok == 3
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("/asyncvae-test/latents", detail=False))
    assert "shard-00000.safetensors" in names and "shard-00000_stats.json" in names and "job.json" in names
    s = _enc(src, "memory://asyncvae-test/latents", srv.url)
    assert s.sent == 0 and s.shards_skipped == 1
    s = _enc(src, f"file://{tmp_path}/viafile", srv.url)
    assert s.ok == 3 and (tmp_path / "viafile" / "shard-00000_stats.json").exists()


# --------------------------------------------------------------------------- decode


def test_decode_malformed_inputs_fail_in_one_line(tmp_path: Path, srv, capsys):
    src = tmp_path / "lat"
    src.mkdir()
    (src / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (src / "junk.pt").write_bytes(b"not a pickle")
    (src / "shape.pt").write_bytes(b"")
    torch.save(torch.zeros(4, 2, 2), src / "good.pt")
    torch.save(torch.zeros(2, 2), src / "flat.pt")
    rc, err = _run(["decode", str(src), "--out", str(tmp_path / "o"), "--endpoint", srv.url, "-q"], capsys)
    assert rc == 3 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    fails = {json.loads(x)["source"]: json.loads(x) for x in (tmp_path / "o" / "failures.jsonl").read_text().splitlines()}
    assert set(fails) == {"trunc.safetensors", "junk.pt", "shape.pt", "flat.pt"}
    assert "safetensors" in fails["trunc.safetensors"]["reason"] and "[C,h,w]" in fails["flat.pt"]["reason"]
    assert (tmp_path / "o" / "good.png").exists() and (tmp_path / "o" / "good_stats.json").exists()
    assert json.loads((tmp_path / "o" / "job.json").read_text())["kind"] == "decode"


def test_decode_resume_batched_latents_and_webdataset_failures(tmp_path: Path, srv):
    src = tmp_path / "lat"
    src.mkdir()
    torch.save(torch.randn(3, 4, 2, 2), src / "batch.pt")
    out = tmp_path / "o"
    s = decode_dataset(src, out, endpoint=srv.url, quiet=True)
    assert s.ok == 1 and sorted(p.name for p in (out / "batch").iterdir()) == ["000.png", "001.png", "002.png"]
    (out / "batch_stats.json").unlink()  # as if killed before the marker: done images are kept
    s = decode_dataset(src, out, endpoint=srv.url, quiet=True)
    assert s.processed == 0 and s.sent == 0 and s.ok == 1
    # a WebDataset decode whose input has a bad member keeps its failure on resume
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 2, 2), np.float16))
    t = _tar(tmp_path / "w.tar", {"good.npy": buf.getvalue(), "bad.npy": b"\x93NUMPY garbage"})
    wout = tmp_path / "w"
    for _ in range(2):
        s = decode_dataset(t, wout, endpoint=srv.url, format="webdataset", quiet=True)
        assert s.failures == 1 and s.ok == 1
        assert "bad" in (wout / "failures.jsonl").read_text()


def test_shift_only_scaling_is_undone(tmp_path: Path, srv):
    src = _folder(tmp_path / "in", 1)
    _enc(src, tmp_path / "shift", srv.url, shift_factor=0.25, dtype="float32")
    _enc(src, tmp_path / "raw", srv.url, dtype="float32")
    (_, a), = read_safetensors(tmp_path / "shift" / "shard-00000.safetensors")[0]
    (_, b), = read_safetensors(tmp_path / "raw" / "shard-00000.safetensors")[0]
    torch.testing.assert_close(a, b - 0.25, atol=1e-3, rtol=1e-3)
    decode_dataset(tmp_path / "shift", tmp_path / "ds", endpoint=srv.url, quiet=True)
    decode_dataset(tmp_path / "raw", tmp_path / "dr", endpoint=srv.url, quiet=True)
    ia = np.asarray(Image.open(tmp_path / "ds" / "img_000.png"), dtype=np.int16)
    ib = np.asarray(Image.open(tmp_path / "dr" / "img_000.png"), dtype=np.int16)
    assert np.abs(ia - ib).max() <= 2


# --------------------------------------------------------------------------- coordination


def test_job_json_is_created_once_and_temp_files_cannot_collide(tmp_path: Path, srv):
    st = Storage(tmp_path / "o")
    st.ensure()
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        wins.append(st.create_exclusive("job.json", f'{{"who": {i}}}'))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    a, b = temp_name("shard-00000.safetensors"), temp_name("shard-00000.safetensors")
    assert a != b and str(os.getpid()) in a
    # a live writer's temp file on another machine is left alone by this machine's run
    src = _folder(tmp_path / "in", 2)
    out = tmp_path / "shared"
    out.mkdir()
    theirs = out / ".shard-00000.safetensors.otherhost-1234-abcdef012345.tmp"
    theirs.write_bytes(b"partial")
    _enc(src, out, srv.url)
    assert theirs.exists()


def test_writer_queue_is_bounded(tmp_path: Path, srv):
    src = _folder(tmp_path / "in", 12)
    s = _enc(src, tmp_path / "o", srv.url, shard_size=1, writers=1)
    assert s.ok == 12 and s.shards_written == 12


def test_aborted_job_raises_with_summary(tmp_path: Path, srv):
    _folder(tmp_path / "in", 2)
    with pytest.raises(JobAborted) as e:
        _enc(tmp_path / "in", tmp_path / "o", srv.url + "missing/")
    assert "HTTP 404" in str(e.value) and e.value.summary.aborted  # type: ignore[attr-defined]
