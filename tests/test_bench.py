"""bench.py measures what it says: its FLOP count against the closed form for a GPT step,
and its table and JSON on a small run. (Speed targets live in bench.py itself, never in
timed tests.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import cli
import devices
from cli import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    words = ["def", "return", "self", "import", "class", "(", ")", ":"]
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (5000,), generator=g).tolist()))
    return str(path)


def gpt_flags(tmp_path, L=2, d=32, T=16, B=3):
    return ["--data", text_file(tmp_path), "--data-dir", str(tmp_path / "data"), "--n-layer", str(L),
            "--n-head", "2", "--n-embd", str(d), "--block-size", str(T), "--batch-size", str(B)]


def test_gpt_flops_match_the_closed_form(tmp_path):
    """FLOPs of a training step, in closed form. Each linear map costs 2 FLOPs per weight
    per token forward (attention and MLP: 12 d^2 a layer; the tied LM head: d V), and
    twice that backward (the gradients of its input and of its weight). Attention costs
    two T x T x d products forward (charged in full though causal), and five backward:
    the scores recomputed, as the fused kernels do, then the gradients of V, of the
    scores, of Q and of K. That is torch's own convention for its CUDA kernels, which
    bench.py extends to the CPU kernel (counted as zero without it)."""
    L, d, T, B = 2, 32, 16, 3
    row = bench.bench_train("gpt", "fp32", False, 2, ["--device", "cpu", *gpt_flags(tmp_path, L, d, T, B)],
                            str(tmp_path))
    V = 256  # the byte tokenizer
    linear = 3 * 2 * B * T * (L * 12 * d * d + d * V)
    attention = (2 + 5) * 2 * B * L * T * T * d
    assert row["gflop_per_step"] * 1e9 == linear + attention
    assert row["tokens_per_s"] == row["examples_per_s"] * T
    assert 0 < row["data_share"] < 1 and row["utilisation"] > 0 and row["peak_mib"] > 0


def test_compare_prints_the_ratio_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = bench.main(["train", "--models", "gpt", "--compare", "fp32,fp32", "--steps", "1", "--rounds", "2",
                       "--json", str(path), "--", *gpt_flags(tmp_path), "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "float32 eager / float32 eager" in out and "x throughput" in out
    rows = json.load(open(path))["rows"]
    assert len(rows) == 2 and rows[0]["val_loss"] == rows[1]["val_loss"]  # same seed, same steps: same losses
    assert rows[0]["rounds"] == 2


def test_compare_with_auto_shows_the_choice_against_the_faster(tmp_path, capsys, monkeypatch):
    """--compare fp32,bf16,auto: the auto row is the row of the dtype --dtype auto chose
    (here its race is told bf16 is faster), with the race's timings, held against the
    faster fixed side."""
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(devices, "race_dtypes", lambda *a: {"fp32": 2.0, "bf16": 1.0})
    path = tmp_path / "bench.json"
    code = bench.main(["train", "--models", "gpt", "--compare", "fp32,bf16,auto", "--steps", "1",
                       "--json", str(path), "--", *gpt_flags(tmp_path), "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    rows = json.load(open(path))["rows"]
    assert [r["side"] for r in rows] == ["float32 eager", "bfloat16 eager", "bfloat16 eager (auto)"]
    assert rows[2]["race"] == {"fp32": 2.0, "bf16": 1.0}
    same = lambda r: {k: v for k, v in r.items() if k not in ("side", "race")}  # noqa: E731
    assert same(rows[2]) == same(rows[1])  # auto trains exactly as bf16 then: not timed twice
    assert "bfloat16 eager (auto) (its race, a micro-batch's forward and backward: fp32 2000.0 ms, " \
           "bf16 1000.0 ms) / the faster, " in out


def test_bad_compare_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["train", "--compare", "fp32,int8"])
    assert e.value.code == 2
    assert "--compare fp32,int8" in capsys.readouterr().err


def test_a_run_that_stops_early_or_a_chosen_out_dir_is_one_line(tmp_path, capsys):
    flags = [*gpt_flags(tmp_path), "--device", "cpu"]
    for extra in (["--out-dir", str(tmp_path / "mine")], ["--max-time", "1e-9"]):
        with pytest.raises(SystemExit) as e:  # bench.main raises it; the command line's wrapper says it
            cli.cli(bench.main, ["train", "--models", "gpt", "--steps", "2", "--", *flags, *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and ("--out-dir" in err[-1] or "stopped before step 8" in err[-1]), err  # (1 + 3 intervals) x 2 steps


def test_copy_index_row_is_the_np_unique_index_and_counts_the_val_windows(tmp_path, capsys):
    text = "".join(f"line {i * 7919 % 1000:03d} of the corpus, and more words\n" for i in range(400))
    (tmp_path / "t.txt").write_text(text)
    path = tmp_path / "b.json"
    assert bench.main(["copy-index", "--data", str(tmp_path / "t.txt"), "--data-dir", str(tmp_path / "d"),
                       "--copy-span", "20", "--json", str(path)]) == 0
    assert "copy-index" in capsys.readouterr().out
    row = json.load(open(path))["rows"][0]
    train_text = text.encode()[:len(text) - len(text) * 5 // 100]  # one file: the last 5% is val
    windows = {train_text[i:i + 20] for i in range(len(train_text) - 19)}
    assert row["equal"] and row["train_bytes"] == len(train_text) and row["distinct"] == len(windows)
    val = text.encode()[len(train_text):]  # each line's tail recurs in train, its number does not
    want = sum(val[i:i + 20] in train_text for i in range(len(val) - 19)) / (len(val) - 19)
    assert row["val_windows_found"] == want and 0 < want < 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs everything (minutes)")
def test_gpu_check_without_cuda_checks_its_flags_and_says_so_in_one_line(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh")], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().count("\n") == 0 and "no CUDA" in r.stdout, r.stdout
    assert not (tmp_path / "out").exists()  # ran nothing, wrote nothing


def test_dry_run_refuses_a_bad_flag_or_preset(capsys):
    assert bench.main(["train", "--models", "gpt:gpt2", "--compare", "eager,compile", "--dry-run",
                       "--", "--vocab-size", "50257"]) == 0
    with pytest.raises(UsageError, match="gpt3"):
        bench.main(["train", "--models", "gpt:gpt3", "--dry-run"])
