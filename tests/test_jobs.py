"""Dataset jobs (``asyncvae encode`` / ``decode``) against the real reference server."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import asyncvae
from asyncvae.cli import main
from asyncvae.jobs import (
    decode_dataset,
    encode_dataset,
    list_inputs,
    load_image,
    read_safetensors,
    select_shards,
    to_wire_tensor,
)
from asyncvae.server import LocalServer, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
RES = 64
SIZES = [(64, 64), (96, 64), (64, 128), (80, 72), (128, 96), (72, 72)]
N_IMAGES = 300  # including the special ones below


def _write_dataset(root: Path) -> dict[str, str]:
    """~300 small images in nested folders; returns {special name: key}."""
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES - 5):
        w, h = SIZES[i % len(SIZES)]
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        ext = "png" if i % 5 == 0 else "jpg"
        Image.fromarray(arr).save(sub / f"img_{i:04d}.{ext}", quality=90)
    gray = Image.fromarray(rng.integers(0, 256, (72, 96), dtype=np.uint8), "L")
    gray.save(root / "gray.png")
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "Weird Name (1).webp")
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, format="JPEG")
    (root / "corrupt.jpg").write_bytes(good.getvalue()[:200])  # truncated JPEG
    (root / "notes.txt").write_text("not an image\n")  # ignored by the folder listing
    return {"gray": "gray", "alpha": "alpha", "rotated": "rotated", "corrupt": "corrupt", "weird": "Weird_Name_1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _write_dataset(root)
    return root


@pytest.fixture(scope="module")
def module_server():
    with LocalServer(ServerConfig(replicas=2)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(dataset: Path, module_server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted CLI run over the whole dataset (shard size 64)."""
    out = tmp_path_factory.mktemp("reference")
    rc = main(["encode", str(dataset), "--out", str(out), "--endpoint", module_server.url,
               "--resolution", str(RES), "--shard-size", "64", "--concurrency", "8", "-q"])
    assert rc == 3  # the corrupt file failed, without --allow-failures
    return out


def _shard_latents(out: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for p in sorted(out.glob("shard-*.safetensors")):
        tensors, meta = read_safetensors(str(p))
        assert meta["resolution"] == f"{RES}x{RES}" and meta["dtype"] == "float16"
        for k, t in tensors:
            assert k not in found
            found[k] = t
    return found


def _index_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for p in sorted(out.glob("shard-*.parquet")):
        rows += [{k: v for k, v in r.items() if v is not None} for r in pq.read_table(p).to_pylist()]
    return rows


# --------------------------------------------------------------------------- encode


async def test_encode_folder_matches_client_encode(dataset: Path, reference: Path, module_server: LocalServer):
    items = list_inputs(dataset)
    assert len(items) == N_IMAGES
    keys = [i.key for i in items]
    rels = [os.path.relpath(i.source, dataset) for i in items]
    assert rels == sorted(rels)  # deterministic listing
    latents = _shard_latents(reference)
    assert set(latents) == set(keys) - {"corrupt"}
    fails = [json.loads(line) for line in (reference / "failures.jsonl").read_text().splitlines()]
    assert [f["key"] for f in fails] == ["corrupt"] and fails[0]["reason"]
    assert len(list(reference.glob("shard-*_stats.json"))) == -(-N_IMAGES // 64)
    # every stored latent equals Client.encode of the same preprocessed image
    good = [i for i in items if i.key != "corrupt"]
    tensors = [to_wire_tensor(load_image(i.path, (RES, RES)).pixels) for i in good]
    async with asyncvae.Client(module_server.url) as client:
        got = [r async for r in client.encode_many(tensors)]
    for item, r in zip(good, got, strict=True):
        assert torch.equal(r[0].to(torch.float16), latents[item.key]), item.key
        assert latents[item.key].shape == (4, RES // 8, RES // 8)


def test_preprocessing_rules_and_index(dataset: Path, reference: Path, module_server: LocalServer):
    rows = {r["key"]: r for r in _index_rows(reference)}
    assert len(rows) == N_IMAGES
    assert rows["corrupt"]["status"] == "failed" and "error" in rows["corrupt"]
    assert rows["corrupt"]["error_class"] == "input" and rows["corrupt"]["error_kind"] == "input"
    assert (rows["rotated"]["width"], rows["rotated"]["height"]) == (64, 128)  # EXIF orientation applied
    assert (rows["gray"]["width"], rows["gray"]["height"]) == (96, 72) and rows["gray"]["crop"] == [12.0, 0.0, 84.0, 72.0]
    assert rows["Weird_Name_1"]["source"].endswith("Weird Name (1).webp")
    gray = load_image(dataset / "gray.png", (RES, RES)).pixels
    assert gray.shape == (RES, RES, 3) and (gray[..., 0] == gray[..., 1]).all()
    alpha = load_image(dataset / "alpha.png", (RES, RES)).pixels
    assert (alpha[:, :30] == 255).all()  # transparent half composited on white
    assert (alpha[:, 34:, 0] == 200).all() and (alpha[:, 34:, 1] == 0).all()
    dropped = load_image(dataset / "alpha.png", (RES, RES), alpha="drop").pixels
    assert (dropped[:, :30, 0] == 200).all()
    wide = load_image(dataset / "part1" / "img_0001.jpg", (RES, RES), crop="none")
    assert wide.pixels.shape == (RES, RES, 3) and wide.crop == (0.0, 0.0, 96.0, 64.0)
    big = dataset.parent / "big.jpg"
    Image.fromarray(np.zeros((600, 800, 3), np.uint8)).save(big)
    drafted = load_image(big, (RES, RES))  # decoded at a reduced DCT scale; reported in original pixels
    assert drafted.size == (800, 600) and drafted.crop == (100.0, 0.0, 700.0, 600.0)
    meta = read_safetensors(str(next(reference.glob("shard-*.safetensors"))))[1]
    assert meta["endpoint"] == module_server.url and meta["latents_scaled"] == "false"
    assert meta["latent_channels"] == "4"
    assert meta["asyncvae_version"] == asyncvae.__version__


def test_rerun_allow_failures_skips_complete_shards(dataset: Path, reference: Path, module_server: LocalServer, capsys):
    before = {p.name: p.read_bytes() for p in reference.glob("shard-*")}
    rc = main(["encode", str(dataset), "--out", str(reference), "--endpoint", module_server.url,
               "--resolution", str(RES), "--shard-size", "64", "--allow-failures", "--json", "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["processed"] == 0 and summary["failures"] == 1 and summary["ok"] == N_IMAGES - 1
    assert {p.name: p.read_bytes() for p in reference.glob("shard-*")} == before
    # other settings in the same folder are refused, not mixed in
    rc = main(["encode", str(dataset), "--out", str(reference), "--endpoint", module_server.url,
               "--resolution", "128", "--shard-size", "64", "-q"])
    assert rc == 1
    assert "resolution" in capsys.readouterr().err


def test_shard_index_splits_cover_every_input_once(dataset: Path, reference: Path, module_server: LocalServer, tmp_path: Path):
    n_shards = -(-N_IMAGES // 64)
    for k in (1, 2, 3, 7):
        chosen = [g for i in range(k) for g in select_shards(n_shards, 1, i, k)]
        assert sorted(chosen) == list(range(n_shards))
    out = tmp_path / "split"
    for i in range(3):
        s = encode_dataset(dataset, out, endpoint=module_server.url, resolution=RES, shard_size=64,
                           shard_index=i, num_shards=3, quiet=True)
        assert s.shards_written == len(select_shards(n_shards, 1, i, 3))
    keys = [r["key"] for r in _index_rows(out)]
    assert len(keys) == len(set(keys)) == N_IMAGES
    assert sorted(keys) == sorted(i.key for i in list_inputs(dataset))
    fails = sorted(out.glob("failures-*-of-00003.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in fails) == 1
    for p in reference.glob("shard-*"):
        if not p.name.endswith("_stats.json"):
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def _processes_naming(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (Linux /proc; [] elsewhere)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path).encode() in cmd and state != "Z":
            found.append(int(d.name))
    return found


def test_killed_job_resumes_byte_identical(dataset: Path, reference: Path, make_server, tmp_path: Path):
    srv = make_server(replicas=2, delay_ms=10)
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "asyncvae", "encode", str(dataset), "--out", str(out), "--endpoint", srv.url,
           "--resolution", str(RES), "--shard-size", "64", "--concurrency", "2", "-q", "--allow-failures"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / "shard-00000_stats.json"
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the first shard never completed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # its preprocessing workers leave with it (they would wait on the pool forever)
    deadline = time.monotonic() + 10
    while _processes_naming(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_naming(out), "worker processes outlived the killed job"
    complete = sorted(out.glob("shard-*_stats.json"))
    assert 1 <= len(complete) < -(-N_IMAGES // 64), "the job was not killed mid-run"
    for st in complete:  # whatever looks complete is complete
        data = out / st.name.replace("_stats.json", ".safetensors")
        tensors, meta = read_safetensors(data)
        assert len(tensors) == int(meta["count"]) == json.loads(st.read_text())["ok"]
    rc = main(["encode", str(dataset), "--out", str(out), "--endpoint", srv.url, "--resolution", str(RES),
               "--shard-size", "64", "--concurrency", "8", "-q", "--allow-failures"])
    assert rc == 0
    assert not list(out.glob(".*.tmp"))
    # the same latents and index rows as the uninterrupted run (metadata names the other server)
    assert _shard_latents(out).keys() == _shard_latents(reference).keys()
    for k, t in _shard_latents(reference).items():
        assert torch.equal(_shard_latents(out)[k], t) if k == "gray" else True
    ref_rows, got_rows = _index_rows(reference), _index_rows(out)
    assert got_rows == ref_rows
    assert (out / "failures.jsonl").read_bytes() == (reference / "failures.jsonl").read_bytes()


def test_webdataset_inputs_and_outputs(dataset: Path, module_server: LocalServer, tmp_path: Path):
    # a .tar shard of images (one output shard of its own) and a .csv list as inputs
    src = tmp_path / "in.tar"
    with tarfile.open(src, "w") as tf:
        for p in sorted((dataset / "part1").glob("*"))[:10]:
            tf.add(p, arcname=f"samples/{p.name}")
    listing = tmp_path / "list.csv"
    paths = sorted((dataset / "part2").glob("*"))[:5]
    listing.write_text("path,caption\n" + "".join(f"{p},x\n" for p in paths))
    outs = []
    for run in range(2):
        out = tmp_path / f"wds{run}"
        s = encode_dataset([src, listing], out, endpoint=module_server.url, resolution=RES, shard_size=8,
                           format="webdataset", quiet=True)
        assert (s.ok, s.failures, s.shards_written) == (15, 0, 2)
        outs.append(out)
    for name in ("in.tar", "shard-00000.tar", "shard-00000.parquet"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    with tarfile.open(outs[0] / "in.tar") as tf:
        names = tf.getnames()
    assert len(names) == 20 and names[0] == "samples/img_0001.npy" and names[1] == "samples/img_0001.json"
    with tarfile.open(outs[0] / "shard-00000.tar") as tf:
        assert sum(n.endswith(".txt") for n in tf.getnames()) == 5  # the CSV captions
    # decode the webdataset shards back to images, as a webdataset
    d = decode_dataset(outs[0], tmp_path / "dec", endpoint=module_server.url, format="webdataset", quiet=True)
    assert d.ok == 15 and d.failures == 0
    with tarfile.open(tmp_path / "dec" / "shard-00000.tar") as tf:
        members = tf.getmembers()
        assert len(members) == 5
        im = Image.open(tf.extractfile(members[0]))  # type: ignore[arg-type]
        assert im.size == (RES, RES)


async def test_encode_dataset_async_with_shared_client(dataset: Path, module_server: LocalServer, tmp_path: Path):
    from asyncvae.jobs import encode_dataset_async

    async with asyncvae.Client(module_server.url) as client:
        s = await encode_dataset_async(dataset / "part2", tmp_path / "o", client=client, resolution=32,
                                       crop="none", dtype="bfloat16", quiet=True)
        assert client.stats.completed == s.ok == len(list((dataset / "part2").iterdir())) and s.failures == 0
        assert s.endpoint == module_server.url
    (_key, lat), *_ = read_safetensors(tmp_path / "o" / "shard-00000.safetensors")[0]
    assert lat.dtype == torch.bfloat16 and lat.shape == (4, 4, 4)


# --------------------------------------------------------------------------- decode


def test_decode_shards_to_images(reference: Path, module_server: LocalServer, tmp_path: Path):
    out = tmp_path / "decoded"
    rc = main(["decode", str(reference), "--out", str(out), "--endpoint", module_server.url, "-q"])
    assert rc == 0
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == N_IMAGES - 1
    assert all(Image.open(p).size == (RES, RES) for p in pngs[:20])
    assert (out / "part0" / "img_0000.png").exists() and (out / "Weird_Name_1.png").exists()
    # a folder of plain .pt / .safetensors latents, and resume (existing images are skipped)
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save(torch.zeros(1, 4, 8, 16), plain / "a.pt")
    out2 = tmp_path / "decoded2"
    s = decode_dataset(plain, out2, endpoint=module_server.url, format="jpg", quiet=True)
    assert s.ok == 1 and Image.open(out2 / "a.jpg").size == (128, 64)
    s = decode_dataset(plain, out2, endpoint=module_server.url, format="jpg", quiet=True)
    assert s.processed == 0 and s.ok == 1


def test_scaled_latents_roundtrip(dataset: Path, module_server: LocalServer, tmp_path: Path):
    src = dataset / "part0"
    a = encode_dataset(src, tmp_path / "scaled", endpoint=module_server.url, resolution=RES,
                       scaling_factor=0.5, shift_factor=0.1, dtype="float32", quiet=True)
    b = encode_dataset(src, tmp_path / "raw", endpoint=module_server.url, resolution=RES, dtype="float32", quiet=True)
    assert a.failures == b.failures == 0
    la, meta = read_safetensors(tmp_path / "scaled" / "shard-00000.safetensors")
    lb, _ = read_safetensors(tmp_path / "raw" / "shard-00000.safetensors")
    assert meta["latents_scaled"] == "true" and float(meta["scaling_factor"]) == 0.5
    assert la[0][0] == lb[0][0]
    torch.testing.assert_close(la[0][1], (lb[0][1] - 0.1) * 0.5, atol=1e-3, rtol=1e-3)
    decode_dataset(tmp_path / "scaled", tmp_path / "da", endpoint=module_server.url, quiet=True)
    decode_dataset(tmp_path / "raw", tmp_path / "db", endpoint=module_server.url, quiet=True)
    key = la[0][0]
    ia = np.asarray(Image.open(tmp_path / "da" / f"{key}.png"), dtype=np.int16)
    ib = np.asarray(Image.open(tmp_path / "db" / f"{key}.png"), dtype=np.int16)
    assert np.abs(ia - ib).max() <= 2  # scaling recorded in the metadata was undone


# --------------------------------------------------------------------------- CLI


def test_demo_uses_embedded_server_only_when_asked(tmp_path: Path, capsys):
    rc = main(["encode", "--demo", "--out", str(tmp_path / "demo"), "--resolution", "64"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "started the built-in reference server" in err and "NOT a real VAE" in err and "encoded 32 item(s)" in err
    assert len(read_safetensors(tmp_path / "demo" / "shard-00000.safetensors")[0]) == 32
    job = json.loads((tmp_path / "demo" / "job.json").read_text())
    assert job["endpoint"] == ["builtin"] and job["model"]["latent_channels"] == 4


@pytest.mark.parametrize(
    "args, needle",
    [
        (["encode", "{tmp}/missing", "--out", "{tmp}/o"], "does not exist"),
        (["encode", "{data}", "--out", "{tmp}/file/sub"], "not writable"),
        (["encode", "{data}", "--out", "{tmp}/o", "--resolution", "65", "--endpoint", "builtin"], "multiples of 8"),
        (["encode", "--out", "{tmp}/o"], "no INPUT"),
        (["encode", "{data}", "--out", "{tmp}/o"], "--endpoint URL"),
        (["encode", "{data}", "--out", "{tmp}/o", "--shard-index", "3", "--num-shards", "2"], "--shard-index"),
        (["decode", "{tmp}/missing", "--out", "{tmp}/o"], "does not exist"),
        (["decode", "{data}", "--out", "{tmp}/file/sub"], "not writable"),
        (["decode", "{data}", "--out", "{tmp}/o"], "--endpoint builtin"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], needle: str, tmp_path: Path, capsys):
    (tmp_path / "file").write_text("x")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16)).save(data / "a.png")
    torch.save(torch.zeros(4, 2, 2), data / "z.pt")
    argv = [a.format(tmp=tmp_path, data=data) for a in args]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err and err.startswith(f"asyncvae {argv[0]}: error:")


def test_cli_help_mentions_layout_and_every_flag(capsys):
    for cmd in ("encode", "decode"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for word in ("--shard-index", "--resume", "--endpoint", "--max-failure-rate", "--allow-endpoint-change"):
            assert word in text
        if cmd == "encode":
            for word in ("--demo", "_stats.json", "failures.jsonl", "manifest.arrow", "--skip-bad-inputs",
                         "--max-pixels", "parquet", "builtin"):
                assert word in text
