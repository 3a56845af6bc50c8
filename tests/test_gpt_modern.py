"""gpt.py's modern block (RoPE, RMSNorm, QK-norm, ReLU^2, no biases, an untied head,
grouped-query attention), each piece against its formula written out here in float64,
the KV cache against the full forward pass for every piece alone and all together, and
train.py training, resuming and refusing GPT-2 weights with it.

Tolerances follow from the arithmetic (tests/tolerances.py): a sum of n terms is off by
at most n u times the sum of the terms' magnitudes, u = 2^-53 in float64, 2^-24 in fp32;
RoPE's cos and sin tables are kept in fp32, so a rotation by them is off by U32 of the
rotated pair's magnitudes whatever the precision of the rest.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tolerances import U32, U64

import contract
import gpt
import optim
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODERN = dict(rope=True, norm="rmsnorm", norm_gain=False, qk_norm=True, activation="relu2", bias=False,
              tie_embeddings=False, n_kv_head=2)
# every piece alone, all together, and all together with a mixture of experts
OPTIONS = {**{k: {k: v} for k, v in MODERN.items()}, "rmsnorm+gain": dict(norm="rmsnorm", norm_gain=True),
           "all": MODERN, "all+moe": dict(MODERN, n_expert=4, expert_top_k=2)}


def config(**kw):
    return gpt.Config(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32), **kw})


def model(**kw):
    torch.manual_seed(0)
    return gpt.Model(config(**kw)).eval()


# ---- RoPE ---------------------------------------------------------------------------

def rotate_by_hand(x, positions, base=10000.0):
    """Su et al.'s rotation, written out: the pair (x_i, x_{i + d/2}) of each head's d
    features at position p, times the 2x2 rotation by p * base^(-2i/d), in float64."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    for t, p in enumerate(positions):
        for i in range(d // 2):
            a = p * base ** (-2 * i / d)
            R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
            pair = torch.stack([x[..., t, i], x[..., t, i + d // 2]], -1)  # [..., 2]
            out[..., t, i], out[..., t, i + d // 2] = (pair @ R.T).unbind(-1)
    return out


def pair_magnitudes(x):
    d = x.shape[-1] // 2
    s = x[..., :d].abs() + x[..., d:].abs()
    return torch.cat([s, s], -1)


def test_rope_rotates_each_pair_by_its_angle():
    m = model(rope=True)
    assert m.wpe is None and not any("wpe" in k or "rope" in k for k in m.state_dict())
    x = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    got = gpt.apply_rope(x, m.rope_cos.double(), m.rope_sin.double())
    want = rotate_by_hand(x, range(16))
    # each output is x_i cos - x_j sin (or x_i sin + x_j cos): cos and sin rounded to fp32
    # (U32 of at most 1 each), then 3 float64 roundings
    assert ((got - want).abs() <= (U32 + 4 * U64) * pair_magnitudes(x)).all()
    # a cached step at position 11 is rotated by position 11's angles
    got = gpt.apply_rope(x[..., 11:12, :], m.rope_cos[11:12].double(), m.rope_sin[11:12].double())
    assert ((got - want[..., 11:12, :]).abs() <= (U32 + 4 * U64) * pair_magnitudes(x[..., 11:12, :])).all()


def test_rope_scores_depend_only_on_the_relative_position():
    m = model(rope=True, block_size=64)
    cos, sin = m.rope_cos.double(), m.rope_sin.double()
    q, k = torch.randn(2, 8, dtype=torch.float64)

    def score(i, j):
        rq = gpt.apply_rope(q[None, None, None], cos[i:i + 1], sin[i:i + 1])
        rk = gpt.apply_rope(k[None, None, None], cos[j:j + 1], sin[j:j + 1])
        return (rq * rk).sum().item()

    # exact rotations preserve q . R(j - i) k; the fp32 tables move each rotated vector by
    # at most sqrt(2) U32 |x| (per pair U32 (|a| + |b|)), so a score by 2 sqrt(2) U32 |q||k|
    # (plus 8 float64 roundings), and two scores apart by twice that
    tol = 2 * (2 * math.sqrt(2) * U32 + 16 * U64) * (q.norm() * k.norm()).item()
    for i, j in ((5, 2), (9, 9), (3, 7), (20, 1)):
        for shift in (1, 13, 40):
            assert abs(score(i, j) - score(i + shift, j + shift)) <= tol, (i, j, shift)
    assert abs(score(5, 2) - score(5, 4)) > 1e3 * tol  # and the score does depend on i - j


# ---- attention: GQA, QK-norm, RoPE written out ---------------------------------------

def attention_by_hand(attn, x, rope_positions=None, n_kv_head=None, qk_norm=False):
    """softmax(Q K^T / sqrt(d)) V under a causal mask, each group of n_head / n_kv_head
    query heads reading its key/value head (repeat_interleave), in float64."""
    B, T, C = x.shape
    H, d = attn.n_head, C // attn.n_head
    G = n_kv_head or H
    qkv = x @ attn.c_attn.weight.T + (attn.c_attn.bias if attn.c_attn.bias is not None else 0)
    q = qkv[..., :C].reshape(B, T, H, d).transpose(1, 2)
    k = qkv[..., C:C + G * d].reshape(B, T, G, d).transpose(1, 2)
    v = qkv[..., C + G * d:].reshape(B, T, G, d).transpose(1, 2)
    if qk_norm:
        q = q / (q.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        k = k / (k.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    if rope_positions is not None:
        q, k = rotate_by_hand(q, rope_positions), rotate_by_hand(k, rope_positions)
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.c_proj.weight.T + (attn.c_proj.bias if attn.c_proj.bias is not None else 0)


def attention_rounding(want, C, T, d, rope):
    """Two float64 computations of attention apart: the chain of the projection (C
    terms), the norm (d), the scores (d), the softmax and its sum over T keys, the output
    projection (C), n u each, twice, of magnitudes taken as the output's; with RoPE, plus
    the fp32 tables' U32 of the scores (the queries and keys are O(1))."""
    n = 2 * C + 2 * d + 2 * T
    return 2 * n * U64 * max(1.0, float(want.abs().max())) + (8 * d * U32 if rope else 0)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("qk_norm,rope", [(False, False), (True, False), (False, True), (True, True)])
def test_attention_equals_attention_by_hand(n_kv_head, qk_norm, rope):
    torch.manual_seed(0)
    cfg = config(n_kv_head=n_kv_head, qk_norm=qk_norm, rope=rope)
    m = gpt.Model(cfg).double()
    attn = m.h[0].attn
    with torch.no_grad():
        attn.c_attn.bias.normal_(0, 0.1)
        x = torch.randn(2, 16, 32, dtype=torch.float64)
        r = (m.rope_cos.double(), m.rope_sin.double()) if rope else None
        got = attn(x, rope=r)
        want = attention_by_hand(attn, x, range(16) if rope else None, n_kv_head, qk_norm)
    assert attn.c_attn.weight.shape == (32 + 2 * n_kv_head * 8, 32)
    assert (got - want).abs().max() <= attention_rounding(want, 32, 16, 8, rope)


def test_gqa_with_n_head_kv_heads_is_multi_head_and_fewer_equal_copied_heads():
    torch.manual_seed(0)
    mha = gpt.CausalSelfAttention(config()).double().eval()
    full = gpt.CausalSelfAttention(config(n_kv_head=4)).double().eval()
    full.load_state_dict(mha.state_dict())  # the same shapes: n_kv_head == n_head is multi-head
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    assert torch.equal(full(x), mha(x))
    # n_kv_head 2: the multi-head attention whose key and value heads 2g and 2g + 1 are
    # copies of the grouped one's head g gives the same outputs
    gqa = gpt.CausalSelfAttention(config(n_kv_head=2)).double().eval()
    W, b = gqa.c_attn.weight.detach(), gqa.c_attn.bias.detach()
    rows = lambda t, base: torch.cat([t[base + 8 * (h // 2): base + 8 * (h // 2) + 8] for h in range(4)])
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([W[:32], rows(W, 32), rows(W, 48)]))
        mha.c_attn.bias.copy_(torch.cat([b[:32], rows(b, 32), rows(b, 48)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
        want = mha(x)
    # the same sums, in orders the two kernels may pick: attention_rounding's chain
    assert (gqa(x) - want).abs().max() <= attention_rounding(want, 32, 16, 8, False)


# ---- norms, MLP, head ---------------------------------------------------------------

@pytest.mark.parametrize("gain", [True, False])
def test_rmsnorm_is_its_formula(gain):
    m = model(norm="rmsnorm", norm_gain=gain).double()
    norms = [m.h[0].ln_1, m.h[0].ln_2, m.h[1].ln_1, m.ln_f]
    assert all(isinstance(n, gpt.RMSNorm) for n in norms)
    assert all((n.weight is not None) == gain for n in norms)
    norm = m.ln_f
    if gain:
        with torch.no_grad():
            norm.weight.normal_(1, 0.3)
    x = 3 * torch.randn(5, 7, 32, dtype=torch.float64) + 1
    w = norm.weight if gain else torch.ones(32, dtype=torch.float64)
    want = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 32 + 1e-5) * w
    # a mean of 32 squares, a square root, a division and the gain: (32 + 4) u of the result
    assert ((norm(x) - want).abs() <= (32 + 4) * U64 * want.abs()).all()


def test_relu_squared_mlp_is_its_formula():
    torch.manual_seed(0)
    mlp = gpt.MLP(config(activation="relu2")).double()
    with torch.no_grad():
        mlp.c_fc.bias.normal_(0, 0.1)
        mlp.c_proj.bias.normal_(0, 0.1)
        x = torch.randn(3, 5, 32, dtype=torch.float64)
        h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
        want = torch.where(h > 0, h * h, torch.zeros_like(h)) @ mlp.c_proj.weight.T + mlp.c_proj.bias
        got = mlp(x)
    # two matmuls of 32 and 128 terms, a square between: (32 + 128 + 2) u of terms ~ 1
    assert (got - want).abs().max() <= 2 * (32 + 128 + 2) * U64 * max(1.0, float(want.abs().max()))


def test_no_bias_anywhere_when_bias_is_off():
    m = model(bias=False, norm="rmsnorm")
    assert not any(name.endswith("bias") for name, _ in m.named_parameters())


def test_head_is_tied_by_default_and_untied_on_request_and_muon_leaves_it_to_adamw():
    tied, untied = model(), model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert {"lm_head.weight", "wte.weight"} <= set(untied.state_dict())
    for m in (tied, untied, model(**MODERN)):
        muon = optim.muon_matrices(m, contract.hooks(m))
        assert id(m.lm_head.weight) not in muon and id(m.wte.weight) not in muon
        assert id(m.h[0].attn.c_attn.weight) in muon and id(m.h[1].mlp.c_proj.weight) in muon


@pytest.mark.parametrize("kw", [dict(norm="batchnorm"), dict(norm=""), dict(activation="swish"),
                                dict(n_kv_head=3), dict(n_kv_head=-1), dict(n_kv_head=8),
                                dict(rope=True, n_embd=36, n_head=4)])  # head size 9 is odd
def test_bad_modern_settings_are_refused_in_one_line(kw):
    with pytest.raises(ValueError) as e:
        gpt.Model(config(**kw))
    assert "\n" not in str(e.value)


# ---- the KV cache, nll, bf16 --------------------------------------------------------

def logits_rounding(logits, cfg, T):
    """Two fp32 computations of the logits apart (the cache sums attention in another
    order): per layer the chain of two norms and the projections (C terms each), the
    QK-norm (d), the scores (d) and the softmax over T keys, the MLP's 4C and C; then the
    last norm and the head; n u each, twice, of magnitudes taken as the logits' (small nets
    at O(1) activations)."""
    C, d = cfg.n_embd, cfg.n_embd // cfg.n_head
    n = cfg.n_layer * (9 * C + 2 * d + 2 * T) + 2 * C
    return 2 * n * U32 * max(1.0, float(logits.abs().max()))


@pytest.mark.summation_order
@pytest.mark.parametrize("name", list(OPTIONS))
def test_cached_logits_and_tokens_equal_the_full_forward(name):
    m = model(**OPTIONS[name])
    assert m.new_cache(1, "cpu", torch.float32)[0]["k"].shape[1] == (m.cfg.n_kv_head or m.cfg.n_head)
    seq = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        full = m.logits(seq)
        caches = m.new_cache(2, "cpu", torch.float32)
        steps = [m.logits(seq[:, :5], caches)] + [m.logits(seq[:, t:t + 1], caches) for t in range(5, 16)]
    # each token's logits at its absolute position (RoPE's too) from the cache
    assert (torch.cat(steps, 1) - full).abs().max() <= logits_rounding(full, m.cfg, 16)
    # greedy tokens, past block_size so the window slides and the cache is rebuilt (equal
    # unless two logits tie within the rounding above: a chance of ~1e-6 per token)
    a = m.generate(seq[:, :5], 30, temperature=0.0, use_cache=True)
    b = m.generate(seq[:, :5], 30, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["all", "all+moe"])
def test_nll_loss_and_bf16_with_every_piece(name):
    m = model(**OPTIONS[name])
    x = torch.randint(0, 50, (3, 16))
    loss, _ = m(x)
    # the mean over 3 x 15 tokens against nll's: two orders of 45 terms
    assert m.nll(x).mean().item() == pytest.approx(loss.item(), rel=2 * 45 * U32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = m(x)
        out = m.generate(x[:, :4], 14, temperature=0.0)
    # bf16 (u = 2^-8) through the same chain as logits_rounding's, on logits of ~0.1:
    # an untrained model's loss moves by far less than 0.05 nats
    assert out.shape == (3, 18) and abs(low.item() - loss.item()) < 0.05


def test_gradients_reach_every_parameter():
    m = model(**MODERN).train()
    m(torch.randint(0, 50, (2, 16)))[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# ---- GPT-2 weights ------------------------------------------------------------------

def test_from_gpt2_refuses_a_modern_block_in_one_line_and_loads_the_classic_one():
    from test_gpt import fake_gpt2_state_dict
    sd = fake_gpt2_state_dict()
    for k, v in MODERN.items():
        with pytest.raises(ValueError, match="GPT-2's block") as e:
            gpt.Model.from_gpt2(sd, n_head=4, **{k: v})
        assert "\n" not in str(e.value)
    m = gpt.Model.from_gpt2(sd, n_head=4, **{k: getattr(gpt.Config(), k) for k in MODERN})
    assert m.lm_head.weight is m.wte.weight and m.wpe is not None  # the classic block


# ---- train.py -----------------------------------------------------------------------

FLAGS = ["--rope", "--norm", "rmsnorm", "--no-norm-gain", "--qk-norm", "--activation", "relu2", "--no-bias",
         "--no-tie-embeddings", "--n-kv-head", "1"]


def run_args(tmp_path, out, *extra):
    corpus = tmp_path / "c.txt"
    if not corpus.exists():
        corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    return ["--data", str(corpus), "--data-dir", str(tmp_path / "d"), "--out-dir", str(tmp_path / out),
            "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
            "--eval-iters", "1", "--log-interval", "1", "--sample-tokens", "8", "--dtype", "fp32", *extra]


def losses(tmp_path, out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / out / "log.jsonl")) if "loss" in r}


def test_train_py_trains_and_resumes_the_modern_block_exactly(tmp_path):
    same = [*FLAGS, "--optimizer", "muon", "--dropout", "0.1", "--eval-interval", "3", "--lr-decay-iters", "6"]
    assert train.main(run_args(tmp_path, "whole", *same, "--max-iters", "6")) == 0
    assert train.main(run_args(tmp_path, "parts", *same, "--max-iters", "4")) == 0
    assert train.main(run_args(tmp_path, "parts", *same, "--max-iters", "6", "--resume")) == 0
    a, b = losses(tmp_path, "whole"), losses(tmp_path, "parts")
    assert sorted(b) == list(range(1, 7)) and a == b  # bit for bit: the same arithmetic in the same order
    pa = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    pb = torch.load(tmp_path / "parts" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(pa["model"][k], pb["model"][k]) for k in pa["model"])
    assert "wpe.weight" not in pa["model"] and "lm_head.weight" in pa["model"]
    assert pa["config"]["model_config"]["n_kv_head"] == 1 and pa["config"]["model_config"]["rope"] is True
    assert all(math.isfinite(v) for v in a.values())


def test_tiny_modern_preset_is_tiny_with_every_piece_and_trains(tmp_path):
    tiny, modern = gpt.PRESETS["tiny"], gpt.PRESETS["tiny-modern"]
    assert {k: v for k, v in modern.items() if k not in MODERN} == tiny
    assert {k: modern[k] for k in MODERN} == MODERN
    run_args(tmp_path, "unused")  # writes the corpus
    args = ["--preset", "tiny-modern", "--data", str(tmp_path / "c.txt"), "--data-dir", str(tmp_path / "d"),
            "--out-dir", str(tmp_path / "preset"), "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
            "--batch-size", "4", "--sample-tokens", "8", "--dtype", "fp32"]
    assert train.main(args) == 0
    conf = torch.load(tmp_path / "preset" / "ckpt.pt", weights_only=True)["config"]["model_config"]
    assert {k: conf[k] for k in MODERN} == MODERN


def test_two_processes_train_the_modern_block(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *run_args(tmp_path, "two", *FLAGS, "--max-iters", "3", "--eval-interval", "3")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(losses(tmp_path, "two")) == [1, 2, 3]
