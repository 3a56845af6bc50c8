"""The fault and bad-input matrix: interruptions, killed saves, hostile and damaged
checkpoints, non-finite values, lost processes and fuzzed inputs, across the models."""
import ast
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tolerances import assert_displacements_agree, assert_losses_agree, weights_at_start

import checkpoint  # noqa: E402
import cli  # noqa: E402
import contract  # noqa: E402
import data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["gpt", "vae", "gan", "diffusion"]


@pytest.fixture
def corpus(tmp_path):
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "(", ")", ":"]
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(20000)))
    return str(path)


def model_args(model, tmp_path, corpus, shared_data):
    """A run of each model small enough for a test: fp32, a fixed LR schedule (so a run
    cut short and resumed follows the uninterrupted one), every step logged."""
    common = ["--model", model, "--eval-iters", "1", "--log-interval", "1", "--dtype", "fp32", "--warmup-iters", "2",
              "--lr-decay-iters", "40", "--eval-interval", "4", "--data-dir", str(tmp_path / "data")]
    return common + {
        "gpt": ["--data", corpus, "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
                "--batch-size", "4", "--sample-tokens", "8", "--dropout", "0.1"],
        "vae": ["--data", "ring8", "--width", "8", "--z-dim", "2", "--batch-size", "16", "--sample-images", "100"],
        "gan": ["--data", "grid25", "--width", "8", "--z-dim", "4", "--batch-size", "16", "--ema", "0.9",
                "--mbstd", "4", "--sample-images", "100"],
        "diffusion": ["--preset", "tiny", "--base", "8", "--mults", "1,2", "--attn-res", "14", "--timesteps", "50",
                      "--sample-steps", "3", "--sample-images", "4", "--batch-size", "4", "--data-dir", shared_data],
    }[model]


def losses(out):
    """{step: every logged loss of that step} from a run's log."""
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    return {r["step"]: {k: v for k, v in r.items() if "loss" in k} for r in recs if "lr" in r}


def load(out, name="ckpt.pt"):
    return torch.load(os.path.join(out, name), weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_error_line(r):
    """What the user sees of a failure: no traceback, one 'error:' line."""
    err = r if isinstance(r, str) else r.stderr
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if not l.startswith(("data: ", "warning: "))]
    assert len(lines) == 1, err
    return lines[0]


def shell(*argv, script="train.py", **kw):
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def sample_main(argv, capsys):
    """sample.py's main in this process, with its one-line error: (exit code, stderr)."""
    import sample
    capsys.readouterr()
    try:
        code = sample.main(argv)
    except cli.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    return code, capsys.readouterr().err


def train_cli(argv, capsys, monkeypatch):
    """train.py's command line in this process (no interpreter start): (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.cli(train.main)
    return e.value.code, capsys.readouterr().err


def patch_forward(monkeypatch, model, change):
    """Wrap the model's training forward: change(call, loss, parts, model) -> (loss, parts),
    call counting training forwards from 1 (a GAN has two a step)."""
    cls = contract.load_module(model).Model
    real, calls = cls.forward, [0]

    def forward(self, *a, **kw):
        loss, parts = real(self, *a, **kw)
        if self.training:
            calls[0] += 1
            loss, parts = change(calls[0], loss, parts, self)
        return loss, parts
    monkeypatch.setattr(cls, "forward", forward)


# ---- interruption -------------------------------------------------------------------

@pytest.mark.parametrize("model, sig", [("gpt", signal.SIGTERM), ("vae", signal.SIGINT), ("gan", signal.SIGTERM),
                                        ("diffusion", signal.SIGINT)])
def test_a_signal_then_resume_equals_the_uninterrupted_run(model, sig, tmp_path, corpus, shared_data, monkeypatch):
    a = model_args(model, tmp_path, corpus, shared_data) + ["--max-iters", "7"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert train.main(a + ["--out-dir", whole]) == 0

    def interrupt(call, loss, p, m):
        if call == 6:  # mid-step for the GAN (its generator's forward of step 2), after the 6th for the rest
            os.kill(os.getpid(), sig)
        return loss, p
    with monkeypatch.context() as mp:
        patch_forward(mp, model, interrupt)
        assert train.main(a + ["--out-dir", parts]) == 128 + sig
    stopped = load(parts)["step"]
    assert 0 < stopped < 7
    assert train.main(a + ["--out-dir", parts, "--resume"]) == 0
    la, lb = losses(whole), losses(parts)
    assert sorted(lb) == list(range(1, 8))
    assert la == lb  # bit for bit, every player's loss
    wa, wb = load(whole), load(parts)
    assert same_weights(wa["model"], wb["model"])
    assert (wa["ema"] is None) == (wb["ema"] is None) and (wa["ema"] is None or same_weights(wa["ema"], wb["ema"]))


KILL_AT_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
real, saves = torch.save, [0]
def save(obj, f, *a, **kw):
    saves[0] += 1
    if saves[0] == {n}:  # half a checkpoint on disk, then killed as by kill -9 or the OOM killer
        f.write(b"half a checkpoint" * 4096)
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **kw)
torch.save = save
import cli
import train
sys.argv[0] = "train.py"
cli.cli(train.main)
"""


@pytest.mark.parametrize("model", ["gpt", "gan"])
def test_kill_9_during_a_checkpoint_save_keeps_the_last_one(model, tmp_path, corpus, shared_data):
    a = model_args(model, tmp_path, corpus, shared_data) + ["--max-iters", "10"]
    whole, out = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert train.main(a + ["--out-dir", whole]) == 0
    script = tmp_path / "kill_at_save.py"
    script.write_text(KILL_AT_SAVE.format(root=ROOT, n=2))  # saves at steps 4, 8, 10: killed in the one at 8
    r = subprocess.run([sys.executable, str(script), *a, "--out-dir", out], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert glob.glob(os.path.join(out, "ckpt.pt.tmp*")), "the kill should have left the half-written file"
    assert load(out)["step"] == 4  # the previous checkpoint, whole
    assert max(losses(out)) == 8  # the log ran ahead of it
    r = shell(*a, "--out-dir", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed" in r.stdout and not glob.glob(os.path.join(out, "*.tmp*"))
    assert losses(out) == losses(whole)  # steps 5-8 redone exactly, logged once
    assert same_weights(load(out)["model"], load(whole)["model"])


# ---- checkpoints that are damaged, hostile or of another model -----------------------

class Payload:
    """Unpickling this calls os.mkdir(path): code run by merely loading a file."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "the-payload-ran")
    out = tmp_path / "run"
    out.mkdir()
    path = str(out / "ckpt.pt")
    torch.save({"model": {}, "config": {"model": "gpt"}, "step": 0, "payload": Payload(marker)}, path)
    for r in (shell("--ckpt", path, script="sample.py"), shell("--ckpt", path, script="metrics.py"),
              shell("--out-dir", str(out), "--resume")):
        assert r.returncode == 2
        line = one_error_line(r)
        assert path in line and "refused" in line
        assert not os.path.exists(marker)
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert os.path.exists(marker)


def test_every_torch_load_is_weights_only():
    """A source scan: torch.load with weights_only=True everywhere, no pickle, no
    np.load(allow_pickle=True), outside the tests."""
    calls = 0
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tools", "*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name != "pickle" for a in node.names), path
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if owner == "torch" and node.func.attr == "load":
                calls += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{node.lineno}"
            if owner == "np" and node.func.attr == "load":
                assert not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value), \
                    f"{path}:{node.lineno}"
    assert calls >= 2  # train.py's and the GPT-2 weights reader at least


@pytest.fixture
def gan_ckpt(tmp_path, corpus, shared_data):
    out = str(tmp_path / "g")
    assert train.main(model_args("gan", tmp_path, corpus, shared_data) + ["--max-iters", "1", "--out-dir", out]) == 0
    return out


@pytest.mark.parametrize("damage", ["truncate", "flip", "zeros"])
def test_a_damaged_checkpoint_gets_one_line_naming_it(gan_ckpt, damage, tmp_path, capsys, monkeypatch):
    path = os.path.join(gan_ckpt, "ckpt.pt")
    blob = bytearray(open(path, "rb").read())
    if damage == "truncate":
        blob = blob[: len(blob) * 2 // 3]
    elif damage == "flip":  # inside the first stored tensor's zip entry header and data
        for i in range(60, len(blob) // 2, 97):
            blob[i] ^= 0xFF
    else:
        blob = bytes(len(blob))
    open(path, "wb").write(blob)
    for code, err in (sample_main(["--ckpt", path, "--out", str(tmp_path / "s.png")], capsys),
                      train_cli(["--out-dir", gan_ckpt, "--model", "gan", "--resume"], capsys, monkeypatch)):
        assert code == 2
        line = one_error_line(err)
        assert path in line and "checkpoint" in line


def test_a_checkpoint_of_another_model_or_shape_is_named(gan_ckpt, tmp_path, capsys, monkeypatch):
    path = os.path.join(gan_ckpt, "ckpt.pt")
    code, err = train_cli(["--model", "vae", "--out-dir", gan_ckpt, "--resume"], capsys, monkeypatch)
    assert code == 2 and "holds a gan model, not vae" in one_error_line(err)
    code, err = train_cli(["--model", "gan", "--out-dir", gan_ckpt, "--resume", "--width", "16"], capsys, monkeypatch)
    assert code == 2 and "--width 16 differs from the checkpoint's 8" in one_error_line(err)
    # weights that do not fit the config stored beside them (an edited or mixed-up file)
    ck = torch.load(path, weights_only=True)
    ck["config"]["model_config"]["width"] = 16
    torch.save(ck, path)
    for code, err in (sample_main(["--ckpt", path, "--out", str(tmp_path / "s.png")], capsys),
                      train_cli(["--model", "gan", "--out-dir", gan_ckpt, "--resume"], capsys, monkeypatch)):
        assert code == 2
        line = one_error_line(err)
        assert "does not fit this gan model" in line and "size mismatch" in line


# ---- numerical faults -----------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_a_nonfinite_loss_stops_naming_the_step_and_part(model, tmp_path, corpus, shared_data, monkeypatch):
    out = str(tmp_path / "nan")
    # the GAN's 12th training forward is the generator's of step 5; the others' 6th is step 5
    at = 12 if model == "gan" else 6
    patch_forward(monkeypatch, model, lambda c, loss, p, m: (loss * float("nan") if c >= at else loss, p))
    with pytest.raises(cli.UsageError, match=("generator " if model == "gan" else "") +
                       "loss is not finite at step 5; stopped, the last good checkpoint"):
        train.main(model_args(model, tmp_path, corpus, shared_data) + ["--max-iters", "20", "--out-dir", out])
    ck = load(out)
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_a_nonfinite_gradient_behind_a_finite_loss_is_caught(tmp_path, corpus, shared_data, monkeypatch):
    # sqrt at 0 has an infinite derivative: the loss is unchanged, the gradient is NaN
    def poison(c, loss, p, m):
        return (loss + torch.sqrt(next(m.parameters()).sum() * 0) if c == 3 else loss), p
    patch_forward(monkeypatch, "gpt", poison)
    with pytest.raises(cli.UsageError, match="gradient is not finite at step 2"):
        train.main(model_args("gpt", tmp_path, corpus, shared_data) + ["--max-iters", "8", "--out-dir",
                                                                       str(tmp_path / "g")])


def test_skip_nonfinite_skips_and_counts(tmp_path, corpus, shared_data, monkeypatch):
    patch_forward(monkeypatch, "gan", lambda c, loss, p, m: (loss * float("nan") if c in (3, 8) else loss, p))
    out = str(tmp_path / "skip")
    assert train.main(model_args("gan", tmp_path, corpus, shared_data) +
                      ["--max-iters", "6", "--out-dir", out, "--skip-nonfinite"]) == 0
    recs = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if "lr" in l]
    assert [r["skipped"] for r in recs] == [0, 1, 1, 2, 2, 2]
    assert all(np.isfinite(v) for r in recs for k, v in r.items() if "loss" in k)
    # step 2's D update was skipped (its loss is not in the log), its G update was not
    assert "loss_discriminator" not in recs[1] and "loss_generator" in recs[1]
    ck = load(out)
    assert ck["skipped"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_a_parameter_a_model_froze_stays_frozen_through_the_players(tmp_path, corpus, shared_data, monkeypatch):
    import gan
    real_init, seen = gan.Model.__init__, []

    def init(self, cfg):
        real_init(self, cfg)
        self.discriminator.head.bias.requires_grad_(False)  # e.g. a fixed feature net inside D
        seen.append((self, self.discriminator.head.bias.detach().clone()))
    monkeypatch.setattr(gan.Model, "__init__", init)
    checks = []

    def check(c, loss, p, m):
        checks.append(m.discriminator.head.bias.requires_grad)
        return loss, p
    patch_forward(monkeypatch, "gan", check)
    out = str(tmp_path / "frozen")
    assert train.main(model_args("gan", tmp_path, corpus, shared_data) + ["--max-iters", "3", "--out-dir", out]) == 0
    assert checks == [False] * 6  # in D's steps and G's
    model, start = seen[0]
    assert not model.discriminator.head.bias.requires_grad and model.discriminator.head.bias.grad is None
    assert torch.equal(load(out)["model"]["discriminator.head.bias"], start)  # never moved
    assert model.discriminator.features[0].weight.requires_grad  # the rest trains


# ---- distributed faults ----------------------------------------------------------------

def torchrun(*argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


@pytest.mark.summation_order
def test_two_processes_equal_one_for_the_vae(tmp_path, corpus, shared_data):
    # SGD without clipping: its update is linear in the gradient, so a gradient off by
    # any factor (a sum over processes for a mean, say, which AdamW and the clip hide)
    # moves the weights by that factor.
    a = model_args("vae", tmp_path, corpus, shared_data) + ["--max-iters", "3", "--batch-size", "8",
                                                            "--optimizer", "sgd", "--grad-clip", "0"]
    assert train.main(a + ["--grad-accum", "2", "--out-dir", str(tmp_path / "one")]) == 0
    p = torchrun(*a, "--out-dir", str(tmp_path / "two"))
    try:
        out, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0, err[-2000:]
    la, lb = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert la.keys() == lb.keys() == {1, 2, 3}
    # Equal in exact arithmetic, summed in another order (tolerances.py). The longest chain
    # of reductions: a weight's gradient sums over the 16 points of the global batch,
    # through the encoder's and decoder's 3 layers each, 64 wide (8 x --width).
    n = 16 + 6 * 64 + 2
    for key in la[1]:
        assert_losses_agree({s: la[s][key] for s in la}, {s: lb[s][key] for s in lb}, n, key)
    one = load(str(tmp_path / "one"))
    assert_displacements_agree(one["model"], load(str(tmp_path / "two"))["model"], weights_at_start(one), n,
                               terms=16, steps=3, adam=False)


def test_a_dead_rank_ends_the_job_quickly_and_leaves_the_checkpoint_whole(tmp_path, corpus, shared_data):
    out = str(tmp_path / "ddp")
    p = torchrun(*model_args("gpt", tmp_path, corpus, shared_data), "--max-iters", "100000", "--eval-interval", "5",
                 "--out-dir", out)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (os.path.exists(os.path.join(out, "ckpt.pt"))
                                              and open(os.path.join(out, "log.jsonl")).read().count("\n") >= 8):
            time.sleep(0.2)
        assert os.path.exists(os.path.join(out, "ckpt.pt")), "the job never wrote a checkpoint"
        agent = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
        assert len(agent) == 2, agent  # torchrun's two workers
        os.kill(int(agent[1]), signal.SIGKILL)
        t = time.time()
        out_text, err = p.communicate(timeout=120)
        took = time.time() - t
    finally:
        p.kill()
    assert p.returncode != 0
    assert took < 60, took
    assert "lost contact with another process" in err
    assert checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] >= 5  # whole and loadable


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, argv, says", [
    (lambda d: (d / "empty.txt").write_text(""), ["--data", "{d}/empty.txt"], "is empty"),
    (lambda d: (d / "bin.txt").write_bytes(bytes(range(256)) * 40), ["--data", "{d}/bin.txt"], "binary"),
    (lambda d: (d / "latin.txt").write_bytes("café ".encode("latin-1") * 500), ["--data", "{d}/latin.txt"],
     "not UTF-8"),
    (lambda d: np.save(d / "f.npy", np.zeros((8, 16, 16), np.float32)),
     ["--model", "vae", "--data", "{d}/f.npy"], "not uint8"),
    (lambda d: np.save(d / "s.npy", np.zeros((8, 16), np.uint8)), ["--model", "vae", "--data", "{d}/s.npy"], "shape"),
    (lambda d: (d / "x.npy").write_bytes(b"\x93NUMPY garbage"), ["--model", "gan", "--data", "{d}/x.npy"],
     "not a readable .npy"),
    (lambda d: (d / "c.txt").write_text("hello world " * 500), ["--data", "{d}/c.txt", "--vocab-size", "100"],
     "tokenizer bytes has 256 symbols but the model's vocab_size is 100"),
    (lambda d: (d / "afile").write_text("x"), ["--model", "vae", "--data", "ring8", "--out-dir", "{d}/afile/out"],
     "cannot write there"),
    (lambda d: [(d / "mnist").mkdir()] + [(d / "mnist" / f).write_bytes(b"not it") for f in data.DOWNLOADS["mnist"]["files"]],
     ["--model", "vae", "--data", "mnist", "--data-dir", "{d}"], "sha256"),
    (None, ["--model", "diffusion", "--data", "ring8"], "points data"),
    (None, ["--model", "gan", "--data", "grid25", "--d-steps", "0"], "d_steps"),
    (None, ["--model", "vae", "--data", "ring8", "--max-iters", "-1"], "must not be negative"),
    (None, ["--model", "vae", "--data", "ring8", "--ema", "1.5"], "--ema 1.5"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, make, argv, says, capsys, monkeypatch):
    if make:
        make(tmp_path)
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    extra = [] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "o")]
    extra += [] if "--data-dir" in argv else ["--data-dir", str(tmp_path / "dd")]
    extra += [] if "--max-iters" in argv else ["--max-iters", "1"]
    code, err = train_cli(argv + extra, capsys, monkeypatch)
    assert code == 2, err
    assert says in one_error_line(err)


def test_diffusion_image_size_the_unet_cannot_halve_is_refused(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "odd.npy", np.zeros((8, 18, 18), np.uint8))
    code, err = train_cli(["--model", "diffusion", "--data", str(tmp_path / "odd.npy"), "--mults", "1,2,2",
                           "--max-iters", "1", "--out-dir", str(tmp_path / "o"), "--data-dir", str(tmp_path / "dd")],
                          capsys, monkeypatch)
    assert code == 2 and "divisible" in one_error_line(err)


# ---- fuzzing ---------------------------------------------------------------------------

def mutants(seed_bytes, n, rng):
    """Damaged versions of a valid file: truncated, bytes flipped, spans spliced in or
    cut out, random headers, pure noise."""
    yield b""
    for _ in range(n):
        b = bytearray(seed_bytes)
        op = rng.randrange(5)
        if op == 0 and b:
            b = b[:rng.randrange(len(b))]
        elif op == 1:
            for _ in range(rng.randint(1, 8)):
                if b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif op == 3 and b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 256)]
        elif op == 4:
            b = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 2048)))
        yield bytes(b)


class Hang(BaseException):  # not an Exception: a reader's `except Exception` must not swallow it
    pass


@pytest.fixture
def no_hang():
    """Each fuzzed call must end within seconds: a hang fails the test instead of CI."""
    def alarm(signum, frame):
        raise Hang("a reader hung on a fuzzed input")
    old = signal.signal(signal.SIGALRM, alarm)
    yield lambda s: signal.alarm(s)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def fuzz(read, seed_bytes, n, allowed, no_hang, seed=0):
    """read(bytes) must return or raise one of `allowed`: never another exception, a
    crash or a hang."""
    rng, outcomes = random.Random(seed), {"ok": 0, "refused": 0}
    for blob in mutants(seed_bytes, n, rng):
        no_hang(20)
        try:
            read(blob)
            outcomes["ok"] += 1
        except allowed:
            outcomes["refused"] += 1
        finally:
            no_hang(0)
    assert outcomes["refused"] > 0  # the damage was noticed at least sometimes
    return outcomes


def test_fuzz_idx_and_cifar_readers(no_hang):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    idx = b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes()
    assert np.array_equal(data.read_idx(idx), images)
    fuzz(data.read_idx, idx, 300, cli.UsageError, no_hang)
    rec = np.random.default_rng(1).integers(0, 256, (2, 3073), dtype=np.uint8)
    rec[:, 0] = [3, 7]
    fuzz(data.read_cifar_bin, rec.tobytes(), 300, cli.UsageError, no_hang)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy's header parser on fuzzed escapes
def test_fuzz_npy_reader(tmp_path, no_hang):
    import io
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8))
    path = tmp_path / "f.npy"

    def read(blob):
        path.write_bytes(blob)
        data.npy_arrays(str(path))
    out = fuzz(read, buf.getvalue(), 300, cli.UsageError, no_hang)
    assert out["ok"] > 0  # some flips land in the pixels and leave a valid file


def test_fuzz_text_reader(tmp_path, no_hang):
    text = ("def f(x):\n    return x + 1\n" * 40).encode()
    path, n = tmp_path / "t.txt", [0]

    def read(blob):
        n[0] += 1
        path.write_bytes(blob)
        splits = data.load(str(path), data_dir=str(tmp_path / f"d{n[0]}"), block_size=8)
        assert splits["train"].info.vocab_size == 256
    out = fuzz(read, text, 150, cli.UsageError, no_hang)
    assert out["ok"] > 0


def test_fuzz_checkpoint_loader(gan_ckpt, tmp_path, no_hang):
    blob = open(os.path.join(gan_ckpt, "ckpt.pt"), "rb").read()
    path = str(tmp_path / "fuzzed.pt")

    def read(b):
        open(path, "wb").write(b)
        ck = checkpoint.load_checkpoint(path)
        checkpoint.build_from_checkpoint(ck)
    fuzz(read, blob, 150, cli.UsageError, no_hang)
