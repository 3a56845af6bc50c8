"""GPT: a GPT-2-style decoder-only Transformer, its loss and its sampler, in one file.

Reading order: Config and PRESETS, the blocks, the Model (forward = next-token
cross-entropy), generation with a KV cache, and loading Hugging Face GPT-2 weights.
The defaults are GPT-2's block exactly; a modern block (rotary positions, RMSNorm,
QK-norm, ReLU^2, no biases, an untied head, grouped-query attention) is a field per
piece away, and all of it at once is the `tiny-modern` preset.
The module and parameter names follow GPT-2's own (wte, wpe, h.N.attn.c_attn, ...)
so that a GPT-2 checkpoint maps onto this model name for name.
"""
import json
import math
import os
import struct
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    block_size: int = 256     # context length in tokens
    vocab_size: int = 0       # 0: taken from the tokenizer; may be larger (padding), never smaller
    n_layer: int = 6          # Transformer blocks
    n_head: int = 6           # attention heads; must divide n_embd
    n_embd: int = 384         # width of the residual stream
    dropout: float = 0.0      # dropout on attention weights and residual branches
    bias: bool = True         # biases in Linear layers and LayerNorms, as GPT-2 has
    n_expert: int = 0         # 0: the dense MLP; E > 0: a mixture of E expert MLPs in every block
    expert_top_k: int = 1     # experts per token, each 4 * n_embd / k wide: as many active weights as
                              # the dense MLP
    balance_coef: float = 0.01  # weight of Switch's load-balancing loss, summed over the blocks

    # The modern block, one field per piece; the defaults are GPT-2's (bias above is one piece too).
    rope: bool = False        # rotary position embeddings (RoPE, Su et al. 2021) on queries and keys,
                              # instead of learned positions (no wpe)
    norm: str = "layernorm"   # the blocks' and the head's norm: layernorm (GPT-2's) or rmsnorm (Zhang &
                              # Sennrich 2019)
    norm_gain: bool = True    # learned per-feature gains in those norms (off: none, as in modded-nanogpt;
                              # a LayerNorm then has no bias either)
    qk_norm: bool = False     # RMSNorm, without gains, of each head's queries and keys before attention (as in
                              # nanochat and modded-nanogpt)
    activation: str = "gelu"  # the MLP's: gelu (GPT-2's tanh approximation) or relu2, ReLU squared (So et
                              # al. 2021, Primer)
    tie_embeddings: bool = True  # the head shares the token embedding's matrix, as in GPT-2 (off: its own)
    n_kv_head: int = 0        # key/value heads, each shared by n_head / n_kv_head query heads (grouped-query
                              # attention, Ainslie et al. 2023); 0 or n_head: multi-head


# Why a field per piece rather than one `arch` switch: each piece is then a flag that can be
# tested, ablated and combined alone (the KV-cache test runs every one alone and all at
# once), and a checkpoint's config says exactly which are on. The "one flag" is a preset,
# as for every other recipe: --preset tiny-modern.
ROPE_BASE = 10000.0  # RoPE's base, as in Su et al. and nanochat
NORM_EPS = 1e-5      # every norm's epsilon, GPT-2's LayerNorm's


# A preset may set Config fields and train.py's TrainConfig fields (names never clash).
PRESETS = {
    # Tuned for a 5-minute run on a 2-core CPU in fp32: at ~4 steps/s a model this
    # small sees more tokens than a wider one, which wins at this budget (0.48M params;
    # 128 wide gave 2.07-2.25 bits/byte, 96 wide 2.03). Context 64 with batch 64 (the
    # same tokens per step, cheaper attention) gave 1.92-1.97. A high peak LR, decayed to 1%.
    "tiny": dict(n_layer=4, n_head=4, n_embd=96, block_size=64, dropout=0.0,
                 batch_size=64, lr=8e-3, min_lr=8e-5, warmup_iters=100, max_iters=1500,
                 eval_interval=500, eval_iters=20, weight_decay=0.1),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.0,
                  batch_size=32, lr=1e-3, min_lr=1e-4, warmup_iters=200, max_iters=5000),
    # GPT-2 124M. The vocabulary is the gpt2 tokenizer's; use --tokenizer gpt2.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
                 dropout=0.0, batch_size=12, grad_accum=40, lr=6e-4, min_lr=6e-5,
                 warmup_iters=2000, max_iters=600000, weight_decay=0.1),
    # tiny's width, depth, context, batch and schedule with every modern piece on. Untuned:
    # the learning rate and the rest are tiny's, never searched for this block.
    "tiny-modern": dict(n_layer=4, n_head=4, n_embd=96, block_size=64, dropout=0.0,
                        batch_size=64, lr=8e-3, min_lr=8e-5, warmup_iters=100, max_iters=1500,
                        eval_interval=500, eval_iters=20, weight_decay=0.1,
                        rope=True, norm="rmsnorm", norm_gain=False, qk_norm=True, activation="relu2",
                        bias=False, tie_embeddings=False, n_kv_head=2),
}

DATA = "pystdlib"


def rope_tables(length, head_dim, base=ROPE_BASE):
    """cos and sin [length, head_dim / 2] of the angles pos * base^(-2i / head_dim), i < head_dim / 2:
    rotary position embedding (RoPE, Su et al. 2021). Computed in float64, kept in fp32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """RoPE (Su et al. 2021): rotate each pair (x_i, x_{i + d/2}) of a head's d features by
    its angle pos * base^(-2i/d), pairing the two halves as nanochat and modded-nanogpt do.
    x [B, H, T, d], cos and sin [T, d/2]. Rotations compose: a query rotated to position i
    and a key to j score q . R(j - i) k, which depends on the positions through j - i
    alone. Computed in at least fp32 (a bf16 x under autocast), returned in x's dtype."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def rms_norm(x, weight=None):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) over the last dim, times
    a gain per feature where given; no mean subtracted, no bias."""
    return F.rms_norm(x, (x.size(-1),), weight, NORM_EPS)


class RMSNorm(nn.Module):
    """rms_norm as a layer, with a learned gain per feature (starting at 1) or none."""

    def __init__(self, dim, gain=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if gain else None

    def forward(self, x):
        return rms_norm(x, self.weight)


def make_norm(cfg):
    """GPT-2's LayerNorm (gain and, with bias, a bias), or RMSNorm; norm_gain off: no gain."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, gain=cfg.norm_gain)
    return nn.LayerNorm(cfg.n_embd, eps=NORM_EPS, elementwise_affine=cfg.norm_gain, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; with n_kv_head < n_head grouped-query attention
    (GQA, Ainslie et al. 2023): n_kv_head heads of keys and values, each shared by
    n_head / n_kv_head consecutive query heads (and the KV cache holds n_kv_head heads)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        kv = self.n_kv_head * self.head_dim  # n_embd in GPT-2's multi-head attention
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, rope=None):
        """x [B, T, C]; rope, (cos, sin) of these T positions, rotates queries and keys."""
        B, T, C = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split((C, kv, kv), dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if self.qk_norm:  # QK-norm, no gains (nanochat, modded-nanogpt)
            q, k = rms_norm(q), rms_norm(k)
        if rope is not None:  # keys are rotated at their absolute positions before they are cached
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            # The cache holds keys and values of every earlier position; new ones are
            # written in place so a step costs O(T), not O(T^2).
            pos = cache["pos"]
            cache["k"][:, :, pos:pos + T] = k
            cache["v"][:, :, pos:pos + T] = v
            k, v = cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T]
        # A prefill (T == keys) needs the causal mask; one new token may see every key.
        causal = k.size(2) == T and T > 1
        # enable_gqa only where keys are shared: the keyword is torch 2.5's, and requirements allow 2.4.
        gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
                                           **gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg, hidden=None):
        super().__init__()
        hidden = hidden or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.relu2 = cfg.activation == "relu2"

    def forward(self, x):
        h = self.c_fc(x)
        if self.relu2:  # ReLU squared (So et al. 2021, Primer)
            h = F.relu(h).square()
        else:  # GPT-2 was trained with the tanh approximation of GELU; keep it so its weights
            h = F.gelu(h, approximate="tanh")  # give the logits they gave there
        return self.drop(self.c_proj(h))


class MoE(nn.Module):
    """A mixture of experts (Switch Transformer, Fedus et al. 2021; top-k as in GShard and
    Mixtral): a router, one linear layer, scores the E expert MLPs for each token; the
    token goes to its top k, and its output is their outputs weighted by the router's
    softmax probabilities renormalised over those k (with k = 1 the probability itself,
    as in Switch: a renormalised 1 would carry no gradient to the router). Every token is
    served (no capacity limit, none dropped): the token-expert pairs are sorted by
    expert, and each expert runs once, on its contiguous slice (an empty one too, so that
    every expert's weights get a gradient, zero or not, as DDP requires)."""

    def __init__(self, cfg):
        super().__init__()
        self.k = cfg.expert_top_k
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, 4 * cfg.n_embd // self.k) for _ in range(cfg.n_expert))

    def forward(self, x, stats=None):
        """x [B, T, C] -> [B, T, C]. stats, a list, gets (balance loss, busiest expert's
        share of the token-expert pairs) of this call."""
        shape, E = x.shape, len(self.experts)
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(_at_least_fp32(self.router(x)), dim=-1)  # [N, E], in fp32 under autocast
        gates, chosen = probs.topk(self.k, dim=-1)          # [N, k]
        gates = gates / gates.sum(-1, keepdim=True) if self.k > 1 else gates
        order = chosen.flatten().argsort(stable=True)       # the N * k pairs, grouped by expert
        token = order // self.k
        counts = torch.bincount(chosen.flatten(), minlength=E)
        xs, out = x[token], x.new_empty(len(token), shape[-1])
        start = 0
        for e, n in enumerate(counts.tolist()):  # one call per expert, never per token
            out[start:start + n] = self.experts[e](xs[start:start + n])
            start += n
        y = torch.zeros_like(x).index_add_(0, token, out * gates.flatten()[order, None].to(out.dtype))
        if stats is not None:
            # Switch's loss: E * sum_i f_i P_i, f_i the share of pairs sent to expert i, P_i
            # its mean router probability; 1 when both are uniform, and its gradient
            # (through P) pulls probability away from the busy experts.
            share = counts.float() / counts.sum()
            stats.append((E * (share * probs.mean(0)).sum(), share.max()))
        return y.view(shape)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_expert else MLP(cfg)

    def forward(self, x, cache=None, stats=None, rope=None):
        x = x + self.attn(self.ln_1(x), cache, rope)  # pre-LayerNorm: the residual stream is never normalised
        h = self.ln_2(x)
        return x + (self.mlp(h, stats) if isinstance(self.mlp, MoE) else self.mlp(h))


def check_config(cfg):
    """Refuse, in one line (ValueError), a Config no model can be built from."""
    if cfg.vocab_size <= 0:
        raise ValueError("vocab_size must be positive (train.py takes it from the tokenizer)")
    for name, high in (("block_size", 2 ** 20), ("vocab_size", 2 ** 21), ("n_layer", 1024), ("n_head", 2 ** 16),
                       ("n_embd", 2 ** 16), ("expert_top_k", 1024)):
        if not 1 <= getattr(cfg, name) <= high:
            raise ValueError(f"{name} must be in 1..{high} (got {getattr(cfg, name)})")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not 0 <= cfg.n_expert <= 1024 or (cfg.n_expert and cfg.expert_top_k > cfg.n_expert):
        raise ValueError(f"n_expert must be in 0..1024 (0: dense), and expert_top_k in 1..n_expert "
                         f"(got {cfg.n_expert}, {cfg.expert_top_k})")
    if cfg.n_expert and (4 * cfg.n_embd) % cfg.expert_top_k:
        raise ValueError(f"expert_top_k {cfg.expert_top_k} must divide 4 * n_embd ({4 * cfg.n_embd})")
    if not 0 <= cfg.balance_coef < math.inf:
        raise ValueError(f"balance_coef must be a finite number >= 0 (got {cfg.balance_coef})")
    if cfg.norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm must be layernorm or rmsnorm (got {cfg.norm!r})")
    if cfg.activation not in ("gelu", "relu2"):
        raise ValueError(f"activation must be gelu or relu2 (got {cfg.activation!r})")
    if not 0 <= cfg.n_kv_head <= cfg.n_head or cfg.n_kv_head and cfg.n_head % cfg.n_kv_head:
        raise ValueError(f"n_kv_head must be 0 (multi-head) or divide n_head ({cfg.n_head}) (got {cfg.n_kv_head})")
    if cfg.rope and (cfg.n_embd // cfg.n_head) % 2:
        raise ValueError(f"rope rotates pairs of features: the head size n_embd / n_head "
                         f"({cfg.n_embd // cfg.n_head}) must be even")


class Model(nn.Module):
    players = ("model",)

    def __init__(self, cfg: Config):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = None if cfg.rope else nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.rope:  # the rotations of every position, shared by the blocks; not saved (a function of cfg)
            cos, sin = rope_tables(cfg.block_size, cfg.n_embd // cfg.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # weight tying, as in GPT-2: one matrix reads and writes tokens
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two residual branches, so their output
        # projections start 1/sqrt(2 * n_layer) smaller to keep the stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def parameters_of(self, player="model"):
        return self.parameters()

    def io_layers(self):
        """The layers that read tokens in and write logits out, which Muon leaves to AdamW:
        the embeddings (AdamW's anyway) and the head, which matters once it is untied."""
        return [m for m in (self.wte, self.wpe, self.lm_head) if m is not None]

    def crop_block_size(self, block_size):
        """Keep the first block_size positions, e.g. to fine-tune GPT-2 on shorter context."""
        assert 0 < block_size <= self.cfg.block_size
        self.cfg.block_size = block_size
        if self.wpe is not None:  # (RoPE's tables may stay longer than the context)
            self.wpe.weight = nn.Parameter(self.wpe.weight[:block_size].detach().clone())

    def logits(self, idx, caches=None, stats=None):
        """idx [B, T] token ids -> logits [B, T, vocab]. With caches, positions continue after
        them; stats, a list, gets each MoE block's (balance loss, busiest share)."""
        B, T = idx.shape
        start = caches[0]["pos"] if caches else 0
        if start > 0 and T > 1:  # the attention mask below covers a prefill or one new token
            raise ValueError("with a filled cache, feed one token at a time")
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context ({self.cfg.block_size})")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T]) if self.cfg.rope else None
        for i, block in enumerate(self.h):
            x = block(x, caches[i] if caches else None, stats, rope)
        if caches:
            for c in caches:
                c["pos"] += T
        return self.lm_head(self.ln_f(x))

    def forward(self, x, y=None, player="model"):
        """Next-token cross-entropy in nats per token. Without y, x predicts itself shifted by
        one. With experts, in training, plus balance_coef times the blocks' summed balance
        losses (a regularizer of the routers, so held-out losses and bits/byte are the
        cross-entropy alone); the parts logged: the cross-entropy, the mean balance loss (1:
        balanced) and the busiest expert's share of the pairs, averaged over the blocks."""
        if y is None:
            x, y = x[:, :-1], x[:, 1:]
        stats = []
        logits = _at_least_fp32(self.logits(x, stats=stats))  # bf16 logits would round the loss
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        if not stats:
            return loss, {}
        balance, busiest = (torch.stack(s) for s in zip(*stats))
        parts = {"ce": loss.detach(), "balance": balance.mean().detach(), "busiest": busiest.mean()}
        return (loss + self.cfg.balance_coef * balance.sum() if self.training else loss), parts

    @torch.no_grad()
    def nll(self, x, y=None):
        """Nats of every predicted token, [B, T]: -log p(y_t | x_<=t)."""
        if y is None:
            x, y = x[:, :-1], x[:, 1:]
        logits = _at_least_fp32(self.logits(x))
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")

    # ---- sampling ---------------------------------------------------------------

    def new_cache(self, batch_size, device, dtype):
        # keys and values of n_kv_head heads (GQA's saving), rotated already where RoPE is on
        shape = (batch_size, self.cfg.n_kv_head or self.cfg.n_head, self.cfg.block_size,
                 self.cfg.n_embd // self.cfg.n_head)
        return [dict(k=torch.empty(shape, device=device, dtype=dtype),
                     v=torch.empty(shape, device=device, dtype=dtype), pos=0) for _ in self.h]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None):
        """Extend idx [B, T] by max_new_tokens sampled tokens.

        temperature 0 is greedy decoding. top_k keeps the k most likely tokens (and any
        tied with the k-th); top_p keeps the smallest set of most likely tokens whose
        probability reaches p. With use_cache, keys and values of the context are kept;
        once the sequence outgrows block_size the window slides, positions shift, and
        the cache is rebuilt from the cropped window, so both paths give the same tokens.
        """
        caches = None
        for _ in range(max_new_tokens):
            window = idx[:, -self.cfg.block_size:]
            if not use_cache:
                logits = self.logits(window)
            elif caches is not None and caches[0]["pos"] < self.cfg.block_size:
                logits = self.logits(idx[:, -1:], caches)   # one new token against the cache
            else:  # first step, or the window slid: (re)fill the cache from the window
                dtype = self.wte.weight.dtype
                if torch.is_autocast_enabled(idx.device.type):
                    dtype = torch.get_autocast_dtype(idx.device.type)
                caches = self.new_cache(idx.size(0), idx.device, dtype)
                logits = self.logits(window, caches)
            nxt = sample_next(_at_least_fp32(logits[:, -1, :]), temperature, top_k, top_p, generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    @torch.no_grad()
    def sample(self, n, y=None, prompt=None, max_new_tokens=256, **kw):
        """n sequences of token ids; prompt is a list of ids to start from (default: token 0)."""
        device = self.wte.weight.device
        start = torch.tensor([prompt or [0]] * n, dtype=torch.long, device=device)
        return self.generate(start, max_new_tokens, **kw)

    # ---- GPT-2 weights ----------------------------------------------------------

    @classmethod
    def from_gpt2(cls, state_dict_or_path, n_head=None, dropout=0.0, **block):
        """A Model holding Hugging Face GPT-2 weights, without importing transformers.

        Takes a state dict, a `model.safetensors` or `pytorch_model.bin` file, or a folder
        with one of them (and config.json, which gives n_head). Without a config, n_head
        is n_embd // 64, true of every released GPT-2 size. block, modern fields of Config
        (rope=True, ...), is refused in one line unless each is GPT-2's own value: the
        weights are GPT-2's block and mean nothing in another.
        """
        classic, modern = Config(), ("rope", "norm", "norm_gain", "qk_norm", "activation", "tie_embeddings",
                                     "n_kv_head", "bias")
        for k, v in block.items():
            if k not in modern:
                raise TypeError(f"from_gpt2() got an unexpected keyword argument {k!r}")
            if v != getattr(classic, k):
                raise ValueError(f"GPT-2 weights are GPT-2's block: they cannot load into {k}={v!r} "
                                 f"(GPT-2's is {getattr(classic, k)!r})")
        sd, hf_cfg = state_dict_or_path, {}
        if isinstance(sd, (str, os.PathLike)):
            sd, hf_cfg = _read_gpt2_files(os.fspath(sd))
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if "wte.weight" not in sd:
            raise ValueError("not a GPT-2 state dict: no 'wte.weight' (or 'transformer.wte.weight')")
        vocab, n_embd = sd["wte.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
        cfg = Config(block_size=sd["wpe.weight"].shape[0], vocab_size=vocab, n_layer=n_layer,
                     n_head=n_head or hf_cfg.get("n_head") or max(1, n_embd // 64), n_embd=n_embd,
                     dropout=dropout, bias=True)
        model = cls(cfg)
        # GPT-2 stores its Linear layers as Conv1D, whose weight is [in, out]: transpose.
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        mine = model.state_dict()
        sd.pop("lm_head.weight", None)  # tied to wte
        missing = set(mine) - set(sd) - {"lm_head.weight"}
        unexpected = set(sd) - set(mine)
        if missing or unexpected:
            raise ValueError(f"GPT-2 state dict does not fit: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}")
        with torch.no_grad():
            for k, v in sd.items():
                v = v.t() if k.endswith(conv1d) else v
                if v.shape != mine[k].shape:
                    raise ValueError(f"GPT-2 tensor {k} has shape {tuple(v.shape)}, "
                                     f"expected {tuple(mine[k].shape)}")
                mine[k].copy_(v)
        return model


def _at_least_fp32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits [B, V] -> [B, 1]."""
    if top_k is not None and top_k <= 0 or top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_k must be positive and top_p in (0, 1], got {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach p; the first never goes.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "U8": torch.uint8, "BOOL": torch.bool, "I64": torch.int64}


def read_safetensors(path):
    """A safetensors file is an 8-byte little-endian header length, a JSON header
    naming each tensor's dtype, shape and byte range, then the raw bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        if not 0 <= begin <= end <= len(data):
            raise ValueError(f"{path}: tensor {name} lies outside the file (truncated?)")
        dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
        raw = bytearray(data[begin:end])
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        t = t.reshape(meta["shape"])
        out[name] = t.float() if t.is_floating_point() else t  # masks (attn.bias) stay as they are
    return out


def _read_gpt2_files(path):
    cfg = {}
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    if path.endswith(".safetensors"):
        return read_safetensors(path), cfg
    return torch.load(path, map_location="cpu", weights_only=True), cfg
