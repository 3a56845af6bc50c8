"""--init-from another run's ckpt.pt: the new run starts at step 0 from that run's weights
(its first evaluation gives the same losses as the source's last, bit for bit: the same
weights, batches and noise), with a different number of classes the label embeddings
fresh and the rest kept, and a data-dependent field that does not fit is one line."""
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
import cli
import data
import train

SMALL = {"gpt": ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16"],
         "diffusion": ["--base", "8", "--timesteps", "10", "--sample-steps", "5"],
         "vae": ["--width", "8", "--z-dim", "4"], "gan": ["--width", "8", "--z-dim", "4"]}


def run(model, out, *extra, data_dir):
    base = ["--model", model, "--data-dir", data_dir, "--eval-iters", "1", "--log-interval", "1",
            "--batch-size", "8", "--sample-images", "4", "--sample-tokens", "4", "--dtype", "fp32", "--out-dir", out]
    assert train.main([*base, *extra]) == 0


def evals(out):
    return [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "val_loss" in r
            or "val_loss_generator" in r]


@pytest.mark.parametrize("model", ["gpt", "diffusion", "vae", "gan"])
def test_a_run_starts_from_another_runs_weights(tmp_path, shared_data, model):
    extra = []
    if model == "gpt":
        (tmp_path / "c.txt").write_text("def f(x):\n    return x + 1\n" * 300)
        extra = ["--data", str(tmp_path / "c.txt")]
    src, new = str(tmp_path / "src"), str(tmp_path / "new")
    run(model, src, *SMALL[model], *extra, "--max-iters", "3", "--eval-interval", "3", data_dir=shared_data)
    # no architecture flags: they come from the checkpoint
    run(model, new, *extra, "--init-from", f"{src}/ckpt.pt", "--max-iters", "2", "--eval-interval", "2",
        data_dir=shared_data)
    last, first = evals(src)[-1], evals(new)[0]
    assert first["step"] == 0
    assert {k: v for k, v in first.items() if "_loss" in k} == {k: v for k, v in last.items() if "_loss" in k}
    ck = checkpoint.load_checkpoint(f"{new}/ckpt.pt")
    assert ck["step"] == 2 and ck["config"]["model_config"] == checkpoint.load_checkpoint(f"{src}/ckpt.pt")[
        "config"]["model_config"]


def three_classes_28(root):
    rng = np.random.default_rng(0)
    for k in range(3):
        os.makedirs(root / f"c{k}")
        for i in range(20):
            data.write_png(str(root / f"c{k}" / f"{i}.png"), rng.integers(0, 256, (28, 28)).astype(np.uint8))
    return str(root)


def test_other_classes_get_fresh_label_embeddings_and_the_rest_is_kept(tmp_path, shared_data, capsys):
    src, new = str(tmp_path / "src"), str(tmp_path / "new")
    run("diffusion", src, *SMALL["diffusion"], "--max-iters", "2", "--eval-interval", "2", data_dir=shared_data)
    folder = three_classes_28(tmp_path / "three")
    # one SGD step at a learning rate of 1e-12 moves no weight by more than 1e-12 x its gradient
    run("diffusion", new, "--data", folder, "--init-from", f"{src}/ckpt.pt", "--max-iters", "1",
        "--eval-interval", "1", "--lr", "1e-12", "--min-lr", "1e-12", "--warmup-iters", "0", "--optimizer", "sgd",
        "--grad-clip", "0", "--weight-decay", "0", data_dir=shared_data)
    assert "fresh" in capsys.readouterr().out
    a = checkpoint.load_checkpoint(f"{src}/ckpt.pt")["model"]
    b = checkpoint.load_checkpoint(f"{new}/ckpt.pt")["model"]
    resized = [k for k in b if k not in a or a[k].shape != b[k].shape]
    assert resized and all("emb" in k or "label" in k or "class" in k for k in resized), resized
    kept = [k for k in b if k not in resized]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in kept)


def test_data_that_does_not_fit_is_one_line(tmp_path, shared_data):
    src = str(tmp_path / "src")
    run("vae", src, *SMALL["vae"], "--max-iters", "1", "--eval-interval", "1", data_dir=shared_data)
    small = tmp_path / "small"
    os.makedirs(small / "a")
    for i in range(20):
        data.write_png(str(small / "a" / f"{i}.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(cli.UsageError, match="image_size 28, this data needs 8"):
        train.main(["--model", "vae", "--data", str(small), "--data-dir", shared_data, "--init-from",
                    f"{src}/ckpt.pt", "--out-dir", str(tmp_path / "o")])
    with pytest.raises(cli.UsageError, match="holds a vae model, not gan"):
        train.main(["--model", "gan", "--data-dir", shared_data, "--init-from", f"{src}/ckpt.pt",
                    "--out-dir", str(tmp_path / "o2")])


def test_tying_what_the_source_kept_apart_is_one_line(tmp_path, shared_data):
    """An untied run's embedding and head are two matrices: a model that ties them into one
    tensor cannot take both, and loading would silently keep whichever came last."""
    (tmp_path / "c.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    corpus, src = ["--data", str(tmp_path / "c.txt")], str(tmp_path / "src")
    run("gpt", src, *SMALL["gpt"], *corpus, "--no-tie-embeddings", "--max-iters", "2", "--eval-interval", "2",
        data_dir=shared_data)
    with pytest.raises(cli.UsageError, match="wte.weight and lm_head.weight differ, and this model ties them"):
        run("gpt", str(tmp_path / "new"), *corpus, "--init-from", f"{src}/ckpt.pt", "--tie-embeddings",
            "--max-iters", "1", data_dir=shared_data)
