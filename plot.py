"""The record of a run: train.py's log lines (Meter: the console line and the log.jsonl
record), and line plots as PNGs, drawn here and written with data.write_png (no
matplotlib): the loss curves train.py writes to loss.png at every evaluation.

    save_curves(path, panels)   panels: [(title, {label: [(step, value), ...]}), ...]

Each panel has its axes, tick labels and a legend, one colour per series, and a log
scale where its values are all positive and span more than a factor of 20.
"""
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

import data


@dataclass
class Meter:
    """What the next log line shows, gathered since the last one: each player's loss and
    logged parts summed on the device (no sync), how many steps each sum holds (a skipped
    update adds nothing), and the seconds spent drawing batches and moving them to the device."""
    since: float = field(default_factory=time.time)
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    steps: int = 0
    data_s: float = 0.0

    def add(self, values, count):
        for key, v in values.items():
            self.sums[key] = self.sums.get(key, 0) + v
            self.counts[key] = self.counts.get(key, 0) + count

    def line(self, sums, step, max_iters, time_left, lr, unit, units_per_step, skipped=None):
        """(now, the console line, the log.jsonl record) of these sums (read off the device,
        over every process), the step rate since `since`, and the ETA (at most time_left)."""
        now = time.time()
        dt = now - self.since
        losses = {key: v / self.counts[key] for key, v in zip(self.sums, sums)}
        if skipped is not None:
            losses["skipped"] = skipped  # updates skipped so far, this run and the ones it resumed
        speed = self.steps * units_per_step / dt
        eta = min((max_iters - step) * dt / self.steps, time_left)
        rate = f"{speed / 1e3:.1f}k" if speed >= 1e4 else f"{speed:.0f}"
        text = " | ".join(f"{key.replace('_', ' ')} {v:.4f}" if isinstance(v, float) else f"{key} {v}"
                          for key, v in losses.items())
        return now, f"step {step} | {text} | lr {lr:.2e} | {rate} {unit}/s | ETA {eta / 60:.1f}m", \
            dict(step=step, **losses, lr=lr, **{f"{unit}_per_s": speed}, data_share=self.data_s / dt)

# A 3x5 pixel font: each glyph five rows of three pixels, "#" on.
GLYPHS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# .## ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# .#. .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", ".": "... ... ... ... .#.", "-": "... ... ### ... ...",
    "+": "... .#. ### .#. ...", "e": "... ### #.# ##. .##", " ": "... ... ... ... ...",
    "_": "... ... ... ... ###", "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.",
    ",": "... ... ... .#. #..", ":": "... .#. ... .#. ...", "/": "..# ..# .#. #.. #..",
    "a": "... ##. ..# #.# ###", "b": "#.. ##. #.# #.# ##.", "c": "... .## #.. #.. .##",
    "d": "..# .## #.# #.# .##", "f": ".## #.. ##. #.. #..", "g": ".## #.# .## ..# ##.",
    "h": "#.. ##. #.# #.# #.#", "i": ".#. ... .#. .#. .#.", "j": "..# ... ..# #.# .#.",
    "k": "#.. #.# ##. #.# #.#", "l": "##. .#. .#. .#. ###", "m": "... ### ### #.# #.#",
    "n": "... ##. #.# #.# #.#", "o": "... .#. #.# #.# .#.", "p": "... ##. #.# ##. #..",
    "q": "... .## #.# .## ..#", "r": "... .## #.. #.. #..", "s": "... .## .#. ..# ##.",
    "t": ".#. ### .#. .#. .##", "u": "... #.# #.# #.# .##", "v": "... #.# #.# #.# .#.",
    "w": "... #.# #.# ### ###", "x": "... #.# .#. #.# #.#", "y": "... #.# .## ..# ##.",
    "z": "... ### .#. #.. ###",
}
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
SCALE = 2  # font pixels per glyph pixel


def text(img, x, y, s, color=(0, 0, 0)):
    """Draw s with its top left at (x, y); a character the font lacks is a blank."""
    for ch in s.lower():
        rows = GLYPHS.get(ch, GLYPHS[" "]).split()
        for r, row in enumerate(rows):
            for c, on in enumerate(row):
                if on == "#":
                    y0, x0 = y + r * SCALE, x + c * SCALE
                    img[max(y0, 0):max(y0 + SCALE, 0), max(x0, 0):max(x0 + SCALE, 0)] = color
        x += 4 * SCALE


def text_width(s):
    return len(s) * 4 * SCALE


def line(img, x0, y0, x1, y1, color, width=2):
    """A straight segment between two pixel positions, `width` pixels thick."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w = img.shape[:2]
    for dx in range(width):
        for dy in range(width):
            ok = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
            img[ys[ok] + dy, xs[ok] + dx] = color


def nice_ticks(lo, hi, want=5):
    """Round numbers (1, 2 or 5 times a power of ten apart) from lo to hi, about `want` of them."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / want
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_label(v):
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.0e}"


class Axes:
    """Maps data coordinates to pixels in a panel's plot area: x linear from 0, y linear
    or log10."""

    def __init__(self, box, xmax, ylo, yhi, log):
        self.left, self.top, self.right, self.bottom = box
        self.xmax, self.log = max(xmax, 1), log
        self.ylo, self.yhi = (math.log10(ylo), math.log10(yhi)) if log else (ylo, yhi)
        if self.yhi - self.ylo < 1e-12:  # a flat series: give it some height
            pad = abs(self.yhi) * 0.05 or 1.0
            self.ylo, self.yhi = self.ylo - pad, self.yhi + pad

    def px(self, x, y):
        fy = ((math.log10(y) if self.log else y) - self.ylo) / (self.yhi - self.ylo)
        return (self.left + x / self.xmax * (self.right - self.left),
                self.bottom - fy * (self.bottom - self.top))


def panel_axes(series, box):
    """The Axes of a panel's series: all their finite points in view, log where all are
    positive and span more than a factor of 20."""
    ys = [v for pts in series.values() for _, v in pts]
    xs = [s for pts in series.values() for s, _ in pts]
    lo, hi = min(ys), max(ys)
    log = lo > 0 and hi / lo > 20
    return Axes(box, max(xs), lo, hi, log)


def draw_panel(img, box, title, series):
    """Axes, ticks, the series and a legend in box = (left, top, right, bottom) of img."""
    series = {k: [(s, v) for s, v in pts if math.isfinite(v) and math.isfinite(s)] for k, pts in series.items()}
    series = {k: pts for k, pts in series.items() if pts}
    left, top, right, bottom = box
    text(img, left, top - 16, title)
    line(img, left, bottom, right, bottom, (0, 0, 0), 1)
    line(img, left, top, left, bottom, (0, 0, 0), 1)
    if not series:
        return None
    ax = panel_axes(series, box)
    for x in nice_ticks(0, ax.xmax):
        px, _ = ax.px(x, 10 ** ax.ylo if ax.log else ax.ylo)
        line(img, px, bottom, px, bottom + 4, (0, 0, 0), 1)
        label = tick_label(x)
        text(img, int(px - text_width(label) / 2), bottom + 8, label)
    ticks = [10.0 ** e for e in range(math.ceil(ax.ylo - 1e-9), math.floor(ax.yhi + 1e-9) + 1)] if ax.log \
        else nice_ticks(ax.ylo, ax.yhi)
    if ax.log and len(ticks) < 3:  # under two decades in view: 1, 2 and 5 of each
        ticks = [m * 10.0 ** e for e in range(math.floor(ax.ylo), math.ceil(ax.yhi) + 1) for m in (1, 2, 5)
                 if ax.ylo - 1e-9 <= math.log10(m * 10.0 ** e) <= ax.yhi + 1e-9]
    for y in ticks:
        _, py = ax.px(0, y)
        line(img, left - 4, py, right, py, (225, 225, 225), 1)  # a grid line, and the tick
        line(img, left - 4, py, left, py, (0, 0, 0), 1)
        label = tick_label(y)
        text(img, left - 8 - text_width(label), int(py - 5), label)
    for i, (label, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
            line(img, *ax.px(s0, v0), *ax.px(s1, v1), color)
        if len(pts) == 1:
            x, y = ax.px(*pts[0])
            line(img, x - 2, y, x + 2, y, color, 3)
        text(img, right - 200, top + 4 + 14 * i, label, color)
    return ax


def save_curves(path, panels, width=720, panel_height=300):
    """panels: [(title, {label: [(step, value), ...]})] -> one PNG, the panels stacked."""
    img = np.full((panel_height * len(panels) + 30, width, 3), 255, np.uint8)
    for i, (title, series) in enumerate(panels):
        top = i * panel_height + 30
        draw_panel(img, (90, top, width - 20, top + panel_height - 60), title, series)
    text(img, width // 2 - text_width("step") // 2, img.shape[0] - 16, "step")
    data.write_png(path, img)


def smooth(points, alpha=0.3):
    """An exponential moving average of a series, bias-corrected so it starts at the first value."""
    out, avg = [], 0.0
    for i, (s, v) in enumerate(points):
        avg = alpha * v + (1 - alpha) * avg
        out.append((s, avg / (1 - (1 - alpha) ** (i + 1))))
    return out


NOT_PARTS = {"step", "lr", "time", "data_share", "skipped"}


def loss_panels(log_path):
    """The panels of a run's log.jsonl: its losses (each player's training loss, smoothed,
    and validation loss), then the model's other logged parts (a VAE's reconstruction and
    KL, say), each against the step."""
    losses, parts = {}, {}
    with open(log_path, errors="replace") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            for key, v in rec.items():
                if not isinstance(v, (int, float)) or key in NOT_PARTS or key.endswith("_per_s"):
                    continue
                if key.startswith("val_loss"):
                    losses.setdefault("val" + key[len("val_loss"):], []).append((rec["step"], v))
                elif key.startswith("loss"):
                    losses.setdefault("train" + key[len("loss"):], []).append((rec["step"], v))
                elif not key.startswith(("train_loss", "val_")):
                    parts.setdefault(key, []).append((rec["step"], v))
    losses = {k: smooth(v) if k.startswith("train") else v for k, v in losses.items()}
    panels = [("loss (train smoothed, val)", losses)]
    if parts:
        panels.append(("logged parts (smoothed)", {k: smooth(v) for k, v in parts.items()}))
    return panels
