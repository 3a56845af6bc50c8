"""gpt.py's mixture of experts against loops written out here and the dense MLP."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tolerances import U32

import gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, n_expert=4, expert_top_k=2)
    return gpt.Config(**{**base, **kw})


@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_equals_a_loop_over_each_tokens_experts(k):
    """In float64: each token's output is the sum over its top-k experts (by router
    probability) of the gate times that expert's MLP of the token alone, the gates the
    probabilities renormalised over the k (k = 1: the probability itself)."""
    torch.manual_seed(0)
    moe = gpt.MoE(config(n_expert=5, expert_top_k=k)).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    got = moe(x)
    for b in range(3):
        for t in range(7):
            p = torch.softmax(moe.router(x[b, t]), -1)
            top = sorted(range(5), key=lambda e: -p[e].item())[:k]
            z = sum(p[e] for e in top) if k > 1 else 1.0
            want = sum(p[e] / z * moe.experts[e](x[b, t][None])[0] for e in top)
            # float64 throughout: a few dozen roundings of terms of size ~1, at 2^-53 each
            assert torch.allclose(got[b, t], want, rtol=0, atol=1e-12), (b, t)


def test_one_expert_is_the_dense_mlp():
    torch.manual_seed(0)
    moe = gpt.MoE(config(n_expert=1, expert_top_k=1))
    mlp = gpt.MLP(config())
    mlp.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 5, 16)
    # the softmax over one expert is exactly 1, the rows are gathered and scattered back
    # unchanged and added to zeros: the same numbers as the dense MLP's
    assert torch.equal(moe(x), mlp(x))


def test_balance_loss_is_its_formula_and_1_when_balanced():
    torch.manual_seed(0)
    E, k = 4, 2
    moe = gpt.MoE(config(n_expert=E, expert_top_k=k))
    x = torch.randn(6, 5, 16)
    stats = []
    moe(x, stats)
    (balance, busiest), = stats
    p = torch.softmax(moe.router(x.reshape(-1, 16)).float(), -1)
    chosen = p.topk(k, -1).indices
    f = torch.stack([(chosen == e).sum() for e in range(E)]).float() / chosen.numel()
    # a sum of E products of fp32 means over 30 tokens: (30 + E) roundings of terms <= 1
    assert balance.item() == pytest.approx((E * f * p.mean(0)).sum().item(), abs=(30 + E) * U32 * E)
    assert busiest.item() == f.max().item()
    # balanced: 8 tokens, each scoring its own expert (token i, expert i mod 4) highest by
    # the same margin, so every expert takes 2 tokens and has mean probability 1/4
    moe = gpt.MoE(config(n_expert=E, expert_top_k=1))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :E] = 3 * torch.eye(E)
    x = torch.zeros(1, 8, 16)
    x[0, torch.arange(8), torch.arange(8) % E] = 1.0
    stats = []
    moe(x, stats)
    (balance, busiest), = stats
    assert balance.item() == pytest.approx(1.0, abs=8 * U32) and busiest.item() == 0.25


@pytest.mark.parametrize("k", [1, 2])
def test_gradients_reach_the_router_and_every_expert(k):
    torch.manual_seed(0)
    m = gpt.Model(config(expert_top_k=k, n_expert=8, balance_coef=0.0))
    idx = torch.randint(0, 32, (2, 9))
    loss, parts = m(idx)
    loss.backward()
    for block in m.h:
        assert block.mlp.router.weight.grad.abs().sum() > 0  # through the gates alone (no balance loss)
        # an expert that served no token still gets a gradient, of zeros (DDP needs one)
        assert all(p.grad is not None for p in block.mlp.experts.parameters())
    assert set(parts) == {"ce", "balance", "busiest"} and parts["ce"].item() == loss.item()


def test_cache_nll_and_loss_with_experts():
    torch.manual_seed(0)
    m = gpt.Model(config(balance_coef=0.1)).eval()
    idx = torch.randint(0, 32, (2, 8))
    a = m.generate(idx[:, :2], 6, temperature=0.0, use_cache=True)
    b = m.generate(idx[:, :2], 6, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)
    loss, parts = m(idx)
    assert loss.item() == parts["ce"].item()  # held out: the cross-entropy alone
    # its mean over 2 x 7 predicted tokens against nll's: two orders of 14 terms
    assert m.nll(idx).mean().item() == pytest.approx(loss.item(), rel=2 * 14 * U32)
    loss, parts = m.train()(idx)  # training: plus balance_coef times the 2 blocks' balance losses
    assert loss.item() == pytest.approx(parts["ce"].item() + 0.1 * 2 * parts["balance"].item(), rel=4 * U32)


def test_bad_expert_settings_are_refused():
    for kw in (dict(n_expert=-1), dict(n_expert=2, expert_top_k=3), dict(n_expert=4, expert_top_k=0),
               dict(n_expert=4, expert_top_k=3)):  # 3 does not divide 4 * 16
        with pytest.raises(ValueError):
            gpt.Model(config(**kw))


def test_train_py_logs_the_parts_and_two_processes_run(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    same = ["--data", str(text), "--data-dir", str(tmp_path / "d"), "--n-layer", "1", "--n-head", "2",
            "--n-embd", "16", "--block-size", "16", "--n-expert", "4", "--expert-top-k", "2", "--batch-size", "4",
            "--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1", "--log-interval", "1",
            "--dtype", "fp32", "--sample-tokens", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *same, "--out-dir", str(tmp_path / "two")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(l) for l in open(tmp_path / "two" / "log.jsonl")]
    steps = [x for x in log if "loss" in x]
    assert len(steps) == 4 and all({"ce", "balance", "busiest"} <= set(x) for x in steps)
    # every pair is sent somewhere: the busiest expert takes between 1/E and all of them
    assert all(0.25 <= x["busiest"] <= 1 and math.isfinite(x["balance"]) for x in steps)
