"""train.py and sample.py end to end, on a tiny GPT and a small text file made here."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from tolerances import assert_displacements_agree, assert_losses_agree, weights_at_start

import cli
import contract
import devices
import optim
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--eval-iters", "1", "--log-interval", "1", "--sample-tokens", "8", "--dtype", "fp32"]
# The longest chain of reductions in TINY's loss and gradients, for a global batch of 8
# sequences: the 8 x 32 tokens a weight's gradient sums over, the 256-symbol softmax,
# the MLP's 128 and the embedding's 32 inputs, attention over 32 positions.
TINY_REDUCTION = 8 * 32 + 256 + 128 + 32 + 32


@pytest.fixture
def corpus(tmp_path):
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "None", "(", ")", ":"]
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (20000,), generator=g).tolist())
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


def args(tmp_path, corpus, out, *extra):
    return ["--data", corpus, "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / out), *TINY, *extra]


def losses(tmp_path, out):
    recs = [json.loads(l) for l in open(tmp_path / out / "log.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def params(tmp_path, out):
    return torch.load(tmp_path / out / "ckpt.pt", weights_only=True)["model"]


def error_lines(stderr):
    """What the user sees of a failure: no traceback, one 'error:' line (progress lines aside)."""
    assert "Traceback" not in stderr, stderr
    return [l for l in stderr.strip().splitlines() if not l.startswith("data: ")]


def shell(*argv, script="train.py", **kw):
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.summation_order
@pytest.mark.parametrize("optimizer", [["--optimizer", "adamw"], ["--optimizer", "sgd", "--grad-clip", "0"]],
                         ids=["adamw", "sgd"])
def test_micro_batches_equal_one_big_batch(tmp_path, corpus, optimizer):
    # AdamW (clipped, as trained) for the losses; SGD unclipped too, whose update is linear
    # in the gradient, so a gradient off by any factor (AdamW and the clip hide a scale)
    # moves the weights by that factor.
    same = ["--max-iters", "4", "--eval-interval", "4", "--warmup-iters", "2", *optimizer]
    assert train.main(args(tmp_path, corpus, "big", *same, "--batch-size", "8")) == 0
    assert train.main(args(tmp_path, corpus, "acc", *same, "--batch-size", "2", "--grad-accum", "4")) == 0
    a, b = losses(tmp_path, "big"), losses(tmp_path, "acc")
    assert sorted(a) == [1, 2, 3, 4]
    # equal in exact arithmetic; fp32 sums the batch in another order (tolerances.py)
    assert_losses_agree(a, b, TINY_REDUCTION)
    ck = torch.load(tmp_path / "big" / "ckpt.pt", weights_only=True)
    assert_displacements_agree(ck["model"], params(tmp_path, "acc"), weights_at_start(ck), TINY_REDUCTION,
                               terms=8 * 32, steps=4, adam=optimizer[1] == "adamw")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, corpus, optimizer):
    # dropout on, so the noise must continue exactly too (it is seeded by step, not restored)
    same = ["--eval-interval", "3", "--lr-decay-iters", "8", "--dropout", "0.1", "--batch-size", "4",
            "--optimizer", optimizer]
    assert train.main(args(tmp_path, corpus, "whole", *same, "--max-iters", "8")) == 0
    assert train.main(args(tmp_path, corpus, "parts", *same, "--max-iters", "5")) == 0
    assert train.main(args(tmp_path, corpus, "parts", *same, "--max-iters", "8", "--resume")) == 0
    a, b = losses(tmp_path, "whole"), losses(tmp_path, "parts")
    assert sorted(b) == list(range(1, 9))
    assert a == b  # bit for bit
    pa, pb = params(tmp_path, "whole"), params(tmp_path, "parts")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ck = torch.load(tmp_path / "parts" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 8 and "module." not in "".join(ck["model"])
    assert os.path.exists(tmp_path / "parts" / "best.pt")


@pytest.mark.summation_order
@pytest.mark.parametrize("optimizer", [["--optimizer", "adamw"], ["--optimizer", "sgd", "--grad-clip", "0"]],
                         ids=["adamw", "sgd"])
def test_two_processes_equal_one_process_with_accumulation(tmp_path, corpus, optimizer):
    # AdamW as trained; SGD unclipped too, as in the test above
    same = ["--max-iters", "3", "--eval-interval", "3", "--batch-size", "4", *optimizer]
    assert train.main(args(tmp_path, corpus, "one", *same, "--grad-accum", "2")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *args(tmp_path, corpus, "two", *same)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout
    a, b = losses(tmp_path, "one"), losses(tmp_path, "two")
    assert sorted(b) == [1, 2, 3]
    # equal in exact arithmetic: global batch 8 either way, summed in another order
    assert_losses_agree(a, b, TINY_REDUCTION)
    ck = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert_displacements_agree(ck["model"], params(tmp_path, "two"), weights_at_start(ck), TINY_REDUCTION,
                               terms=8 * 32, steps=3, adam=optimizer[1] == "adamw")
    # evaluation, too, sees the same batches whatever the process count: a mean over one
    # global batch of 8 x 32 tokens (--eval-iters 1), its forward as in training
    evals = lambda out: {r["step"]: r["val_loss"] for r in map(json.loads, open(tmp_path / out / "log.jsonl"))
                         if "val_loss" in r}
    assert evals("one") and evals("one").keys() == evals("two").keys()
    assert_losses_agree(evals("one"), evals("two"), TINY_REDUCTION)



def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.summation_order
def test_two_nodes_equal_one_process_with_accumulation(tmp_path, corpus):
    """Two torchrun launches of one process each, --nnodes 2 with the c10d rendezvous on
    loopback, as two machines would run (README: several machines): the same run as one
    process with --grad-accum 2, up to the order of summation."""
    same = ["--max-iters", "3", "--eval-interval", "3", "--batch-size", "4", "--optimizer", "sgd", "--grad-clip", "0"]
    assert train.main(args(tmp_path, corpus, "one", *same, "--grad-accum", "2")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "nanogen-test", "train.py", *args(tmp_path, corpus, "nodes", *same)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outs]
    assert any("2 process(es)" in out for out, _ in outs)
    a, b = losses(tmp_path, "one"), losses(tmp_path, "nodes")
    assert sorted(b) == [1, 2, 3]
    assert_losses_agree(a, b, TINY_REDUCTION)  # global batch 8 either way, summed in another order
    ck = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert_displacements_agree(ck["model"], params(tmp_path, "nodes"), weights_at_start(ck), TINY_REDUCTION,
                               terms=8 * 32, steps=3, adam=False)

def test_bf16_path_trains(tmp_path, corpus):
    assert train.main(args(tmp_path, corpus, "bf", "--dtype", "bf16", "--max-iters", "30", "--eval-interval", "30",
                           "--batch-size", "8", "--lr", "3e-3", "--warmup-iters", "5")) == 0
    log = losses(tmp_path, "bf")
    assert log[30] < log[1] - 0.5, log


def test_dtype_auto_takes_the_faster_and_a_resumed_run_keeps_it(tmp_path, corpus, monkeypatch):
    """On a CPU with bf16 units --dtype auto races fp32 against bf16 on the model and keeps
    the faster; the checkpoint records the choice and a resumed run keeps it, whatever a
    new race would say. (The race's timings are stubbed: which dtype is faster is this
    machine's business, bench.py's to show.)"""
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    flags = [*args(tmp_path, corpus, "auto", "--max-iters", "2", "--eval-interval", "2")]
    flags[flags.index("--dtype") + 1] = "auto"
    seen = []
    monkeypatch.setattr(devices, "race_dtypes", lambda *a: seen.append(a) or {"fp32": 2.0, "bf16": 1.0})
    assert train.main(flags) == 0 and len(seen) == 1
    assert torch.load(tmp_path / "auto" / "ckpt.pt", weights_only=True)["config"]["dtype"] == "bf16"
    monkeypatch.setattr(devices, "race_dtypes", lambda *a: seen.append(a) or {"fp32": 1.0, "bf16": 2.0})
    assert train.main([*flags, "--max-iters", "3", "--resume"]) == 0 and len(seen) == 1  # no new race
    assert torch.load(tmp_path / "auto" / "ckpt.pt", weights_only=True)["config"]["dtype"] == "bf16"
    assert train.main([*flags, "--out-dir", str(tmp_path / "auto2")]) == 0 and len(seen) == 2  # a new run races
    assert torch.load(tmp_path / "auto2" / "ckpt.pt", weights_only=True)["config"]["dtype"] == "fp32"
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)  # emulated bf16 here: fp32, no race
    assert train.main([*flags, "--out-dir", str(tmp_path / "avx2")]) == 0 and len(seen) == 2
    assert torch.load(tmp_path / "avx2" / "ckpt.pt", weights_only=True)["config"]["dtype"] == "fp32"
    # and a bf16 run resumed where bf16 is emulated chooses again rather than crawl
    assert train.main([*flags, "--max-iters", "4", "--resume"]) == 0
    assert torch.load(tmp_path / "auto" / "ckpt.pt", weights_only=True)["config"]["dtype"] == "fp32"


def test_every_process_takes_rank_0s_dtype(monkeypatch):
    """Under DDP only rank 0 races; every rank, whatever its own CPU, takes part in the
    broadcast of rank 0's answer and trains in it (no rank waits on a collective that
    another skips)."""
    raced, sent = [], []
    monkeypatch.setattr(devices, "race_dtypes", lambda *a: raced.append(1) or {"fp32": 2.0, "bf16": 1.0})

    def broadcast(t, src):  # what rank 0 sends: bf16
        assert src == 0
        sent.append(int(t))
        t.fill_(1)
    monkeypatch.setattr(devices.dist, "broadcast", broadcast)
    cpu, tcfg = torch.device("cpu"), train.TrainConfig(dtype="auto")
    for rank, bf16_here in ((0, True), (1, True), (1, False)):
        monkeypatch.setattr(devices, "cpu_has_bf16", lambda: bf16_here)
        got, _ = devices.run_dtype(tcfg, None, None, None, None, cpu, rank, True, lambda *a: None)
        assert got == torch.bfloat16
    assert raced == [1] and sent == [1, 1, 0]  # rank 0 raced; each rank's own guess was overridden


def test_a_run_that_raced_equals_one_that_did_not(tmp_path, corpus, monkeypatch):
    """The real race runs (its answer set to fp32), then the run: the log and weights are
    bit for bit those of a --dtype fp32 run, so racing changed nothing but the choice."""
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    real, ran = devices.race_dtypes, []
    monkeypatch.setattr(devices, "race_dtypes", lambda *a: ran.append(real(*a)) or {"fp32": 1.0, "bf16": 2.0})
    flags = args(tmp_path, corpus, "raced", "--max-iters", "3", "--eval-interval", "3", "--dropout", "0.1")
    flags[flags.index("--dtype") + 1] = "auto"
    assert train.main(flags) == 0 and len(ran) == 1
    assert train.main(args(tmp_path, corpus, "plain", "--max-iters", "3", "--eval-interval", "3",
                           "--dropout", "0.1")) == 0
    assert losses(tmp_path, "raced") == losses(tmp_path, "plain")
    pa, pb = params(tmp_path, "raced"), params(tmp_path, "plain")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_the_dtype_race_leaves_the_run_untouched(corpus, tmp_path):
    """race_dtypes times a copy: the model's weights and gradients, the global RNG and the
    training data stream are as they were, so a run that raced equals one that did not."""
    import data
    import gpt
    torch.manual_seed(0)
    model = gpt.Model(gpt.Config(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=256, dropout=0.1))
    split = data.load(corpus, data_dir=str(tmp_path / "data"), block_size=32)["train"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    took = devices.race_dtypes(model, contract.hooks(model), split, 4, torch.device("cpu"), seed=1)
    assert took.keys() == {"fp32", "bf16"} and all(0 < t < float("inf") for t in took.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_sigterm_saves_and_resume_continues(tmp_path, corpus):
    a = args(tmp_path, corpus, "sig", "--max-iters", "100000", "--eval-interval", "100000", "--batch-size", "4")
    p = subprocess.Popen([sys.executable, "train.py", *a], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(tmp_path / "sig" / "log.jsonl")
                                          and len(losses(tmp_path, "sig")) >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in out
    ck = torch.load(tmp_path / "sig" / "ckpt.pt", weights_only=True)
    assert ck["step"] >= 3
    assert train.main([*a, "--resume", "--max-iters", str(ck["step"] + 2)]) == 0
    assert max(losses(tmp_path, "sig")) == ck["step"] + 2


def test_nonfinite_loss_stops_with_the_step_named(tmp_path, corpus):
    fork = tmp_path / "nangpt.py"
    fork.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom gpt import *\nimport gpt\n\n"
        "class Model(gpt.Model):\n"
        "    calls = 0\n"
        "    def forward(self, x, y=None, player='model'):\n"
        "        loss, logs = super().forward(x, y)\n"
        "        if self.training:\n"
        "            Model.calls += 1\n"
        "            if Model.calls > 6:\n"
        "                loss = loss * float('nan')\n"
        "        return loss, logs\n" % ROOT)
    r = shell("--model", str(fork), *args(tmp_path, corpus, "nan", "--max-iters", "20", "--eval-interval", "5",
                                          "--log-interval", "3"))
    assert r.returncode == 2
    assert len(error_lines(r.stderr)) == 1
    assert "not finite at step 6" in r.stderr
    ck = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.parametrize("argv, says", [
    (["--n-layr", "3"], "unrecognized arguments: --n-layr"),
    (["--lr", "abc"], "--lr: invalid value 'abc'"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--preset", "huge"], "--preset huge: unknown"),
    (["--model", "nosuchmodel"], "not a model of this project"),
    (["--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--dtype", "fp8"], "--dtype fp8"),
    (["--model", "diffusion", "--data", "grid25"], "points data, which --model diffusion does not take"),
    (["--model", "vae", "--data", "ring8", "--z-dim", "0"], "z_dim"),
    (["--model", "gan", "--data", "grid25", "--loss", "wgan"], "loss must be ns or hinge"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, argv, says, capsys, monkeypatch):
    # train.py's command line in this process: no interpreter start per case (the real
    # entry point, through a subprocess, is exercised by the tests below)
    monkeypatch.setattr(sys, "argv", ["train.py", *argv, "--out-dir", str(tmp_path / "o"),
                                      "--data-dir", str(tmp_path / "d"), "--max-iters", "1"])
    with pytest.raises(SystemExit) as e:
        cli.cli(train.main)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert says in lines[0]


def test_truncated_checkpoint_gets_one_line(tmp_path, corpus):
    assert train.main(args(tmp_path, corpus, "ok", "--max-iters", "2", "--eval-interval", "2")) == 0
    path = tmp_path / "ok" / "ckpt.pt"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    for r in (shell("--ckpt", str(path), script="sample.py"),
              shell(*args(tmp_path, corpus, "ok", "--resume"))):
        assert r.returncode == 2
        assert len(error_lines(r.stderr)) == 1, r.stderr
        assert str(path) in r.stderr and "not a readable" in r.stderr


def test_sample_prints_text_and_refuses_a_long_prompt(tmp_path, corpus):
    assert train.main(args(tmp_path, corpus, "s", "--max-iters", "2", "--eval-interval", "2")) == 0
    ck = str(tmp_path / "s" / "ckpt.pt")
    r = shell("--ckpt", ck, "--prompt", "def ", "--max-new-tokens", "20", "--top-k", "5", "--top-p", "0.9",
            script="sample.py")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ") and len(r.stdout) >= 20
    r = shell("--ckpt", ck, "--prompt", "x" * 33, script="sample.py")
    assert r.returncode == 2 and "longer than the model's context of 32" in r.stderr


def test_init_from_gpt2_weights(tmp_path, corpus):
    from test_gpt import fake_gpt2_state_dict
    torch.save(fake_gpt2_state_dict(vocab=300, ctx=32, n_embd=64), tmp_path / "pytorch_model.bin")
    # the weights set the shape: drop TINY's --n-layer/--n-head/--n-embd/--block-size
    args = lambda tmp_path, corpus, out, *extra: ["--data", corpus, "--data-dir", str(tmp_path / "data"),
                                                  "--out-dir", str(tmp_path / out), *TINY[8:], *extra]
    a = args(tmp_path, corpus, "ft", "--max-iters", "2", "--eval-interval", "2",
             "--init-from", str(tmp_path / "pytorch_model.bin"))
    assert train.main(a) == 0
    ck = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ck["config"]["model_config"]["vocab_size"] == 300
    assert ck["config"]["model_config"]["n_embd"] == 64
    assert ck["model"]["wpe.weight"].shape == (32, 64)
    # a shorter --block-size crops GPT-2's positions; resume keeps it
    assert train.main([*args(tmp_path, corpus, "crop", "--max-iters", "2", "--eval-interval", "2",
                             "--init-from", str(tmp_path / "pytorch_model.bin")), "--block-size", "16"]) == 0
    assert train.main([*args(tmp_path, corpus, "crop", "--max-iters", "3", "--eval-interval", "2",
                             "--init-from", str(tmp_path / "pytorch_model.bin")), "--block-size", "16", "--resume"]) == 0
    ck = torch.load(tmp_path / "crop" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3 and ck["model"]["wpe.weight"].shape == (16, 64)
    torch.save(fake_gpt2_state_dict(vocab=100, ctx=32), tmp_path / "small.bin")
    r = shell(*args(tmp_path, corpus, "ft2", "--init-from", str(tmp_path / "small.bin")))
    assert r.returncode == 2 and "--tokenizer gpt2" in r.stderr
    r = shell(*args(tmp_path, corpus, "ft3", "--init-from", str(tmp_path / "pytorch_model.bin"), "--n-layer", "5"))
    assert r.returncode == 2 and "--n-layer 5: the GPT-2 weights have 2" in r.stderr


def test_help_names_every_flag():
    r = shell("--help")
    assert r.returncode == 0
    for flag in ["--batch-size", "--grad-accum", "--max-time", "--dtype", "--compile", "--resume",
                 "--init-from", "--n-layer", "--n-embd", "--block-size", "--tokenizer", "--preset"]:
        assert flag in r.stdout
    assert "presets: tiny, small, gpt2" in r.stdout


def test_readme_quickstart_runs_a_few_steps(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    cmd = re.search(r"^(?:.*&& )?(python train\.py[^\n]*)$", readme, flags=re.M).group(1)
    extra = ["--max-iters", "2", "--eval-iters", "1", "--sample-tokens", "10", "--batch-size", "4",
             "--out-dir", str(tmp_path / "q"), "--data-dir", str(tmp_path / "d")]
    r = shell(*cmd.split()[2:], *extra)
    assert r.returncode == 0, r.stderr
    assert "val" in r.stdout and os.path.exists(tmp_path / "q" / "ckpt.pt")


def test_compile_check_answers_without_compiling():
    """--compile first asks compile_unavailable why it cannot run (None: it can). The
    answer must come back, never an exception (a stray local import once made it raise
    UnboundLocalError, so every --compile run crashed); compiling itself stays out of the
    default tests (~20 s on CPU): bench.py --compare eager,compile runs it."""
    why = devices.compile_unavailable(torch.device("cpu"))
    assert why is None or isinstance(why, str) and why
    assert devices.compile_unavailable(torch.device("cpu")) == why


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    """--optimizer muon: which tensors each optimizer steps, against lists written out here."""
    import diffusion
    import gpt
    tcfg = train.TrainConfig(optimizer="muon")
    m = gpt.Model(gpt.Config(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40))
    (muon, adamw), = [o.parts for o in optim.make_optimizers(m, contract.hooks(m), tcfg).values()]
    names = {id(p): n for n, p in m.named_parameters()}
    hidden = {f"h.{i}.{w}.weight" for i in range(2) for w in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {names[id(p)] for g in muon.param_groups for p in g["params"]} == hidden
    rest = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert rest == set(names.values()) - hidden and "wte.weight" in rest  # the embedding, tied to the head
    # a conditional U-Net: every conv and linear kernel but the first and last conv and the
    # label embedding; conv kernels are stepped by Muon as matrices (flatten)
    m = diffusion.Model(diffusion.Config(image_size=8, base=8, mults=(1, 2), attn_res=(4,), num_classes=3))
    (muon, adamw), = [o.parts for o in optim.make_optimizers(m, contract.hooks(m), tcfg).values()]
    names = {id(p): n for n, p in m.named_parameters()}
    got = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert got == {n for n, p in m.named_parameters() if p.dim() >= 2} - {
        "net.inp.weight", "net.out.2.weight", "net.label.weight"}
    assert muon.flatten and any(p.dim() == 4 for p in muon.param_groups[0]["params"])
    # the VAE: its conv and linear kernels but the first and last, and not the mixture
    # prior's means and log-variances, a density's parameters (no weight decay either)
    import vae
    m = vae.Model(vae.Config(image_size=8, prior_components=4))
    (muon, adamw), = [o.parts for o in optim.make_optimizers(m, contract.hooks(m), tcfg).values()]
    names = {id(p): n for n, p in m.named_parameters()}
    got = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert got == {n for n, p in m.named_parameters() if p.dim() >= 2} - {
        "encoder.0.weight", "decoder.9.weight", "prior_means", "prior_logvars"}


def test_muon_step_is_torch_muon_and_adamw():
    """The optimizer train.py builds for --optimizer muon steps a GPT as torch.optim.Muon
    (matrices, match_rms_adamw, the run's lr, weight decay and momentum) and torch.optim.AdamW
    (the rest, decay on the embedding only) would: the same operations, bit for bit."""
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon (since 2.9)")
    import copy

    import gpt
    tcfg = train.TrainConfig(optimizer="muon", lr=0.01, weight_decay=0.1, muon_momentum=0.9, beta1=0.8, beta2=0.9)
    torch.manual_seed(0)
    a = gpt.Model(gpt.Config(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40))
    b = copy.deepcopy(a)
    ours, = optim.make_optimizers(a, contract.hooks(a), tcfg).values()
    matrices = [p for n, p in b.named_parameters() if n.startswith("h.") and p.dim() == 2]
    others = [p for p in b.parameters() if all(p is not q for q in matrices)]
    theirs = [torch.optim.Muon(matrices, lr=0.01, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw"),
              torch.optim.AdamW([{"params": [p for p in others if p.dim() >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}],
                                lr=0.01, betas=(0.8, 0.9))]
    x = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    for step in range(10):
        for model in (a, b):
            model.zero_grad()
            model(x[:, :-1], x[:, 1:])[0].backward()
        ours.step()
        for opt in theirs:
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), step
