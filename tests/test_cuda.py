"""The CUDA path: training on a GPU against the CPU, bf16, fp16 with its GradScaler,
torch.compile, nccl, sampling, the FID network and checkpoints across devices.

    python -m pytest -q tests -m cuda        # on a machine with CUDA; skipped elsewhere

tools/gpu_check.sh runs these first on a GPU machine."""
import json
import os
import subprocess
import sys

import pytest
import torch
from tolerances import assert_losses_agree

import gpt
import metrics
import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--max-iters", "3", "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1",
         "--warmup-iters", "0", "--sample-images", "4", "--sample-tokens", "8", "--batch-size", "8"]
# Small configurations of every model. The longest chain of reductions in each loss (the
# n of tolerances.reduction_error), over 8 examples a step: GPT's mean over 8 x 32 tokens
# plus its 256-way softmax and 64-wide dot products; the image models' mean over 8 x 784
# pixels plus their widest convolution (9 x 48 inputs) or linear layer, taken as 784.
MODELS = {
    "gpt": (["--model", "gpt", "--preset", "tiny", "--block-size", "32", "--n-layer", "2", "--n-head", "2",
             "--n-embd", "64"], 8 * 32 + 256 + 64),
    "diffusion": (["--model", "diffusion", "--preset", "tiny", "--base", "8", "--mults", "1,2", "--attn-res", "14",
                   "--timesteps", "50", "--sample-steps", "5"], 8 * 784 + 9 * 48 + 784),
    "vae": (["--model", "vae", "--preset", "tiny"], 8 * 784 + 9 * 48 + 784),
    "gan": (["--model", "gan", "--preset", "tiny"], 8 * 784 + 9 * 48 + 784),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400)))
    return str(path)


def flags(name, corpus, data_dir):
    return [*MODELS[name][0], *(["--data", corpus] if name == "gpt" else []), "--data-dir", data_dir, *STEPS]


def run(argv, out):
    assert train.main([*argv, "--out-dir", str(out), "--overwrite"]) == 0
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return log, torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)


def losses(log):
    keys = {k for rec in log for k in rec if k == "loss" or k.startswith("loss_")}
    return {k: {rec["step"]: rec[k] for rec in log if k in rec} for k in keys}


@pytest.fixture
def noise_on_the_cpu(monkeypatch):
    """The noise a model draws in training (diffusion's t and epsilon, the VAE's
    reparameterisation, the GAN's z) drawn by the CPU's generator and moved to the device,
    so that a CUDA run sees the noise a CPU run sees (the CUDA generator draws other
    numbers from the same seed). Samplers pass their own generators: left alone."""
    def on_cpu(fn):
        def draw(*args, device=None, generator=None, **kw):
            if generator is not None:
                return fn(*args, device=device, generator=generator, **kw)
            return fn(*args, **kw).to(device) if device is not None else fn(*args, **kw)
        return draw

    def like_on_cpu(fn):
        return lambda x, **kw: fn(x.cpu(), **kw).to(x.device)
    for name in ("randn", "rand", "randint"):
        monkeypatch.setattr(torch, name, on_cpu(getattr(torch, name)))
    for name in ("randn_like", "rand_like"):
        monkeypatch.setattr(torch, name, like_on_cpu(getattr(torch, name)))


@pytest.fixture
def exact_fp32():
    """fp32 as the CPU computes it: no TF32 (10-bit mantissas in matmuls and convolutions),
    and no cuDNN, whose Winograd and FFT convolutions round more than a sum of products."""
    settings = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
                (torch.backends.cudnn, "enabled")]
    before = [getattr(obj, name) for obj, name in settings]
    for obj, name in settings:
        setattr(obj, name, False)
    yield
    for (obj, name), value in zip(settings, before):
        setattr(obj, name, value)


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_steps_on_cuda_equal_the_cpu(name, corpus, shared_data, tmp_path, noise_on_the_cpu, exact_fp32):
    # SGD without clipping: a gradient off by any factor moves the weights by that factor
    argv = [*flags(name, corpus, shared_data), "--dtype", "fp32", "--optimizer", "sgd", "--grad-clip", "0"]
    cpu, _ = run([*argv, "--device", "cpu"], tmp_path / "cpu")
    gpu, _ = run([*argv, "--device", "cuda"], tmp_path / "cuda")
    a, b = losses(cpu), losses(gpu)
    assert sorted(a) == sorted(b) and a
    for key in a:  # equal in exact arithmetic, summed in another order
        assert_losses_agree(a[key], b[key], MODELS[name][1], f"{name} {key}")


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_trains_on_cuda(name, corpus, shared_data, tmp_path):
    log, ckpt = run([*flags(name, corpus, shared_data), "--dtype", "bf16", "--device", "cuda"], tmp_path / "bf16")
    assert ckpt["config"]["dtype"] == "bf16"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(v == v and abs(v) < 1e4 for k in losses(log).values() for v in k.values())


class BlowUp(torch.autograd.Function):
    """Identity forward; an infinite gradient backward: an fp16 overflow, injected."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_fp16_grad_scaler_skips_an_injected_non_finite_step(corpus, shared_data, tmp_path, monkeypatch):
    calls, forward = [], gpt.Model.forward

    def poisoned(self, x, y=None, **kw):
        loss, parts = forward(self, x, y, **kw)
        if self.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2:  # the second training step's backward overflows
                loss = BlowUp.apply(loss)
        return loss, parts
    monkeypatch.setattr(gpt.Model, "forward", poisoned)
    log, ckpt = run([*flags("gpt", corpus, shared_data), "--dtype", "fp16", "--device", "cuda"], tmp_path / "fp16")
    # the scaler starts at 2^16 and grows only after 2,000 clean steps: one skip halves it
    assert ckpt["scaler"]["scale"] == 2.0 ** 15
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_on_cuda_gives_the_eager_losses(name, corpus, shared_data, tmp_path, noise_on_the_cpu, exact_fp32):
    argv = [*flags(name, corpus, shared_data), "--dtype", "fp32", "--device", "cuda", "--optimizer", "sgd",
            "--grad-clip", "0"]
    eager, _ = run(argv, tmp_path / "eager")
    compiled, _ = run([*argv, "--compile"], tmp_path / "compiled")
    a, b = losses(eager), losses(compiled)
    for key in a:  # fused kernels sum in another order (and may use cuDNN's convolutions: 4x the bound)
        assert_losses_agree(a[key], b[key], 4 * MODELS[name][1], f"{name} {key}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name", ["gpt", "diffusion"])
def test_two_gpus_with_nccl_equal_one_with_accumulation(name, corpus, shared_data, tmp_path):
    argv = [*flags(name, corpus, shared_data), "--dtype", "fp32", "--optimizer", "sgd", "--grad-clip", "0",
            "--batch-size", "4"]
    one, _ = run([*argv, "--grad-accum", "2", "--device", "cuda"], tmp_path / "one")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *argv, "--out-dir", str(tmp_path / "two")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "UserWarning" not in r.stderr, r.stderr[-2000:]
    two = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    a, b = losses(one), losses(two)
    for key in a:  # the same global batch and noise, summed over 2 devices
        assert_losses_agree(a[key], b[key], MODELS[name][1], f"{name} {key}")


def test_sampling_runs_on_cuda(corpus, shared_data, tmp_path):
    import diffusion
    import gan
    import vae
    torch.manual_seed(0)
    model = gpt.Model(gpt.Config(vocab_size=256, n_layer=2, n_head=2, n_embd=64, block_size=32)).cuda().eval()
    start = torch.zeros(2, 1, dtype=torch.long, device="cuda")
    cached = model.generate(start, 40, temperature=0)  # past the context: the window slides
    assert torch.equal(cached, model.generate(start, 40, temperature=0, use_cache=False))
    for module, kw in ((diffusion, dict(steps=5)), (vae, {}), (gan, {})):
        cfg = module.Config(**({"timesteps": 50} if module is diffusion else {}))
        m = module.Model(cfg).cuda().eval()
        with torch.no_grad():
            x = m.sample(4, **kw)
        assert x.device.type == "cuda" and torch.isfinite(x).all() and x.shape[0] == 4


def test_fid_network_on_cuda_equals_the_cpu():
    torch.manual_seed(0)
    net = metrics.InceptionV3().eval()  # random weights: no download needed
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        a = net(x.float().div(127.5).sub(1))
        cuda_net = net.cuda()
        b = cuda_net(x.float().div(127.5).sub(1).cuda())
    a, b = (t[0] if isinstance(t, tuple) else t for t in (a, b))
    # pool3 sums ~48 layers deep; each conv's dot product is at most 3 x 3 x 2048 long
    bound = 48 * 3 * 3 * 2048 * 2 ** -24 * float(a.abs().max())
    assert float((a - b.cpu()).abs().max()) <= bound


def test_checkpoints_cross_devices(corpus, shared_data, tmp_path):
    argv = flags("gpt", corpus, shared_data)
    run([*argv, "--device", "cuda", "--max-iters", "2", "--eval-interval", "2"], tmp_path / "run")
    assert train.main([*argv, "--device", "cpu", "--max-iters", "3", "--resume", "--out-dir", str(tmp_path / "run")]) == 0
    assert train.main([*argv, "--device", "cuda", "--max-iters", "4", "--eval-interval", "4", "--resume",
                       "--out-dir", str(tmp_path / "run")]) == 0
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 4
