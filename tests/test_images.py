"""Image and point data, PNG output, and train.py/metrics.py on an image model."""
import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from tolerances import U32

import checkpoint  # noqa: E402
import cli  # noqa: E402
import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- digits --------------------------------------------------------------------------------

def test_digits_are_deterministic_balanced_and_distinct_between_splits(shared_data, tmp_path):
    splits = data.load("digits", data_dir=shared_data)
    tr, va = splits["train"], splits["val"]
    assert tr.info.shape == (1, 28, 28) and len(tr.info.classes) == 10
    assert len(tr) == 60000 and len(va) == 10000
    assert np.bincount(tr.labels.numpy()).tolist() == [6000] * 10
    assert np.bincount(va.labels.numpy()).tolist() == [1000] * 10
    again = data.digits_arrays("val", str(tmp_path))  # rendered afresh, not from the cache
    assert np.array_equal(again[0], va.images.numpy()) and np.array_equal(again[1], va.labels.numpy())
    assert not np.array_equal(tr.images[:100].numpy(), va.images[:100].numpy())
    # ink: a digit covers some of the canvas, not none and not all, and stays off the border
    ink = (va.images.float() / 255).mean((1, 2, 3))
    assert 0.05 < float(ink.min()) and float(ink.max()) < 0.45
    assert va.images[:, :, [0, -1], :].float().mean() < 2 and va.images[:, :, :, [0, -1]].float().mean() < 2


def test_digit_classes_differ_more_than_samples_within_a_class(shared_data):
    va = data.load("digits", data_dir=shared_data)["val"]
    x, y = va.images.float().flatten(1) / 255, va.labels
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    # nearest-class-mean classification works far above chance: the shapes are the digits'
    acc = (torch.cdist(x, means).argmin(1) == y).float().mean()
    assert acc > 0.6


def test_image_batches_are_in_range_seeded_and_labelled(shared_data):
    split = data.load("digits", data_dir=shared_data)["train"]
    x1, y1 = split.batch(64, torch.Generator().manual_seed(3))
    x2, y2 = split.batch(64, torch.Generator().manual_seed(3))
    assert x1.shape == (64, 1, 28, 28) and x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.min() >= -1 and x1.max() <= 1 and x1.min() == -1


# ---- downloaded formats --------------------------------------------------------------------

def idx_bytes(a, code=0x08):
    return bytes([0, 0, code, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape) + a.astype(">u1").tobytes()


def test_read_idx_and_its_errors():
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(data.read_idx(idx_bytes(a)), a)
    for bad in (b"\x01\x00\x08\x01", idx_bytes(a)[:-1], bytes([0, 0, 0x42, 1, 0, 0, 0, 0])):
        with pytest.raises(cli.UsageError):
            data.read_idx(bad)


def test_read_cifar_bin_planes_and_labels():
    g = np.random.default_rng(0)
    labels = g.integers(0, 10, 5, dtype=np.uint8)
    pixels = g.integers(0, 256, (5, 3072), dtype=np.uint8)
    raw = np.concatenate([labels[:, None], pixels], 1).tobytes()
    x, y = data.read_cifar_bin(raw)
    assert x.shape == (5, 3, 32, 32) and y.tolist() == labels.tolist()
    # record layout: the red plane's 1024 bytes, then green, then blue, each row by row
    assert x[2, 1, 4, 7] == pixels[2, 1024 + 4 * 32 + 7]
    with pytest.raises(cli.UsageError):
        data.read_cifar_bin(raw[:-1])


def fake_mnist(folder, n=(50, 20)):
    os.makedirs(folder, exist_ok=True)
    g = np.random.default_rng(1)
    sums = {}
    for prefix, count in zip(("train", "t10k"), n):
        for kind, arr in (("images", g.integers(0, 256, (count, 28, 28), dtype=np.uint8)),
                          ("labels", g.integers(0, 10, count, dtype=np.uint8))):
            name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
            blob = gzip.compress(idx_bytes(arr))
            with open(os.path.join(folder, name), "wb") as f:
                f.write(blob)
            sums[name] = hashlib.sha256(blob).hexdigest()
    return sums


def test_mnist_from_files_in_data_dir(tmp_path, monkeypatch):
    sums = fake_mnist(tmp_path / "mnist")
    monkeypatch.setitem(data.DOWNLOADS, "mnist", dict(urls=["http://127.0.0.1:9/"], files=sums))
    splits = data.load("mnist", data_dir=str(tmp_path))
    assert len(splits["train"]) == 50 and len(splits["val"]) == 20
    assert splits["train"].info.shape == (1, 28, 28) and splits["train"].labels.max() < 10


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    sums = fake_mnist(tmp_path / "mnist")
    sums["train-labels-idx1-ubyte.gz"] = "0" * 64
    monkeypatch.setitem(data.DOWNLOADS, "mnist", dict(urls=["http://127.0.0.1:9/"], files=sums))
    with pytest.raises(cli.UsageError, match="sha256.*delete it"):
        data.load("mnist", data_dir=str(tmp_path))


def test_offline_download_names_each_missing_file_and_where_to_put_it(tmp_path, monkeypatch):
    spec = dict(data.DOWNLOADS["cifar10"], urls=["http://127.0.0.1:9/"])
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", spec)
    with pytest.raises(cli.UsageError) as e:
        data.load("cifar10", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "cifar-10-binary.tar.gz" in msg and "http://127.0.0.1:9/" in msg
    assert str(tmp_path / "cifar10") in msg
    folder = tmp_path / "cifar10"  # nothing half-written left behind
    assert not folder.exists() or not os.listdir(folder)


# ---- user .npy and points --------------------------------------------------------------------

@pytest.mark.parametrize("shape,chw", [((20, 8, 8), (1, 8, 8)), ((20, 8, 8, 3), (3, 8, 8)),
                                       ((20, 3, 8, 8), (3, 8, 8)), ((20, 8, 8, 1), (1, 8, 8))])
def test_npy_layouts(tmp_path, shape, chw):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / "x.npy", a)
    splits = data.load(str(tmp_path / "x.npy"))
    assert splits["train"].info.shape == chw
    assert len(splits["train"]) + len(splits["val"]) == 20 and len(splits["val"]) == 1
    assert splits["train"].labels is None and splits["train"].batch(4, torch.Generator())[1] is None
    # pixels survive the layout change: the val image is one of the inputs
    v = splits["val"].images[0].numpy()
    nchw = a[:, None] if a.ndim == 3 else (a if shape[1] == 3 else a.transpose(0, 3, 1, 2))
    assert any(np.array_equal(v, img) for img in nchw)


@pytest.mark.parametrize("arr,msg", [(np.zeros((5, 8, 8), np.float32), "uint8"),
                                     (np.zeros((5, 8), np.uint8), "shape"),
                                     (np.zeros((5, 8, 6), np.uint8), "square")])
def test_npy_bad_input(tmp_path, arr, msg):
    np.save(tmp_path / "x.npy", arr)
    with pytest.raises(cli.UsageError, match=msg):
        data.load(str(tmp_path / "x.npy"))


def test_npy_with_pickled_objects_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(cli.UsageError, match="not a readable .npy"):
        data.load(str(tmp_path / "x.npy"))


@pytest.mark.parametrize("name,k,std,radius", [("ring8", 8, 0.01, 1.0), ("grid25", 25, 0.05, None)])
def test_points_match_their_definition(name, k, std, radius):
    split = data.load(name)["train"]
    assert len(split.centers) == k and split.std == std
    if radius:  # on the unit circle at 2 pi j / 8: no repeated endpoint
        ang = torch.atan2(split.centers[:, 1], split.centers[:, 0]) % (2 * np.pi)
        # fp32, the angles made as the data makes them: cos and sin within 2 u of the unit
        # circle each (1 ulp), which moves atan2 by 2 sqrt(2) u; atan2's own ulp (2 u pi) and
        # the % 2 pi (2 pi rounded to fp32, then a rounded sum: 4 u pi)
        u = U32
        assert torch.allclose(ang.sort().values, torch.arange(8) * 2 * np.pi / 8, rtol=0,
                              atol=(2 * 2 ** 0.5 + 2 * np.pi + 4 * np.pi) * u)
    else:
        assert sorted(set(split.centers[:, 0].tolist())) == [-4, -2, 0, 2, 4]
    x, y = split.batch(20000, torch.Generator().manual_seed(0))
    assert y is None
    d, near = torch.cdist(x, split.centers).min(1)
    # per-axis std: d^2 / std^2 is chi-squared with 2 degrees of freedom, so the estimate's
    # relative standard error is 1 / (2 sqrt(N)): 5 of them; and cdist's matmul route
    # (|x|^2 + |c|^2 - 2 x.c, 4 u of |x|^2 + |c|^2 per point), halved by the square root
    u = U32
    cancel = float(4 * u * (x.square().sum(1) + split.centers[near].square().sum(1)).mean() / d.square().mean()) / 2
    assert abs(float(d.square().mean() / 2) ** 0.5 - std) < (5 / (2 * 20000 ** 0.5) + cancel) * std
    # multinomial counts: 20000 / k each, sd sqrt(20000 (1/k)(1 - 1/k)): 0.85 of a share is
    # 4.3 sd below it for grid25, 8 for ring8
    assert np.bincount(near.numpy(), minlength=k).min() > 20000 / k * 0.85


# ---- PNG -------------------------------------------------------------------------------------

def read_png(path):
    """A minimal PNG reader (8-bit, filter 0 rows, as write_png makes), checking every CRC."""
    blob = open(path, "rb").read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(blob):
        n, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        body = blob[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    c = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * c)
    assert depth == 8 and (raw[:, 0] == 0).all() and b"IEND" in chunks
    return raw[:, 1:].reshape(h, w, c).squeeze(-1) if c == 1 else raw[:, 1:].reshape(h, w, c)


def test_png_round_trip_gray_and_rgb(tmp_path):
    g = np.random.default_rng(0)
    for shape in ((7, 5), (6, 9, 3)):
        a = g.integers(0, 256, shape, dtype=np.uint8)
        data.write_png(str(tmp_path / "a.png"), a)
        assert np.array_equal(read_png(tmp_path / "a.png"), a)


def test_save_grid_layout_and_values(tmp_path):
    x = torch.linspace(-1, 1, 10).view(10, 1, 1, 1).expand(10, 3, 4, 4)
    data.save_grid(x, str(tmp_path / "g.png"), nrow=4, pad=2, scale=2)
    img = read_png(tmp_path / "g.png")
    assert img.shape == (2 * (3 * 6 + 2), 2 * (4 * 6 + 2), 3)  # 3 rows of 4, 2 px gaps, doubled
    assert (img[4, 4] == 0).all() and (img[2 * (2 + 2 * 6), 2 * (2 + 6)] == 255).all()  # first, last
    assert (img[0, 0] == 128).all()  # padding


def test_save_scatter_marks_points_and_modes(tmp_path):
    split = data.load("ring8")["train"]
    x, _ = split.batch(500, torch.Generator().manual_seed(0))
    data.save_scatter(x, str(tmp_path / "s.png"), centers=split.centers, radius=0.05)
    img = read_png(tmp_path / "s.png")
    blue = (img == (30, 60, 160)).all(-1)
    red = (img == (220, 30, 30)).all(-1)
    assert blue.sum() > 50 and red.sum() > 100
    assert not blue[img.shape[0] // 2 - 20:img.shape[0] // 2 + 20, img.shape[1] // 2 - 20:img.shape[1] // 2 + 20].any()


# ---- train.py and metrics.py on an image model ----------------------------------------------

def test_train_writes_sample_grids_and_metrics_evaluates_the_checkpoint(shared_data, tmp_path):
    model = os.path.join(ROOT, "tests", "pixelgauss.py")
    out = tmp_path / "pg"
    r = subprocess.run([sys.executable, "train.py", "--model", model, "--preset", "tiny", "--data-dir", shared_data,
                        "--out-dir", str(out), "--sample-images", "20", "--dtype", "fp32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout + r.stderr
    for step in (0, 30, 60):
        assert os.path.exists(out / f"samples-{step:06d}.png")
    img = read_png(out / "samples-000060.png")
    assert img.shape == (4 * 30 + 2, 5 * 30 + 2)  # 20 gray 28x28 images, 4 rows of 5 (nrow = ceil sqrt 20)
    evals = [json.loads(l) for l in open(out / "log.jsonl") if "val_loss" in l]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    r = subprocess.run([sys.executable, "metrics.py", "--ckpt", str(out / "ckpt.pt"), "--n", "300",
                        "--nll-n", "50", "--data-dir", shared_data], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    table = json.load(open(out / "metrics-classifier.json"))
    assert table["FID"] > 0 and 0 <= table["precision"] <= 1
    bpd = table["bits/dim (50 val images)"]
    assert 0 < bpd < 8  # better than uniform over 256 levels
    # it equals the model's own loss, nats per dim, on those images (the first 50 of val):
    # its fp32 mean over 50 images against bits_per_dim's float64 one of the same nll,
    # (50 + 8) u of it
    model = checkpoint.build_from_checkpoint(checkpoint.load_checkpoint(str(out / "ckpt.pt")))[1].eval()
    x = data.load("digits", data_dir=shared_data)["val"].images[:50].float().div(127.5).sub(1)
    with torch.no_grad():
        loss = model(x)[0].item()
    assert bpd * np.log(2) == pytest.approx(loss, rel=(50 + 8) * U32)


def test_sample_py_writes_a_grid_and_npy_for_an_image_checkpoint(shared_data, tmp_path):
    out = tmp_path / "pg"
    r = subprocess.run([sys.executable, "train.py", "--model", os.path.join(ROOT, "tests", "pixelgauss.py"),
                        "--preset", "tiny", "--max-iters", "5", "--data-dir", shared_data, "--out-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(out / "ckpt.pt"), "--num-samples", "9",
                        "--npy", str(tmp_path / "s.npy")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_png(out / "sample.png").shape == (3 * 30 + 2, 3 * 30 + 2)
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (9, 1, 28, 28) and s.dtype == np.uint8
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(out / "ckpt.pt"), "--label", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no classes" in r.stderr and len(r.stderr.strip().splitlines()) == 1
