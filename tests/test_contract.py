"""The model contract as README.md writes it: a file with only a Config dataclass and a
Model whose forward(x, y=None) returns (loss, logs) and whose sample(n, y=None) returns
samples trains, resumes exactly, samples, is evaluated and shows its --help; a fork of
one of the project's files shows its field comments in --help; a checkpoint whose model
file has moved says so in one line, and --model finds the file again."""
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import metrics  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

# The minimum: no PRESETS, DATA, players, parameters_of, player=, generate or nll.
MINIMAL_IMAGES = '''
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Config:
    channels: int = 1        # image channels, filled from the data
    image_size: int = 28     # image side, filled from the data
    spread: float = 0.5      # the standard deviation each pixel starts with


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        self.mean = nn.Parameter(torch.zeros(shape))
        self.log_std = nn.Parameter(torch.full(shape, cfg.spread).log())

    def forward(self, x, y=None):
        z = (x - self.mean) / self.log_std.exp()
        nll = 0.5 * z ** 2 + self.log_std
        return nll.mean(), {"mean_abs_z": z.abs().mean()}

    @torch.no_grad()
    def sample(self, n, y=None):
        return (self.mean + self.log_std.exp() * torch.randn(n, *self.mean.shape)).clamp(-1, 1)
'''

# A text model to the minimum: a bigram table; its sample is token ids, and without
# generate() train.py writes no text samples and sample.py refuses in one line.
MINIMAL_TEXT = '''
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 0      # filled from the tokenizer
    block_size: int = 16     # tokens per example


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)

    def forward(self, x, y=None):
        logits = self.table(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), {}

    @torch.no_grad()
    def sample(self, n, y=None):
        return torch.zeros(n, 1, dtype=torch.long)
'''


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def logged(out, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, open(Path(out) / "log.jsonl")) if key in r}


def run_cli(main, argv, capsys):
    """(exit code, stderr) of main(argv) run as its command line runs it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.cli(main, argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:FID from")  # 20 samples: enough to show the row is made
def test_minimal_image_model_trains_resumes_samples_and_is_evaluated(tmp_path, shared_data, capsys):
    model = write(tmp_path / "experiments" / "pixels.py", MINIMAL_IMAGES)
    flags = ["--model", model, "--data", "digits", "--data-dir", shared_data, "--batch-size", "16",
             "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1", "--sample-images", "8",
             "--warmup-iters", "0", "--lr", "1e-2", "--lr-decay-iters", "4"]  # one schedule for both runs
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert train.main([*flags, "--max-iters", "4", "--out-dir", straight]) == 0
    assert train.main([*flags, "--max-iters", "2", "--out-dir", split]) == 0
    assert train.main([*flags, "--max-iters", "4", "--out-dir", split, "--resume"]) == 0
    # exact resume: the same arithmetic in the same order, so the same bits
    assert logged(straight) == logged(split) and sorted(logged(split)) == [1, 2, 3, 4]
    assert logged(straight, "mean_abs_z").keys() == logged(straight).keys()  # its logged part
    assert (Path(straight) / "samples.png").exists()
    assert logged(straight, "val_loss")[4] < logged(straight, "val_loss")[0]  # it learns

    png = tmp_path / "s.png"
    assert sample.main(["--ckpt", f"{split}/ckpt.pt", "--num-samples", "4", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the file moves: one line that names it and says what to do; --model finds it again
    moved = shutil.move(model, tmp_path / "pixels.py")
    code, err = run_cli(sample.main, ["--ckpt", f"{split}/ckpt.pt", "--out", str(png)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and model in err and "--model" in err, err
    assert sample.main(["--ckpt", f"{split}/ckpt.pt", "--out", str(png), "--model", str(moved)]) == 0
    capsys.readouterr()
    assert metrics.main(["--ckpt", f"{split}/ckpt.pt", "--model", str(moved), "--n", "20", "--batch-size", "10",
                         "--against", "val", "--data-dir", shared_data, "--json", str(tmp_path / "m.json")]) == 0
    rows = json.load(open(tmp_path / "m.json"))
    assert "FID" in rows and not any(k.startswith("bits/dim") for k in rows)  # no nll: no bits/dim row


def test_minimal_model_shows_its_field_comments_in_help(tmp_path, capsys):
    model = write(tmp_path / "pixels.py", MINIMAL_IMAGES)
    with pytest.raises(SystemExit):
        train.parse_args(["--model", model, "--help"])
    out = capsys.readouterr().out
    assert "the standard deviation each pixel starts with" in out and "presets: none" in out


def test_a_fork_of_a_project_file_shows_its_field_comments(tmp_path, capsys):
    """A copy of gpt.py under the same name (the project's gpt is imported too) shows its
    own comments, the edited one included."""
    __import__("gpt")  # the project's module of the same name is loaded too
    text = (ROOT / "gpt.py").read_text()
    assert "# Transformer blocks" in text
    fork = write(tmp_path / "experiments" / "gpt.py", text.replace("# Transformer blocks", "# blocks, forked"))
    with pytest.raises(SystemExit):
        train.parse_args(["--model", fork, "--help"])
    out = capsys.readouterr().out
    assert "blocks, forked" in out and "Transformer blocks" not in out


def test_minimal_text_model_trains_and_sample_py_says_it_cannot_generate(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x\n" * 400)
    model = write(tmp_path / "bigram.py", MINIMAL_TEXT)
    out = str(tmp_path / "out")
    assert train.main(["--model", model, "--data", str(corpus), "--data-dir", str(tmp_path / "d"),
                       "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "4",
                       "--out-dir", out]) == 0
    assert "no generate()" in capsys.readouterr().out and not (Path(out) / "samples.txt").exists()
    code, err = run_cli(sample.main, ["--ckpt", f"{out}/ckpt.pt"], capsys)
    assert code == 2 and "no generate()" in err and len(err.strip().splitlines()) == 1, err


def test_a_model_file_without_the_minimum_is_one_line(tmp_path, capsys):
    bad = write(tmp_path / "nomodel.py", "from dataclasses import dataclass\n\n@dataclass\nclass Config:\n"
                "    width: int = 8  # a width\n")
    code, err = run_cli(train.main, ["--model", bad], capsys)
    assert code == 2 and "defines no Model" in err and len(err.strip().splitlines()) == 1, err
    no_data = write(tmp_path / "nodata.py", MINIMAL_IMAGES)
    code, err = run_cli(train.main, ["--model", no_data, "--out-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "--data" in err and len(err.strip().splitlines()) == 1, err
