"""Folders of images and .npz arrays (images.py): the listing and its one-line errors,
the conversion of channels, the area filter against torch's area interpolation and a
block mean written out, centre cropping, and the cache that a changed folder misses."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_png import encode

import checkpoint
import cli
import data
import images


def gray(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)


def class_folder(root, per_class=3, size=8):
    """root/cat, root/dog, root/emu: gray PNGs of the project's writer, and a few by hand
    in formats it does not write (16-bit, palette, interlaced, gray with alpha)."""
    for k, name in enumerate(("dog", "cat", "emu")):  # listed out of order: classes are sorted
        os.makedirs(root / name)
        for i in range(per_class):
            data.write_png(str(root / name / f"{i}.png"), gray(size, size, 10 * k + i))
    rng = np.random.default_rng(0)
    (root / "emu" / "16bit.png").write_bytes(encode(rng.integers(0, 65536, (size, size, 1)), 16, 0))
    (root / "emu" / "interlaced.png").write_bytes(encode(rng.integers(0, 256, (size, size, 1)), 8, 0, True))
    (root / "cat" / "alpha.png").write_bytes(encode(rng.integers(0, 256, (size, size, 2)), 8, 4))
    (root / "dog" / "palette.png").write_bytes(encode(rng.integers(0, 4, (size, size, 1)), 2, 3,
                                                      palette=[[0, 0, 0], [90, 90, 90], [180, 180, 180], [255] * 3]))
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden: passed over
    return root


def test_class_subfolders_are_the_sorted_classes(tmp_path):
    classes, found = images.list_folder(str(class_folder(tmp_path / "pets")))
    assert classes == ["cat", "dog", "emu"]
    labels = {os.path.basename(os.path.dirname(p)): lab for p, lab in found}
    assert labels == {"cat": 0, "dog": 1, "emu": 2} and len(found) == 13


@pytest.mark.parametrize("make,says", [
    (lambda r: (r / "a").mkdir() or (r / "a" / "notes.txt").write_text("x"), "notes.txt is not an image"),
    (lambda r: (r / "a").mkdir() or (r / "b").mkdir() or data.write_png(str(r / "b" / "x.png"), gray(4, 4, 0)),
     "class folder"),
    (lambda r: None, "holds no images"),
    (lambda r: (r / "a").mkdir() or data.write_png(str(r / "a" / "x.png"), gray(4, 4, 0))
     or data.write_png(str(r / "y.png"), gray(4, 4, 0)), "both files"),
])
def test_a_folder_that_is_not_one_of_images_is_one_line(tmp_path, make, says):
    root = tmp_path / "f"
    root.mkdir()
    make(root)
    with pytest.raises(cli.UsageError, match=says) as e:
        images.list_folder(str(root))
    assert "\n" not in str(e.value)


def test_channels_are_converted_as_pillow_converts():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (5, 6, 4)).astype(np.uint8)
    assert np.array_equal(images.to_channels(rgba, 3), rgba[..., :3])  # alpha dropped
    ga = rng.integers(0, 256, (5, 6, 2)).astype(np.uint8)
    assert np.array_equal(images.to_channels(ga, 3), np.repeat(ga[..., :1], 3, 2))
    # luma: 0.299 R + 0.587 G + 0.114 B; Pillow's 16-bit fixed point differs from the real
    # coefficients by under 1e-5 each (< 0.01 over 255 x 3), so only a rounding tie moves: <= 1
    luma = images.to_channels(rgba, 1)[..., 0].astype(np.float64)
    exact = rgba[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(luma - np.rint(exact)).max() <= 1


def test_area_filter_is_the_mean_over_each_pixels_span():
    img = np.random.default_rng(2).integers(0, 256, (12, 12, 3)).astype(np.uint8)
    # an integer factor: each output pixel the mean of a 3x3 block (written out), rounded
    blocks = img.reshape(4, 3, 4, 3, 3).astype(np.float64).mean((1, 3))
    assert np.array_equal(images.resize_crop(img, 4), np.rint(blocks).astype(np.uint8))
    # torch's area interpolation (adaptive average pooling) is the area filter where each
    # output's span covers whole input pixels (12 -> 6); compared before rounding, within
    # fp64 rounding of the sums (12 terms of at most 255)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double()
    w = images.box_weights(12, 6)
    ours = np.einsum("ij,jkc,lk->ilc", w, img.astype(np.float64), w)
    theirs = F.interpolate(x, size=(6, 6), mode="area")[0].permute(1, 2, 0).numpy()
    assert np.allclose(ours, theirs, rtol=0, atol=12 * 2 ** -52 * 255)
    w5 = images.box_weights(12, 5)  # spans of 2.4 pixels: fractional overlaps
    assert np.allclose(w5.sum(1), 1) and np.allclose(w5.sum(0), 5 / 12)  # every input counts alike


def test_the_shorter_side_is_resized_and_the_centre_cropped():
    img = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10, 1)
    assert np.array_equal(images.resize_crop(img, 6), img[:, 2:8])  # already 6 high: a crop only
    tall = np.repeat(np.repeat(img, 2, 0), 2, 1)  # 12 x 20, each pixel doubled
    assert np.array_equal(images.resize_crop(tall, 6), img[:, 2:8])


def test_a_folder_loads_converted_and_cached_and_a_change_reads_it_again(tmp_path, monkeypatch):
    root = class_folder(tmp_path / "pets")
    data.write_png(str(root / "cat" / "rgb.png"), np.random.default_rng(3).integers(0, 256, (16, 16, 3)))
    x, y, classes = images.load_folder(str(root), str(tmp_path / "d"))
    # most images are gray and 8 pixels on their shorter side: those are the defaults
    assert x.shape == (14, 1, 8, 8) and x.dtype == np.uint8 and classes == ["cat", "dog", "emu"]
    assert sorted(np.bincount(y).tolist()) == [4, 5, 5]
    first = images.read_image(str(root / "cat" / "0.png"))[..., 0]
    assert np.array_equal(x[0, 0], first)  # cat/0.png sorts first
    monkeypatch.setattr(images, "read_image", lambda p: pytest.fail("decoded again: the cache was missed"))
    x2, y2, _ = images.load_folder(str(root), str(tmp_path / "d"))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    monkeypatch.undo()
    data.write_png(str(root / "emu" / "0.png"), gray(8, 8, 99))  # a changed file
    x3, _, _ = images.load_folder(str(root), str(tmp_path / "d"))
    assert not np.array_equal(x, x3)
    x4, _, _ = images.load_folder(str(root), str(tmp_path / "d"), channels=3, image_size=4)
    assert x4.shape == (14, 3, 4, 4)


def test_other_formats_without_pillow_name_the_file_and_the_fix(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)  # as where Pillow is not installed
    with pytest.raises(cli.UsageError, match=r"a\.jpg.*pip install pillow"):
        images.read_image(str(tmp_path / "a.jpg"))


def test_npz_arrays_and_their_one_line_errors(tmp_path):
    x = np.random.default_rng(4).integers(0, 256, (6, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "ok.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]), classes=np.array(["a", "b", "c"]))
    xs, ys, names = images.npz_arrays(str(tmp_path / "ok.npz"))
    assert np.array_equal(xs, x) and ys.tolist() == [0, 1, 2, 0, 1, 2] and names == ["a", "b", "c"]
    for bad, says in ((dict(x=x), "give arrays x"), (dict(x=x, y=np.zeros(5, int)), "one integer label"),
                      (dict(x=x, y=np.full(6, 3), classes=np.array(["a"])), "only 1 class")):
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(cli.UsageError, match=says):
            images.npz_arrays(str(tmp_path / "bad.npz"))


def bars_folder(root, per_class=80, size=8):
    """Three classes told apart by where a bright bar lies (top, middle, bottom), in gray
    PNGs with noise: easy for the classifier, and 8x8 so the models train in seconds."""
    rng = np.random.default_rng(5)
    for k, name in enumerate(("bottom", "middle", "top")):
        os.makedirs(root / name)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            img[(2 - k) * 3:(2 - k) * 3 + 2] = 230
            data.write_png(str(root / name / f"{i:03d}.png"), img)
    return str(root)


@pytest.mark.filterwarnings("ignore:FID from")  # 12 val images: enough to show the rows are made
@pytest.mark.parametrize("model,flags", [
    ("diffusion", ["--base", "8", "--mults", "1,2", "--timesteps", "10", "--sample-steps", "5", "--attn-res", "4"]),
    ("gan", ["--width", "8", "--z-dim", "4"]),
])
def test_a_class_folder_trains_a_conditional_model_samples_by_label_and_is_evaluated(tmp_path, model, flags):
    import json

    import metrics
    import sample
    import train
    folder, out = bars_folder(tmp_path / "bars"), str(tmp_path / "out")
    assert train.main(["--model", model, "--data", folder, "--data-dir", str(tmp_path / "d"), *flags,
                       "--max-iters", "3", "--eval-interval", "3", "--eval-iters", "1", "--batch-size", "8",
                       "--sample-images", "6", "--dtype", "fp32", "--out-dir", out]) == 0
    conf = checkpoint.load_checkpoint(f"{out}/ckpt.pt")["config"]
    assert conf["model_config"]["num_classes"] == 3  # taken from the folder
    assert conf["data"]["classes"] == ["bottom", "middle", "top"]
    png = str(tmp_path / "label2.png")
    assert sample.main(["--ckpt", f"{out}/ckpt.pt", "--label", "2", "--num-samples", "4", "--out", png]) == 0
    assert images.read_png(png).shape[2] == 1
    by_name = str(tmp_path / "top.png")  # the class's name, as the checkpoint recorded it, does the same
    assert sample.main(["--ckpt", f"{out}/ckpt.pt", "--label", "top", "--num-samples", "4", "--out", by_name]) == 0
    assert np.array_equal(images.read_png(by_name), images.read_png(png))
    with pytest.raises(cli.UsageError, match=r"classes 0\.\.2 \(bottom, middle, top\)"):
        sample.main(["--ckpt", f"{out}/ckpt.pt", "--label", "side"])
    report = str(tmp_path / "m.json")
    assert metrics.main(["--ckpt", f"{out}/ckpt.pt", "--n", "20", "--batch-size", "10", "--against", "val",
                         "--nll-n", "0", "--json", report]) == 0
    rows = json.load(open(report))
    # the classifier was trained on the folder's own three classes, and tells them apart
    assert "classifier trained on" in rows["features"] and "FID" in rows and rows["IS"] <= 3 + 1e-6
    acc = float(rows["features"].split("(")[1].split("%")[0]) / 100
    assert acc > 0.9, rows["features"]


def test_other_formats_go_through_pillow_where_installed(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install pillow)")
    rng = np.random.default_rng(6)
    rgb, gray8 = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8), rng.integers(0, 256, (6, 7)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.bmp")  # lossless formats: the same pixels back
    Image.fromarray(gray8).save(tmp_path / "g.tiff")
    assert np.array_equal(images.read_image(str(tmp_path / "c.bmp")), rgb)
    assert np.array_equal(images.read_image(str(tmp_path / "g.tiff")), gray8[..., None])
    assert images.peek(str(tmp_path / "g.tiff")) == (6, 7, True)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(cli.UsageError, match="bad.jpg: not a readable image"):
        images.read_image(str(tmp_path / "bad.jpg"))


def test_unlabelled_data_without_inception_weights_still_reports_bits_per_dim(tmp_path, monkeypatch):
    """A VAE trained on a .npy of unlabelled images (a TypeError in metrics.py once): no
    classifier without labels and, here, no Inception weights, so the features line says
    what to do, and bits/dim is reported all the same."""
    import json

    import metrics
    import train
    np.save(tmp_path / "x.npy", np.random.default_rng(8).integers(0, 256, (60, 8, 8)).astype(np.uint8))
    out = str(tmp_path / "o")
    assert train.main(["--model", "vae", "--data", str(tmp_path / "x.npy"), "--data-dir", str(tmp_path / "d"),
                       "--width", "8", "--z-dim", "4", "--max-iters", "2", "--eval-interval", "2", "--batch-size", "8",
                       "--eval-iters", "1", "--dtype", "fp32", "--out-dir", out]) == 0
    monkeypatch.setattr(metrics, "inception_path", lambda: str(tmp_path / "absent" / "pt_inception.pth"))
    report = str(tmp_path / "m.json")
    assert metrics.main(["--ckpt", f"{out}/ckpt.pt", "--n", "20", "--nll-n", "3", "--iwae-k", "4",
                         "--json", report]) == 0
    rows = json.load(open(report))
    assert "--features inception" in rows["features"] and "FID" not in rows
    assert any(k.startswith("bits/dim") and 0 < v < 16 for k, v in rows.items() if isinstance(v, float))
