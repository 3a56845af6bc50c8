"""plot.py: ticks are round numbers that cover the range, the axes map data to the pixels
the line is drawn through, log scale where the values span decades, non-finite values are
left out, the panels of a log.jsonl are its losses and parts with the smoothing written
out; and train.py writes loss.png for every model."""
import json
import math
import os

import numpy as np
import pytest

import images
import plot
import train


@pytest.mark.parametrize("lo,hi", [(0, 300), (1.7, 3.2), (0.001, 0.0042), (-5, 12), (0, 1)])
def test_ticks_are_round_and_cover_the_range(lo, hi):
    ticks = plot.nice_ticks(lo, hi)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(abs(mantissa - m) < 1e-9 for m in (1, 2, 5, 10))
    assert 3 <= len(ticks) <= 11 and lo - 1e-12 <= ticks[0] < lo + step and hi - step < ticks[-1] <= hi + 1e-12
    assert all(abs(b - a - step) < 1e-9 * step for a, b in zip(ticks, ticks[1:]))


def test_the_line_goes_through_the_mapped_points():
    img = np.full((300, 400, 3), 255, np.uint8)
    series = {"a": [(0, 1.0), (10, 2.0), (20, 1.0)]}
    ax = plot.draw_panel(img, (60, 30, 380, 270), "t", series)
    assert not ax.log
    for s, v in ((5, 1.5), (10, 2.0), (15, 1.5)):  # on the segments, by linear interpolation
        x, y = ax.px(s, v)
        patch = img[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2].reshape(-1, 3)
        assert any(tuple(p) == plot.COLORS[0] for p in patch), (s, v)
    x0, y0 = ax.px(0, 1.0)
    x1, y1 = ax.px(20, 2.0)
    assert x0 == 60 and x1 == 380 and y0 == 270 and y1 == 30  # the data's range fills the plot area


def test_log_scale_where_the_values_span_decades():
    box = (0, 0, 100, 100)
    assert plot.panel_axes({"a": [(0, 1.0), (1, 1000.0)]}, box).log
    assert not plot.panel_axes({"a": [(0, 1.0), (1, 10.0)]}, box).log
    assert not plot.panel_axes({"a": [(0, -1.0), (1, 1000.0)]}, box).log  # not all positive
    ax = plot.panel_axes({"a": [(0, 1.0), (10, 100.0)]}, box)
    assert ax.px(5, 10.0)[1] == pytest.approx(50)  # 10 halfway between 1 and 100 on a log axis


def test_non_finite_values_are_left_out(tmp_path):
    plot.save_curves(str(tmp_path / "c.png"), [("t", {"a": [(0, math.nan), (1, 2.0), (2, math.inf), (3, 1.0)]}),
                                              ("empty", {"b": [(0, math.nan)]})])
    assert images.read_png(str(tmp_path / "c.png")).shape[2] == 3


def test_panels_of_a_log_are_losses_and_parts(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [dict(step=10, loss_discriminator=1.0, loss_generator=2.0, r1=0.5, lr=1e-3, img_per_s=9.0, time=1),
            dict(step=20, loss_discriminator=3.0, loss_generator=4.0, r1=0.7, lr=1e-3, img_per_s=9.0, time=2),
            dict(step=20, train_loss_discriminator=1.5, val_loss_discriminator=1.6, val_loss_generator=2.5)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 30, "loss_gen')  # a cut last line
    (title, losses), (_, parts) = plot.loss_panels(str(log))
    assert set(losses) == {"train_discriminator", "train_generator", "val_discriminator", "val_generator"}
    assert set(parts) == {"r1"}
    # the bias-corrected average, written out: a = 0.3 v1, then 0.3 v2 + 0.7 a, over 1 - 0.7^k
    a1 = 0.3 * 1.0
    a2 = 0.3 * 3.0 + 0.7 * a1
    assert losses["train_discriminator"] == [(10, pytest.approx(a1 / 0.3)), (20, pytest.approx(a2 / (1 - 0.49)))]
    assert losses["val_generator"] == [(20, 2.5)]


@pytest.mark.parametrize("model", ["gpt", "diffusion", "vae", "gan"])
def test_train_writes_loss_png_for_every_model(tmp_path, shared_data, model):
    corpus = tmp_path / "c.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 300)
    small = {"gpt": ["--data", str(corpus), "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16"],
             "diffusion": ["--base", "8", "--timesteps", "10", "--sample-steps", "5"],
             "vae": ["--width", "8", "--z-dim", "4"], "gan": ["--width", "8", "--z-dim", "4"]}[model]
    out = str(tmp_path / "out")
    assert train.main(["--model", model, *small, "--data-dir", shared_data, "--max-iters", "4", "--eval-interval", "2",
                       "--eval-iters", "1", "--log-interval", "1", "--batch-size", "8", "--sample-images", "4",
                       "--sample-tokens", "4", "--dtype", "fp32", "--out-dir", out]) == 0
    png = images.read_png(os.path.join(out, "loss.png"))
    assert png.shape[2] == 3 and png.shape[0] > 300 and (png != 255).any()
