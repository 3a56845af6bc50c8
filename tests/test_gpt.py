import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from tolerances import U64

import gpt

# A sum of n terms, in any order, is off by at most (n - 1) u of the terms' magnitudes
# (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 4.2).


def small(**kw):
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    torch.manual_seed(0)
    return gpt.Model(gpt.Config(**cfg)).double().eval()


@pytest.mark.summation_order
def test_future_tokens_never_change_past_logits():
    m = small()
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 50, (2, 7))
    a, b = m.logits(x), m.logits(y)
    # Equal bit for bit: a past position meets the future ones only through the causal
    # mask's exact zeros (exp(-inf) = 0, 0 * v = 0, x + 0 = x), and every other layer works
    # on each position's row alone, summed in an order set by the shapes, not the values.
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])  # (differ by far more than float64 rounding)


def test_loss_and_nll_agree():
    m = small()
    x = torch.randint(0, 50, (3, 12))
    y = torch.randint(0, 50, (3, 12))
    loss, _ = m(x, y)
    nll = m.nll(x, y)
    assert nll.shape == (3, 12)
    # float64: a token's log-softmax over 50 logits is within (50 + 4) u of the logits' and
    # their logsumexp's magnitudes (another memory layout may sum in another order), and
    # the mean over 36 tokens within (36 + 2) u of theirs; twice, one for each side
    logits = m.logits(x).detach()
    per_token = (50 + 4) * U64 * (logits.abs().amax(-1) + logits.logsumexp(-1).abs())
    torch.testing.assert_close(nll.mean(), loss, rtol=0,
                               atol=float(2 * per_token.max() + 2 * (36 + 2) * U64 * nll.abs().mean()))
    # a second path: log-softmax picked by hand
    logp = logits.log_softmax(-1)
    assert ((nll + logp.gather(-1, y[..., None])[..., 0]).abs() <= 2 * per_token).all()
    # an untrained model is close to uniform over the vocabulary: its logits have an sd of
    # about 0.02 |h| ~ 0.1, which puts the cross-entropy about var / 2 ~ 0.005 above log 50;
    # 0.05 would take logits of sd 0.3, three times that
    assert abs(loss.item() - math.log(50)) < 0.05


@pytest.mark.summation_order
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_and_uncached_generation_give_the_same_tokens(temperature):
    # The cache changes the order of the attention sums, so the logits differ by rounding
    # (~1e-7 of themselves). A token can change only where two logits, or a sampled
    # uniform and a cumulative probability, are that close: for these 90 draws from a
    # random model, a chance of the order of 90 x 1e-7. Equal tokens is the claim.
    m = small()
    prompt = torch.randint(0, 50, (3, 5))
    # 30 new tokens pass block_size 16, so the window slides and the cache is rebuilt
    a = m.generate(prompt, 30, temperature=temperature, use_cache=True, generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, 30, temperature=temperature, use_cache=False, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 35)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)


def test_generation_under_bf16_autocast_runs_with_cache():
    m = small().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.generate(torch.zeros(1, 1, dtype=torch.long), 5)
    assert out.shape == (1, 6)


def support(logits, **kw):
    rows = logits.expand(4000, -1)
    drawn = gpt.sample_next(rows, generator=torch.Generator().manual_seed(0), **kw)
    return set(drawn.flatten().tolist())


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 0.5, 2.0, -1.0, 2.5]])
    assert support(logits, top_k=3) == {1, 3, 5}
    assert support(logits, top_k=1) == {1}
    assert support(logits, top_k=100) == {0, 1, 2, 3, 4, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    assert support(logits, top_p=0.8) == {1, 3}          # 0.5 + 0.3 reaches 0.8
    assert support(logits, top_p=0.81) == {1, 2, 3}      # needs the 0.15 too
    assert support(logits, top_p=0.4) == {1}             # the top token alone
    assert support(logits, top_p=1.0) == {0, 1, 2, 3}
    assert support(logits, top_k=3, top_p=0.6) == {1, 3}


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 0.0]])
    assert gpt.sample_next(logits, temperature=0).flatten().tolist() == [1, 0]


def test_prompt_longer_than_context_is_refused():
    m = small()
    with pytest.raises(ValueError, match="longer than the context"):
        m.logits(torch.zeros(1, 17, dtype=torch.long))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        gpt.Model(gpt.Config(vocab_size=10, n_embd=30, n_head=4))


def test_weights_are_tied_and_residual_projections_scaled():
    torch.manual_seed(0)
    m = gpt.Model(gpt.Config(vocab_size=256, n_layer=8, n_embd=256, n_head=4))
    assert m.lm_head.weight is m.wte.weight
    # the sample sd of N draws of N(0, s^2) has a standard error of s / sqrt(2 N): 5 of them
    # (computed in float64: fp32's rounding of a sum of 200,000 terms could reach 1%)
    for w, s in ((m.h[0].attn.c_proj.weight, 0.02 / math.sqrt(16)), (m.h[0].attn.c_attn.weight, 0.02)):
        assert abs(w.detach().double().std().item() - s) < 5 * s / math.sqrt(2 * w.numel()), (w.shape, s)


# ---- GPT-2 weights -----------------------------------------------------------------

def fake_gpt2_state_dict(n_layer=2, n_embd=32, vocab=60, ctx=24, prefix="transformer."):
    """Random tensors under GPT-2's names and shapes (Conv1D weights are [in, out])."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    sd = {prefix + "wte.weight": r(vocab, n_embd), prefix + "wpe.weight": r(ctx, n_embd),
          prefix + "ln_f.weight": 1 + r(n_embd), prefix + "ln_f.bias": r(n_embd)}
    for i in range(n_layer):
        h = f"{prefix}h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(n_embd), h + "ln_1.bias": r(n_embd),
                   h + "attn.c_attn.weight": r(n_embd, 3 * n_embd), h + "attn.c_attn.bias": r(3 * n_embd),
                   h + "attn.c_proj.weight": r(n_embd, n_embd), h + "attn.c_proj.bias": r(n_embd),
                   h + "ln_2.weight": 1 + r(n_embd), h + "ln_2.bias": r(n_embd),
                   h + "mlp.c_fc.weight": r(n_embd, 4 * n_embd), h + "mlp.c_fc.bias": r(4 * n_embd),
                   h + "mlp.c_proj.weight": r(4 * n_embd, n_embd), h + "mlp.c_proj.bias": r(n_embd),
                   h + "attn.bias": torch.tril(torch.ones(1, 1, ctx, ctx))})  # the mask buffer
    return sd


def reference_gpt2_logits(sd, idx, n_head, prefix="transformer."):
    """GPT-2's forward written out from its definition, with Conv1D as x @ W + b."""
    P = lambda k: sd[prefix + k]
    n_layer = len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "h.")})
    T = idx.shape[1]
    x = P("wte.weight")[idx] + P("wpe.weight")[:T]
    C = x.shape[-1]
    hs = C // n_head
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    ln = lambda x, w, b: F.layer_norm(x, (C,), P(w), P(b), eps=1e-5)
    for i in range(n_layer):
        h = f"h.{i}."
        a = ln(x, h + "ln_1.weight", h + "ln_1.bias") @ P(h + "attn.c_attn.weight") + P(h + "attn.c_attn.bias")
        q, k, v = (t.reshape(*t.shape[:2], n_head, hs).transpose(1, 2) for t in a.split(C, -1))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(x.shape)
        x = x + y @ P(h + "attn.c_proj.weight") + P(h + "attn.c_proj.bias")
        m = ln(x, h + "ln_2.weight", h + "ln_2.bias") @ P(h + "mlp.c_fc.weight") + P(h + "mlp.c_fc.bias")
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
        x = x + m @ P(h + "mlp.c_proj.weight") + P(h + "mlp.c_proj.bias")
    x = ln(x, "ln_f.weight", "ln_f.bias")
    return x @ P("wte.weight").T


def gpt2_double(sd):
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def logits_rounding(logits, n_layer, n_embd, T):
    """A bound on two float64 computations of a small GPT-2's logits apart: the longest
    chain of reductions (per layer: two LayerNorms and the attention's projection of
    n_embd terms, attention over T positions, the MLP's 4 n_embd and n_embd; then ln_f and
    the head), n u each, of magnitudes taken as those of the logits (small nets at O(1)
    activations), for each of the two."""
    n = n_layer * (5 * n_embd + 2 * T + 4 * n_embd) + 2 * n_embd
    return 2 * n * U64 * max(1.0, float(logits.abs().max()))


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_from_gpt2_state_dict_gives_the_reference_logits(prefix):
    sd = fake_gpt2_state_dict(prefix=prefix)
    m = gpt.Model.from_gpt2(sd, n_head=4).eval()
    assert (m.cfg.n_layer, m.cfg.n_embd, m.cfg.vocab_size, m.cfg.block_size) == (2, 32, 60, 24)
    idx = torch.randint(0, 60, (2, 20))
    with torch.no_grad():
        # in float64 (the fp32 weights exactly), so that the comparison is of the two
        # programs, not of their fp32 rounding
        got, want = m.double().logits(idx), reference_gpt2_logits(gpt2_double(sd), idx, 4, prefix)
        assert (got - want).abs().max() <= logits_rounding(want, 2, 32, 20)


def test_from_gpt2_reads_safetensors_and_bin(tmp_path):
    sd = fake_gpt2_state_dict(prefix="", n_embd=64)
    # model.safetensors: little-endian u64 header size, JSON header, raw bytes
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in sd.items():
        b = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    (tmp_path / "st").mkdir()
    with open(tmp_path / "st" / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    (tmp_path / "st" / "config.json").write_text(json.dumps({"n_head": 2}))
    torch.save(sd, tmp_path / "pytorch_model.bin")

    idx = torch.randint(0, 60, (1, 10))
    ref = reference_gpt2_logits(sd, idx, 2, prefix="")
    a = gpt.Model.from_gpt2(str(tmp_path / "st")).eval()        # folder: reads config.json's n_head
    b = gpt.Model.from_gpt2(str(tmp_path / "pytorch_model.bin"), n_head=2).eval()
    assert a.cfg.n_head == 2
    with torch.no_grad():  # in float64, as above
        ref = reference_gpt2_logits(gpt2_double(sd), idx, 2, prefix="")
        for m in (a, b):
            assert (m.double().logits(idx) - ref).abs().max() <= logits_rounding(ref, 2, 64, 10)


def test_from_gpt2_refuses_a_state_dict_that_does_not_fit():
    sd = fake_gpt2_state_dict()
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match="missing"):
        gpt.Model.from_gpt2(sd, n_head=4)


def test_gpt2_preset_has_124m_parameters():
    cfg = gpt.Config(**{k: v for k, v in gpt.PRESETS["gpt2"].items() if hasattr(gpt.Config, k)})
    with torch.device("meta"):
        m = gpt.Model(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert n == 124_439_808, n  # GPT-2 small, counted with its tied embedding once
