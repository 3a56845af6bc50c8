"""bench.py compare: its statistics against the formulas worked by hand, a real two-side
run over two seeds (the order the runs took, and each side's mean against its runs' own
log.jsonl), and its one-line errors."""
import json
import math
import os

import pytest
import torch

import bench
import cli
from cli import UsageError
from test_bench import text_file  # the same small corpus


def test_mean_standard_error_and_welch_against_hand_worked_numbers():
    """a = 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 14/3, sample variance
    (n - 1 = 2) 7/3, se^2 = 7/3 / 3 = 7/9.  b = 3, 5, 6, 8: mean 11/2; squared deviations
    6.25 + 0.25 + 0.25 + 6.25 = 13, variance 13/3, se^2 = 13/12.
    t = (7/3 - 11/2) / sqrt(7/9 + 13/12) = (-19/6) / sqrt(67/36) = -19 / sqrt(67).
    df = (67/36)^2 / ((7/9)^2 / 2 + (13/12)^2 / 3) = (4489/1296) / (392/1296 + 507/1296)
       = 4489 / 899."""
    a, b = [1.0, 2.0, 4.0], [3.0, 5.0, 6.0, 8.0]
    mean, se, n = bench.mean_se(a)
    assert (n, mean) == (3, pytest.approx(7 / 3, rel=1e-15)) and se == pytest.approx(math.sqrt(7) / 3, rel=1e-15)
    mean, se, n = bench.mean_se(b)
    assert (n, mean) == (4, 5.5) and se == pytest.approx(math.sqrt(13 / 12), rel=1e-15)
    t, df = bench.welch(a, b)
    assert t == pytest.approx(-19 / math.sqrt(67), rel=1e-14)
    assert df == pytest.approx(4489 / 899, rel=1e-14)
    t_ba, df_ba = bench.welch(b, a)  # the pair the other way round: t changes sign, df does not
    assert t_ba == pytest.approx(-t, rel=1e-15) and df_ba == pytest.approx(df, rel=1e-15)
    # One value: no standard error; no spread on either side: no t.
    assert bench.mean_se([2.5]) == (2.5, None, 1)
    assert bench.welch([3.0, 3.0], [5.0, 5.0]) == (None, None)


def test_welch_against_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(5, generator=g, dtype=torch.float64) + 0.3).tolist()
    b = (torch.randn(7, generator=g, dtype=torch.float64) * 2).tolist()
    t, df = bench.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(float(ref.statistic), rel=1e-12)
    if hasattr(ref, "df"):
        assert df == pytest.approx(float(ref.df), rel=1e-12)


def tiny_gpt(tmp_path):
    return ["--model", "gpt", "--data", text_file(tmp_path), "--data-dir", str(tmp_path / "data"), "--dtype", "fp32",
            "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
            "--max-iters", "3", "--eval-iters", "1", "--sample-tokens", "4"]


def final_val_loss(out):
    """The val_loss of the last evaluation in a run's log.jsonl, read here on its own."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "val_loss" in r][-1]["val_loss"]


def test_a_tiny_compare_takes_turns_and_means_its_own_runs(tmp_path, capsys, monkeypatch):
    ran, run_script = [], bench.run_script

    def recording(script, argv, what):
        ran.append((what, argv[argv.index("--seed") + 1], argv[argv.index("--out-dir") + 1]))
        return run_script(script, argv, what)
    monkeypatch.setattr(bench, "run_script", recording)
    path, runs_dir = tmp_path / "compare.json", tmp_path / "runs"
    code = bench.main(["compare", "--side", "slow=--lr 1e-3", "--side", "fast=--lr 1e-2 --warmup-iters 0",
                       "--seeds", "2", "--max-time", "120", "--device", "cpu", "--json", str(path),
                       "--runs-dir", str(runs_dir), "--", *tiny_gpt(tmp_path)])
    assert code == 0
    order = [("slow", 1), ("fast", 1), ("slow", 2), ("fast", 2)]
    assert ran == [(f"side {s}, seed {n}", str(n), str(runs_dir / f"{s}-{n}")) for s, n in order]
    # The checkpoints were written in that order too (each run's own files, not bench's record).
    ckpts = [runs_dir / f"{s}-{n}" / "ckpt.pt" for s, n in order]
    assert sorted(ckpts, key=lambda p: p.stat().st_mtime_ns) == ckpts
    with open(path) as f:
        got = json.load(f)
    assert [tuple(o) for o in got["order"]] == order and len(got["runs"]) == 4
    for side in ("slow", "fast"):
        losses = [final_val_loss(runs_dir / f"{side}-{n}") for n in (1, 2)]
        summary = got["summary"][side]["val_loss"]
        assert summary["n"] == 2
        assert summary["mean"] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-12)
        assert summary["se"] == pytest.approx(abs(losses[0] - losses[1]) / 2, rel=1e-9)  # n = 2: |x1 - x2| / 2
        assert [r["metrics"]["val_loss"] for r in got["runs"] if r["side"] == side] == losses
        assert all(r["metrics"]["steps"] == 3 and r["metrics"]["tok_per_s"] > 0
                   for r in got["runs"] if r["side"] == side)
    pair = next(p for p in got["pairs"] if p["metric"] == "val_loss")
    s, f = got["summary"]["slow"]["val_loss"], got["summary"]["fast"]["val_loss"]
    assert (pair["a"], pair["b"]) == ("slow", "fast")
    assert pair["t"] == pytest.approx((s["mean"] - f["mean"]) / math.hypot(s["se"], f["se"]), rel=1e-12)
    out = capsys.readouterr().out
    assert "val_loss" in out and "±" in out and "slow - fast: Welch's t" in out


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.cli(bench.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err and "\n" not in err, err
    return err


def test_dry_run_checks_every_side_and_names_the_bad_one(tmp_path, capsys):
    base = ["compare", "--side", "a=--lr 1e-3", "--runs-dir", str(tmp_path / "runs"), "--dry-run", "--",
            *tiny_gpt(tmp_path)]
    assert bench.main(base[:3] + ["--side", "b=--lr 2e-3"] + base[3:]) == 0
    assert "nothing run" in capsys.readouterr().out
    err = one_line_error(base[:3] + ["--side", "b=--no-such-flag 1"] + base[3:], capsys)
    assert "side b" in err and "--no-such-flag" in err
    err = one_line_error(base[:3] + ["--side", "b=--lr -1"] + base[3:], capsys)  # train.check's range
    assert "side b" in err and "lr" in err
    err = one_line_error(base[:3] + ["--side", "b=--seed 7"] + base[3:], capsys)  # compare sets the seed
    assert "side b" in err and "--seed" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()  # nothing ran


@pytest.mark.parametrize("argv, said", [
    (["--side", "a=--lr 1e-3"], "two or more"),
    (["--side", "a=", "--side", "a=--lr 1e-3"], "each NAME once"),
    (["--side", "a=", "--side", "b=", "--seeds", "1"], "--seeds 1"),
    (["--side", "a b=--lr 1e-3", "--side", "c="], "NAME=FLAGS"),
])
def test_bad_compare_options_are_one_line(argv, said, capsys):
    assert said in one_line_error(["compare", *argv, "--dry-run"], capsys)


def test_side_is_only_for_compare(capsys):
    assert "--side" in one_line_error(["train", "--side", "a=", "--dry-run"], capsys)


def test_a_failing_run_is_one_line_naming_side_and_seed(tmp_path, monkeypatch):
    """A run train.py refuses once running (here: the data is not there) stops the compare in one line."""
    flags = [f if f != text_file(tmp_path) else str(tmp_path / "missing.txt") for f in tiny_gpt(tmp_path)]
    monkeypatch.setattr(bench, "check_sides", lambda *a: None)  # past the flag check, to the run itself
    with pytest.raises(UsageError, match=r"side a, seed 1: train.py failed"):
        bench.main(["compare", "--side", "a=", "--side", "b=", "--seeds", "2", "--device", "cpu", "--",
                    *flags])
