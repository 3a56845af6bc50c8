"""
Denoising diffusion: DDPM (Ho et al. 2020) trained and sampled ancestrally, DDIM (Song
et al. 2021) over any number of respaced steps, classifier-free guidance (Ho & Salimans
2022), the full variational bound in nats for bits/dim, and flow matching (rectified
flow: Liu et al. 2022, Lipman et al. 2022, with Stable Diffusion 3's conventions) with
Euler sampling and the exact likelihood of its ODE. The denoiser is DDPM's U-Net or,
with --arch dit, a diffusion Transformer (DiT: Peebles & Xie 2023). One file, torch only.

Indexing: the paper's timesteps t = 1..T are indices 0..T-1 here, so betas[0] is beta_1,
alphas_cumprod[t] is alpha-bar of x at index t, and x at index 0 is one small step of
noise away from the data. Data are images in [-1, 1] on the 8-bit grid.

Flow and DDPM: DDPM's x_t = a x0 + s eps (a^2 + s^2 = 1) runs along a curve; flow's
x_t = (1 - t) x0 + t eps, t in [0, 1], runs along the straight line from the data to the
noise, and is DDPM's x_t divided by a + s at the noise level where a / s = (1 - t) / t.
The network predicts the velocity v = eps - x0 = dx_t/dt, an affine function of eps at a
fixed x_t (v = (eps - x_t) / (1 - t)), so it carries what an eps-prediction carries.
Sampling follows dx/dt = v from t = 1 (noise) to t = 0 (data) with Euler steps.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

DATA = "digits"


@dataclass
class Config:
    channels: int = 1               # image channels (filled from the data)
    image_size: int = 28            # image height = width (filled from the data)
    num_classes: int = 0            # > 0: class-conditional with guidance (filled from labelled data); 0:
                                    # unconditional
    base: int = 16                  # U-Net channels at full resolution (DDPM's CIFAR-10 model: 128)
    mults: tuple = (1, 2, 4)        # channel multiplier per resolution level; each level after the first
                                    # halves the size
    num_res_blocks: int = 1         # residual blocks per level on the way down (one more on the way up)
    attn_res: tuple = (7,)          # resolutions (pixels per side) whose blocks are followed by
                                    # self-attention
    dropout: float = 0.0            # dropout inside residual blocks
    timesteps: int = 1000           # T, the number of noise levels (flow: t in [0, 1] enters the network as
                                    # t * T, and nll integrates its ODE over T steps)
    schedule: str = "linear"        # linear (DDPM: beta 1e-4..0.02 at T=1000) or cosine (Nichol & Dhariwal)
    objective: str = "eps"          # what the network predicts: eps, x0 or v (DDPM's x_t), or flow (the
                                    # velocity eps - x0 of the straight line)
    flow_time: str = "logit-normal" # flow: t in training, logit-normal (sigmoid of N(0, 1), SD3's default:
                                    # most steps at mid noise) or uniform
    variance: str = "small"         # reverse-process variance: small (beta-tilde) or large (beta)
    p_uncond: float = 0.1           # conditional models: probability of dropping the label in training (for
                                    # guidance)
    sample_steps: int = 50          # default sampling: DDIM over this many steps (0: ancestral over all T)

    # The denoiser. The DiT defaults suit 28x28 digits at the tiny preset's scale (49 tokens of
    # 4x4 patches, 1.87M parameters); untuned.
    arch: str = "unet"              # denoiser: unet (DDPM's U-Net: base, mults, num_res_blocks, attn_res,
                                    # dropout) or dit (a diffusion Transformer, Peebles & Xie 2023: the
                                    # fields below)
    patch: int = 4                  # dit: patch side in pixels (image_size must be divisible by it)
    dit_depth: int = 6              # dit: Transformer blocks
    dit_width: int = 128            # dit: hidden size (a multiple of 4 and of dit_heads)
    dit_heads: int = 4              # dit: attention heads


# The defaults are a small model that trains on digits on a laptop CPU; presets scale it.
PRESETS = {
    # Digits on a 2-core CPU in 20 minutes: 28 -> 14 -> 7 with 16, 32, 64 channels, attention
    # at 7x7. T = 100: ancestral sampling over all T for 10,000 samples is then 80 minutes of
    # one core here, rather than 3.3 hours at T = 250.
    "tiny": dict(base=16, mults=(1, 2, 4), num_res_blocks=1, attn_res=(7,), dropout=0.0, timesteps=100,
                 batch_size=64, lr=2e-3, min_lr=1e-4, warmup_iters=200, max_iters=8000, weight_decay=0.0,
                 eval_interval=500, eval_iters=4, ema=0.999, sample_images=100),
    # The DDPM paper's CIFAR-10 model and recipe (35.7M parameters). Use --data cifar10.
    "ddpm-cifar10": dict(base=128, mults=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1,
                         timesteps=1000, schedule="linear", objective="eps", variance="large",
                         num_classes=0, batch_size=128, lr=2e-4, min_lr=2e-4, warmup_iters=5000,
                         max_iters=800000, weight_decay=0.0, grad_clip=1.0, ema=0.9999),
    # DiT-S/2 (Peebles & Xie 2023, table 1: depth 12, hidden size 384, 6 heads, patch 2; 33M
    # parameters on ImageNet's 32x32x4 latents) on CIFAR-10's 32x32 pixels: 256 tokens, class-
    # conditional; the paper's optimizer recipe (AdamW at 1e-4, no weight decay, batch 256, EMA
    # 0.9999, T = 1000 linear) and a GPU, but a fixed variance where the paper also learns it
    # (its 2C outputs). 32.5M parameters here (3 channels out, 10 classes).
    "dit-s2": dict(arch="dit", patch=2, dit_depth=12, dit_width=384, dit_heads=6, timesteps=1000,
                   schedule="linear", objective="eps", data="cifar10", batch_size=256, lr=1e-4, min_lr=1e-4,
                   warmup_iters=0, max_iters=400000, weight_decay=0.0, grad_clip=0.0, ema=0.9999),
}

# ---- the U-Net --------------------------------------------------------------------------


def timestep_embedding(t, dim):
    """Sinusoidal embedding of timesteps (integers; flow's t * T), as in the Transformer: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], 1)


def norm(ch):
    # 32 groups as in DDPM for wide layers; narrow ones keep at least 4 channels per group,
    # because a group of one channel would normalise away the per-channel time embedding.
    return nn.GroupNorm(math.gcd(32, max(ch // 4, 1)), ch)


class Conv1x1(nn.Linear):
    """A 1x1 convolution whose weight is the [cout, cin] matrix it applies (nn.Linear's
    layout and initialisation, which equal nn.Conv2d's for a 1x1 kernel, draw for draw).
    An nn.Conv2d's [cout, cin, 1, 1] weight can get a gradient with other strides on its
    size-1 dims (attention's projection, whose input is a transposed view, got [cin, 1,
    cin, cin], in fp32 and bf16): the same bytes, but DDP compares strides, so it copied
    every such gradient into its bucket each step, and warned. The gradient of a matrix
    has the matrix's strides."""

    def forward(self, x):
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop, self.conv2 = norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = Conv1x1(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]  # the time (and class) tells the block the noise level
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a feature map."""

    def __init__(self, ch):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), Conv1x1(ch, 3 * ch), Conv1x1(ch, ch)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """DDPM's U-Net: residual blocks with GroupNorm and SiLU, a sinusoidal time embedding
    (plus a class embedding) fed into every block, attention at chosen resolutions,
    strided-conv downsampling and nearest-neighbour + conv upsampling, skip connections
    from every block of the way down to the way up."""

    def __init__(self, cfg):
        super().__init__()
        ch, emb_dim = cfg.base, 4 * cfg.base
        self.base = ch
        self.time = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # one extra row: the "no label" class that classifier-free guidance trains and samples with
        self.label = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.inp = nn.Conv2d(cfg.channels, ch, 3, padding=1)
        self.down, chans, res, cur = nn.ModuleList(), [ch], cfg.image_size, ch
        for i, m in enumerate(cfg.mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(cur, ch * m, emb_dim, cfg.dropout)]
                                               + ([Attention(ch * m)] if res in cfg.attn_res else [])))
                cur = ch * m
                chans.append(cur)
            if i < len(cfg.mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                chans.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, cfg.dropout), Attention(cur),
                                  ResBlock(cur, cur, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg.mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(cur + chans.pop(), ch * m, emb_dim, cfg.dropout)]
                                             + ([Attention(ch * m)] if res in cfg.attn_res else [])))
                cur = ch * m
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(norm(cur), nn.SiLU(), nn.Conv2d(cur, cfg.channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def io_layers(self):
        return [self.inp, self.out[-1]]

    def forward(self, x, t, y=None):
        emb = self.time(timestep_embedding(t, self.base))
        if self.label is not None:
            emb = emb + self.label(y)
        h = self.inp(x)
        skips = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, skips.pop()], 1)
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)

# ---- the diffusion Transformer (DiT) ----------------------------------------------------


def patchify(x, p):
    """Images [B, C, H, W] -> patches [B, (H/p)(W/p), C p p], the patches in row-major order,
    each flattened channel-major (F.unfold's layout), as DiT's patch embedding reads them
    (Peebles & Xie 2023; ViT, Dosovitskiy et al. 2021)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p, C, H, W):
    """The inverse of patchify: [B, (H/p)(W/p), C p p] -> [B, C, H, W] (DiT's last step)."""
    B = x.shape[0]
    x = x.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, H, W)


def sincos_2d(dim, h, w):
    """Fixed 2D sin-cos position embedding [h w, dim], after MAE's (He et al. 2022), which DiT
    uses: the first half of the channels encode the row, the second half the column, each as
    the Transformer's 1D embedding of its index (MAE puts the column first: the same
    embedding up to a fixed permutation of channels). dim must be a multiple of 4."""
    quarter = dim // 4
    omega = 1 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def one(pos):
        a = pos.flatten()[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], 1)
    return torch.cat([one(rows), one(cols)], 1).float()


def modulate(x, shift, scale):
    """adaLN's affine map of LayerNorm's output, per image: x (1 + scale) + shift (DiT)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def ada(dim, n):
    """adaLN-Zero's regression of n shifts, scales and gates from the conditioning (DiT,
    Peebles & Xie 2023, section 3.2): SiLU then a linear layer, zero-initialised, so each
    gate starts at 0 and each block at the identity."""
    layer = nn.Linear(dim, n * dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return nn.Sequential(nn.SiLU(), layer)


class DiTBlock(nn.Module):
    """DiT's block with adaLN-Zero (Peebles & Xie 2023, figure 3): multi-head self-attention
    and a 4x GELU MLP, each after a LayerNorm without parameters whose shift and scale, and
    a gate on the branch, are regressed from the time (and class) embedding c."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = ada(dim, 6)

    def attention(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, 1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """The diffusion Transformer (Peebles & Xie 2023): the image cut into p x p patches, each
    a token by one linear map, plus a fixed 2D sin-cos position embedding; a stack of
    adaLN-Zero blocks conditioned on c = the time embedding (the U-Net's sinusoid, 256
    frequencies, through an MLP) plus the label embedding (one extra row: the null class of
    classifier-free guidance); a final adaLN LayerNorm and a linear map back to the patches'
    pixels, zero-initialised; the patches put back. Called as the U-Net is: (x, t, y)."""

    def __init__(self, cfg):
        super().__init__()
        D, p, C, S = cfg.dit_width, cfg.patch, cfg.channels, cfg.image_size
        self.p, self.C, self.S, self.freq = p, C, S, 256
        self.inp = nn.Linear(C * p * p, D)  # the patch embedding: a conv with kernel = stride = p
        self.register_buffer("pos", sincos_2d(D, S // p, S // p), persistent=False)  # rebuilt from cfg
        self.time = nn.Sequential(nn.Linear(self.freq, D), nn.SiLU(), nn.Linear(D, D))
        self.label = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.dit_heads) for _ in range(cfg.dit_depth)])
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada = ada(D, 2)
        self.out = nn.Linear(D, C * p * p)
        self.init_weights()

    def init_weights(self):
        """DiT's initialisation: Xavier-uniform linear maps with zero biases, N(0, 0.02) for the
        time MLP and the label table, and zeros for every adaLN regression and the output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.time[0], self.time[2]) + ((self.label,) if self.label is not None else ()):
            nn.init.normal_(m.weight, std=0.02)
        for m in [b.ada[-1] for b in self.blocks] + [self.ada[-1], self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def io_layers(self):
        return [self.inp, self.out]

    def forward(self, x, t, y=None):
        c = self.time(timestep_embedding(t, self.freq))
        if self.label is not None:
            c = c + self.label(y)
        h = self.inp(patchify(x, self.p)) + self.pos
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(c).chunk(2, 1)
        h = self.out(modulate(self.norm(h), shift, scale))
        return unpatchify(h, self.p, self.C, self.S, self.S)


# ---- the diffusion ------------------------------------------------------------------------


def make_betas(schedule, T):
    """float64 [T]. linear: DDPM's 1e-4..0.02, scaled by 1000/T so any T spans the same
    noise range (capped at 0.999). cosine: alpha-bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008,
    betas from its ratios, capped at 0.999 so the last step is not pure noise by fiat."""
    if schedule == "linear":  # capped like cosine: at T < 50 the scaled betas would pass 1
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule {schedule!r}: choose linear or cosine")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp() - 1)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) per element for x on the 256-level grid of [-1, 1] (bins 2/255 wide),
    under N(mean, e^(2 log_scale)) integrated over x's bin; the end bins reach to -inf
    and +inf, so the 256 probabilities sum to 1. Computed with log-CDFs on the side of
    the bin's own tail, so a bin far from the mean gets its true small log-probability
    rather than log of a rounded-off zero."""
    inv = torch.exp(-log_scale)
    upper = (x - mean + 1 / 255) * inv
    lower = (x - mean - 1 / 255) * inv
    # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): use whichever pair sits in its lower tail
    flip = (upper + lower) > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    mid = log_hi + torch.log1p(-torch.exp(log_lo - log_hi).clamp(max=1 - 1e-12))
    return torch.where(x < -0.999, torch.special.log_ndtr(upper),
                       torch.where(x > 0.999, torch.special.log_ndtr(-lower), mid))


def check(cfg):
    """Every setting in its range, or a ValueError whose one line says which is not and why."""
    if cfg.arch not in ("unet", "dit"):
        raise ValueError(f"arch {cfg.arch!r}: choose unet or dit")
    if cfg.arch == "dit" and cfg.dropout:
        raise ValueError(f"dropout {cfg.dropout}: the DiT has none (Peebles & Xie train without it); use --dropout 0")
    if not cfg.mults or not all(1 <= m <= 64 for m in cfg.mults):
        raise ValueError(f"mults must list 1 or more multipliers in 1..64 (got {cfg.mults})")
    if not all(r >= 1 for r in cfg.attn_res):
        raise ValueError(f"attn_res must list resolutions of 1 pixel or more, or none (got {cfg.attn_res})")
    levels = len(cfg.mults) - 1
    for name, low, high in (("channels", 1, 256), ("image_size", 2 ** levels if cfg.arch == "unet" else 1, 4096),
                            ("num_classes", 0, 2 ** 20), ("base", 1, 4096), ("num_res_blocks", 0, 64),
                            ("timesteps", 2, 100_000), ("patch", 1, 64), ("dit_depth", 1, 256),
                            ("dit_width", 4, 8192), ("dit_heads", 1, 256)):
        if not low <= getattr(cfg, name) <= high:
            raise ValueError(f"{name} must be in {low}..{high} (got {getattr(cfg, name)})")
    if cfg.arch == "unet" and cfg.image_size % (2 ** levels):
        raise ValueError(f"image_size {cfg.image_size} is not divisible by 2^{levels}: the U-Net halves it "
                         f"{levels} times; use fewer --mults")
    if cfg.arch == "dit" and cfg.image_size % cfg.patch:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the patch {cfg.patch}: the DiT cuts "
                         f"the image into patch x patch squares")
    if cfg.dit_width % 4 or cfg.dit_width % cfg.dit_heads:
        raise ValueError(f"dit_width {cfg.dit_width} must be a multiple of 4 (the 2D position embedding) and of "
                         f"dit_heads {cfg.dit_heads}")
    if cfg.base * max(cfg.mults) > 2 ** 14:
        raise ValueError(f"base x max(mults), the widest level's channels, must be at most {2 ** 14} "
                         f"(got {cfg.base * max(cfg.mults)})")
    if cfg.objective not in ("eps", "x0", "v", "flow") or cfg.variance not in ("small", "large"):
        raise ValueError("objective must be eps, x0, v or flow and variance small or large")
    if cfg.flow_time not in ("logit-normal", "uniform") or cfg.schedule not in ("linear", "cosine"):
        raise ValueError(f"flow_time {cfg.flow_time!r}, schedule {cfg.schedule!r}: choose logit-normal or "
                         f"uniform, and linear or cosine")
    if not 0 <= cfg.p_uncond < 1 or not 0 <= cfg.dropout < 1:
        raise ValueError(f"p_uncond and dropout must be in [0, 1) (got {cfg.p_uncond}, {cfg.dropout})")
    if cfg.objective == "flow" and not 1 <= cfg.sample_steps <= 100_000:
        raise ValueError(f"sample_steps {cfg.sample_steps}: flow samples with Euler over 1..100000 steps")
    if cfg.objective != "flow" and not 0 <= cfg.sample_steps <= cfg.timesteps:
        raise ValueError(f"sample_steps {cfg.sample_steps} must be in 0..timesteps ({cfg.timesteps})")


class Model(nn.Module):
    players = ("model",)

    def __init__(self, cfg):
        super().__init__()
        check(cfg)
        self.flow = cfg.objective == "flow"
        self.cfg = cfg
        self.net = UNet(cfg) if cfg.arch == "unet" else DiT(cfg)
        # The schedule in float64; each coefficient is gathered, then cast to float32, per use.
        betas = make_betas(cfg.schedule, cfg.timesteps)
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)  # beta-tilde; 0 at index 0
        # log beta-tilde with index 0 taken from index 1, so no log 0 anywhere: at index 0
        # the reverse step is the decoder, whose scale this sets (as in improved-diffusion).
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        large_logvar = torch.log(torch.cat([post_var[1:2], betas[1:]]))  # beta, first entry from beta-tilde
        # x_t = a x0 + s eps with a = sqrt(ab) and s = sqrt(1 - ab), both taken in float64:
        # 1 - ab in fp32 would keep only a few digits of s near t = 0, where ab is 0.9999.
        for name, value in dict(betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
                                sqrt_ab=ac.sqrt(), sqrt_1m_ab=(1 - ac).sqrt(),
                                posterior_variance=post_var, posterior_logvar=post_logvar,
                                model_logvar=post_logvar if cfg.variance == "small" else large_logvar,
                                posterior_mean_coef1=betas * ac_prev.sqrt() / (1 - ac),
                                posterior_mean_coef2=(1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)).items():
            self.register_buffer(name, value, persistent=False)  # rebuilt from cfg, never stale

    def io_layers(self):
        """The layers that read the image and write the prediction (train.py: AdamW's under
        --optimizer muon; Muon is for the maps between hidden features)."""
        return self.net.io_layers()

    def _at(self, name, t, x):
        """Schedule coefficient `name` at timesteps t [B], float32, shaped to broadcast over x."""
        return getattr(self, name)[t].float().view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I), given the noise."""
        return self._at("sqrt_ab", t, x0) * x0 + self._at("sqrt_1m_ab", t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x0)."""
        mean = self._at("posterior_mean_coef1", t, xt) * x0 + self._at("posterior_mean_coef2", t, xt) * xt
        return mean, self._at("posterior_variance", t, xt)

    def forward(self, x, y=None, player="model"):
        """The simple loss: MSE between the network's output and its target at a random
        time, a uniform timestep for DDPM's objectives (no clipping here: clipping belongs to
        sampling only), t from cfg.flow_time for flow."""
        B = x.shape[0]
        if self.flow:
            t = (torch.randn(B, device=x.device).sigmoid() if self.cfg.flow_time == "logit-normal"
                 else torch.rand(B, device=x.device))
            noise, tb = torch.randn_like(x), t.view(-1, *([1] * (x.dim() - 1)))
            xt, target, t_in = (1 - tb) * x + tb * noise, noise - x, t * self.cfg.timesteps
        else:
            t = torch.randint(0, self.cfg.timesteps, (B,), device=x.device)
            noise = torch.randn_like(x)
            xt = self.q_sample(x, t, noise)
            a, s = self._at("sqrt_ab", t, x), self._at("sqrt_1m_ab", t, x)
            target, t_in = {"eps": noise, "x0": x, "v": a * noise - s * x}[self.cfg.objective], t
        if self.cfg.num_classes:
            null = torch.full((B,), self.cfg.num_classes, device=x.device)
            y = null if y is None else torch.where(torch.rand(B, device=x.device) < self.cfg.p_uncond, null, y)
        out = self.net(xt, t_in, y if self.cfg.num_classes else None)
        return F.mse_loss(out.float(), target), {}

    def output(self, xt, t, y=None, guidance=None):
        """The network's output at x_t and time input t (an int or [B]), guided: with guidance
        w and a conditional model, out_u + w * (out_c - out_u), where out_u is the output for
        the null label; w = 1 is plain conditional sampling (the neutral scale), 0
        unconditional, above 1 stronger conditioning. y=None: the null label throughout."""
        B = xt.shape[0]
        if self.cfg.num_classes:
            null = torch.full((B,), self.cfg.num_classes, device=xt.device)
            y = null if y is None else y
        else:
            y = None
        tt = torch.full((B,), t, device=xt.device) if isinstance(t, (int, float)) else t
        if guidance is not None and self.cfg.num_classes:
            out = self.net(torch.cat([xt, xt]), torch.cat([tt, tt]), torch.cat([y, null])).float()
            return out[B:] + guidance * (out[:B] - out[B:])  # unconditional + guidance * (conditional - it)
        return self.net(xt, tt, y).float()

    def predict(self, xt, t, y=None, guidance=None, clip=True):
        """(x0-hat, eps-hat) at x_t and timestep t (DDPM's objectives). Guidance mixes the
        conditional and unconditional epsilons as eps_u + guidance * (eps_c - eps_u); the
        mix is taken of the network's outputs (see output), which is the same: each
        objective's (x0, eps) is affine in the output at a fixed x_t (see _x0_eps). With
        clip, x0-hat is clamped to [-1, 1] and eps-hat recomputed from it, so the step stays
        consistent with the clamped prediction."""
        tt = torch.full((xt.shape[0],), t, device=xt.device) if isinstance(t, int) else t
        x0, eps = self._x0_eps(self.output(xt, tt, y, guidance), xt, tt)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (xt - self._at("sqrt_ab", tt, xt) * x0) / self._at("sqrt_1m_ab", tt, xt)
        return x0, eps

    def _x0_eps(self, out, xt, t):
        """(x0-hat, eps-hat) from the network's output `out` at x_t = a x0 + s eps, with
        a = sqrt(ab_t) and s = sqrt(1 - ab_t), each by its own formula from the output:
        x0 is never rebuilt through eps for v or x0, which would subtract two nearly equal
        numbers and divide by a where alpha-bar is tiny (cosine schedule, last steps).
        Both are affine in `out` at a fixed x_t, and an affine map carries the mix
        (1 - w) out_u + w out_c to the same mix of its images: guiding the outputs is
        guiding eps (and x0)."""
        a, s = self._at("sqrt_ab", t, xt), self._at("sqrt_1m_ab", t, xt)
        if self.cfg.objective == "eps":
            return (xt - s * out) / a, out
        if self.cfg.objective == "x0":
            return out, (xt - a * out) / s
        return a * xt - s * out, s * xt + a * out  # v = a eps - s x0

    @torch.no_grad()
    def sample(self, n, steps=None, eta=0.0, y=None, guidance=None, x_T=None, generator=None, progress=None):
        """n images in [-1, 1]. steps=None uses cfg.sample_steps; steps=0 is ancestral
        (DDPM) sampling over all T with the model's variance; otherwise DDIM over `steps`
        respaced timesteps with noise eta (eta=1 over all T is ancestral with beta-tilde).
        The last step returns x0-hat. Flow: Euler over `steps` (see sample_flow), returning
        the ODE's end point, unclamped. y: labels [n] for a conditional model (None: the
        unconditional model); guidance: see output. progress: wraps the step iterator."""
        device = self.betas.device
        shape = (n, self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
        steps = self.cfg.sample_steps if steps is None else steps
        T = self.cfg.timesteps
        if eta is None or eta < 0:
            raise ValueError(f"eta must be 0 or more (got {eta})")
        if guidance is not None and not self.cfg.num_classes:
            raise ValueError("guidance needs a class-conditional model (trained with num_classes > 0)")
        wrap = progress or (lambda it: it)
        if self.flow:
            if eta or steps < 1:
                raise ValueError("flow samples with 1 or more Euler steps (eta is DDIM's)")
            return self.sample_flow(x, steps, y, guidance, wrap)
        if steps == 0:
            return self.sample_ancestral(x, y, guidance, generator, wrap)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T} (0: ancestral)")
        # Evenly spaced from T-1 down to 0: the first step starts from pure noise, the last reaches the data.
        seq = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive().tolist()
        for i in wrap(range(len(seq))):
            t = seq[i]
            x0, eps = self.predict(x, t, y, guidance)
            if i == len(seq) - 1:
                return x0
            ab, ab_prev = float(self.alphas_cumprod[t]), float(self.alphas_cumprod[seq[i + 1]])
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(shape, generator=generator, device=device)
        return x

    def sample_ancestral(self, x, y, guidance, generator, wrap):
        """DDPM: x_{t-1} ~ N(mean of q(x_{t-1} | x_t, x0-hat), the model's variance), no
        noise at the last step (index 0), whose mean is x0-hat itself."""
        for t in wrap(range(self.cfg.timesteps - 1, -1, -1)):
            x0, _ = self.predict(x, t, y, guidance)
            tt = torch.full((x.shape[0],), t, device=x.device)
            x, _ = self.q_posterior(x0, x, tt)
            if t > 0:
                var = self.posterior_variance[t] if self.cfg.variance == "small" else self.model_logvar[t].exp()
                x = x + float(var) ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device)
        return x

    def sample_flow(self, x, steps, y, guidance, wrap):
        """Euler from t = 1 (noise) to t = 0 over `steps` uniform steps, x <- x + (t' - t) v(x, t),
        one network evaluation a step; the last step lands on x0-hat = x_t - t v. (Heun, the
        mean of v at both ends of the step, lost to Euler at 10 and 20 evaluations and tied
        at 50 on digits: docs/experiments.md, flow matching against DDIM.)"""
        T = self.cfg.timesteps
        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        for i in wrap(range(steps)):
            x = x + (ts[i + 1] - ts[i]) * self.output(x, ts[i] * T, y, guidance)
        return x

    @torch.no_grad()
    def nll(self, x, y=None, generator=None):
        """The variational bound on -log p(x) in nats per image (T network passes):
        the prior term KL(q(x_T | x) || N(0, I)), every KL(q(x_{t-1} | x_t, x) || p(x_{t-1} | x_t))
        for t = 2..T at one sample of x_t each, and the discretised-Gaussian decoder
        -log p(x | x_1) on the 8-bit grid. x0-hat is not clipped here: the bound is of the
        model as trained. Noise is drawn for index 0, 1, ..., T-1 in that order. Flow: see
        nll_flow."""
        if self.flow:
            return self.nll_flow(x, y, generator)
        B, T = x.shape[0], self.cfg.timesteps
        total = torch.zeros(B, dtype=torch.float64, device=x.device)
        for t in range(T):
            tt = torch.full((B,), t, device=x.device)
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            xt = self.q_sample(x, tt, noise)
            x0, _ = self.predict(xt, tt, y, clip=False)
            mean, _ = self.q_posterior(x0, xt, tt)
            logvar = self._at("model_logvar", tt, x)
            if t == 0:
                term = -discretized_gaussian_log_likelihood(x, mean, 0.5 * logvar)
            else:
                true_mean, _ = self.q_posterior(x, xt, tt)
                term = normal_kl(true_mean, self._at("posterior_logvar", tt, x), mean, logvar)
            total += term.flatten(1).double().sum(1)
        ab_T = self.alphas_cumprod[-1].float()
        zero = torch.zeros_like(x)
        prior = normal_kl(ab_T.sqrt() * x, torch.log(1 - ab_T).expand_as(x), zero, zero)
        return total + prior.flatten(1).double().sum(1)

    def nll_flow(self, x, y=None, generator=None, steps=None):
        """A bound on -log P(x) in nats per image through the ODE dx/dt = v. x on the 8-bit
        grid is dequantized, x' = x + u with u uniform over its bin (2/255 wide), and
        -log P(x) <= E_u[-log p(x')] - D log(2/255) (Jensen; D values per image). log p(x')
        is exact for the ODE (the instantaneous change of variables, Chen et al. 2018):
        log p_0(x_0) = log N(x_1; 0, I) + the integral over t from 0 to 1 of div v(x_t, t),
        integrated with Heun over `steps` (default T) at t = (i / steps)^3: dense near the
        data, where the field of sharp data changes fastest (its divergence peaks near t = the
        data's spread; on Gaussian data with spreads of 0.005 to 0.025, the worst of 8 images
        is off by 0.29 nats a value with 100 uniform steps, by 0.005 with cubic ones). The
        divergence is Hutchinson's estimate z^T (dv/dx) z, one vector-Jacobian product, with
        one Rademacher z per image held along the path (FFJORD, Grathwohl et al. 2019).
        Draws: u, then z."""
        B, T, D = x.shape[0], self.cfg.timesteps, x[0].numel()
        steps = steps or T
        x = x + (torch.rand(x.shape, generator=generator, device=x.device) - 0.5) * (2 / 255)
        z = torch.randint(0, 2, x.shape, generator=generator, device=x.device).float() * 2 - 1

        def field(x, t):  # (v, z^T dv/dx z) at time t
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = self.output(x, t * T, y)
                vjp, = torch.autograd.grad(v, x, z)
            return v.detach(), (vjp * z).flatten(1).double().sum(1)

        ts = (torch.linspace(0, 1, steps + 1, dtype=torch.float64) ** 3).tolist()
        div = torch.zeros(B, dtype=torch.float64, device=x.device)
        for i in range(steps):
            h = ts[i + 1] - ts[i]
            v1, d1 = field(x, ts[i])
            v2, d2 = field(x + h * v1, ts[i + 1])
            x = x + 0.5 * h * (v1 + v2)
            div += 0.5 * h * (d1 + d2)
        log_prior = -0.5 * x.double().pow(2).flatten(1).sum(1) - 0.5 * D * math.log(2 * math.pi)
        return -(log_prior + div) - D * math.log(2 / 255)
