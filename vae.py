"""
Variational autoencoder (Kingma & Welling 2014): an encoder q(z|x) = N(mu(x), diag
sigma^2(x)), a decoder p(x|z), trained on the evidence lower bound with the
reparameterisation trick; beta-VAE weighting (Higgins et al. 2017) with a linear KL
warm-up; the importance-weighted bound (Burda et al. 2016) for likelihoods; and, as an option,
a learned prior. One file, torch only.

Images: convolutional nets, and p(x|z) a discretised logistic per subpixel (a mixture
of n_mix of them), a probability on the 256 levels of 8-bit data, so -log p is in the
same units as every bits/dim in the literature. 2D points: MLPs and a Gaussian p(x|z).

The prior. N(0, I) by default, where the KL has a closed form. But the encoder does not
spread the training images over N(0, I) (measured on digits: posterior means with a
standard deviation of 1.0 to 1.7 per dimension, not 1), so many prior draws decode to
nothing in particular. With prior_components = K, p(z) is a mixture of K diagonal
Gaussians learned with everything else: the KL term pulls it onto where the encoder
puts the data (as a mixture fitted to the codes after training does, Ghosh et al.
2020), and the samples and the likelihood bound come from one and the same model. The
KL is then estimated from one draw of z, unbiased.

Every log-density here is exact and normalised: the ELBO, and the IWAE bound
log (1/k) sum_i p(x, z_i) / q(z_i | x) computed with logsumexp over the k samples. (Not a
softmax over per-sample losses, which is the gradient weighting, not the bound.)
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
    image_size: int = 28            # image height = width, divisible by 4: 28, 32 (filled from the data)
    point_dim: int = 0              # 2 for 2D points (MLPs, Gaussian decoder); 0 for images (filled from
                                    # the data)
    z_dim: int = 16                 # latent dimensions
    width: int = 32                 # images: channels at full resolution (2x, 4x deeper in); points: 8x
                                    # this is the MLP width
    n_mix: int = 1                  # images: logistic components per subpixel in p(x|z) (1: one discretised
                                    # logistic)
    beta: float = 1.0               # weight of the KL term (beta-VAE); 1 is the ELBO
    kl_warmup: int = 0              # steps over which the KL weight rises linearly from 0 to beta (0: none)
    prior_components: int = 0       # 0: the prior is N(0, I); K > 0: a learned mixture of K diagonal
                                    # Gaussians


PRESETS = {
    # Digits on a 2-core CPU in 20 minutes. The learned prior: classifier IS 8.26 against
    # 5.9 to 6.1 with N(0, I), and 1.84 bits/dim against 1.92 (IWAE, k = 1,000).
    "tiny": dict(z_dim=16, width=32, n_mix=1, prior_components=10, batch_size=64, lr=2e-3, min_lr=1e-4,
                 warmup_iters=100, max_iters=20000, weight_decay=0.0, grad_clip=0.0, eval_interval=1000, eval_iters=4,
                 sample_images=100),
    # 2D points: MLPs 256 wide with a Gaussian decoder (--preset grid25).
    "grid25": dict(data="grid25", z_dim=2, width=32, batch_size=256, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                   max_iters=5000, weight_decay=0.0, grad_clip=0.0, eval_interval=1000, eval_iters=4),
}

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(x, mean, logvar):
    """log N(x; mean, e^logvar) per element."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def log_sigmoid_difference(a, b):
    """log(sigmoid(a) - sigmoid(b)) for a > b, from the exact identity
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b - a)): no difference of two
    rounded probabilities anywhere, so it keeps its digits in both tails and when the bin
    is narrow against the logistic's scale (a close to b)."""
    return F.logsigmoid(a) + F.logsigmoid(-b) + torch.log(-torch.expm1(b - a))


def discretized_logistic_mixture_log_prob(x, logits, means, log_scales):
    """log P(x) per subpixel for x on the 256-level grid of [-1, 1] (bins 2/255 wide), under
    a mixture over the last dimension of logistics integrated over x's bin; the end bins
    reach to -inf and +inf, so the 256 probabilities sum to 1."""
    x = x.unsqueeze(-1)
    inv = torch.exp(-log_scales)
    upper = (x - means + 1 / 255) * inv
    lower = (x - means - 1 / 255) * inv
    log_p = torch.where(x < -0.999, -F.softplus(-upper),          # log sigmoid(upper): bin 0 reaches -inf
                        torch.where(x > 0.999, -F.softplus(lower),  # log(1 - sigmoid(lower)): bin 255 reaches +inf
                                    log_sigmoid_difference(upper, lower)))
    return torch.logsumexp(F.log_softmax(logits, -1) + log_p, -1)


def conv_encoder(cfg):
    w, s = cfg.width, cfg.image_size // 4
    return nn.Sequential(
        nn.Conv2d(cfg.channels, w, 4, 2, 1), nn.SiLU(),        # -> 2s
        nn.Conv2d(w, 2 * w, 4, 2, 1), nn.SiLU(),               # -> s
        nn.Conv2d(2 * w, 4 * w, 3, 1, 1), nn.SiLU(), nn.Flatten(),
        nn.Linear(4 * w * s * s, 2 * cfg.z_dim))


def conv_decoder(cfg):
    w, s = cfg.width, cfg.image_size // 4
    return nn.Sequential(
        nn.Linear(cfg.z_dim, 4 * w * s * s), nn.SiLU(), nn.Unflatten(1, (4 * w, s, s)),
        nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.SiLU(),  # -> 2s
        nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.SiLU(),      # -> 4s
        nn.Conv2d(w, w, 3, 1, 1), nn.SiLU(),
        nn.Conv2d(w, cfg.channels * 3 * cfg.n_mix, 1))        # per subpixel and component: logit, mean, log-scale


def mlp(cin, h, cout):
    return nn.Sequential(nn.Linear(cin, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, cout))


class Model(nn.Module):
    players = ("model",)

    def __init__(self, cfg):
        super().__init__()
        for name, low, high in (("channels", 1, 256), ("point_dim", 0, 4096), ("z_dim", 1, 4096), ("width", 1, 1024),
                                ("n_mix", 1, 64), ("prior_components", 0, 4096), ("kl_warmup", 0, 10 ** 12)):
            if not low <= getattr(cfg, name) <= high:
                raise ValueError(f"{name} must be in {low}..{high} (got {getattr(cfg, name)})")
        if not cfg.point_dim and (cfg.image_size % 4 or not 8 <= cfg.image_size <= 4096):
            raise ValueError(f"image_size {cfg.image_size}: the nets halve it twice, so it must be a "
                             f"multiple of 4 in 8..4096 (28 and 32 work)")
        if not 0 <= cfg.beta < math.inf:
            raise ValueError(f"beta must be a finite number >= 0 (got {cfg.beta})")
        self.cfg = cfg
        if cfg.point_dim:
            self.encoder = mlp(cfg.point_dim, 8 * cfg.width, 2 * cfg.z_dim)
            self.decoder = mlp(cfg.z_dim, 8 * cfg.width, 2 * cfg.point_dim)  # mean and log-variance
        else:
            self.encoder, self.decoder = conv_encoder(cfg), conv_decoder(cfg)
        if cfg.prior_components:
            # Means drawn from N(0, I) so the components start apart, with unit variances
            # and equal weights. They are a density's parameters, not weights: no weight
            # decay, which would pull the prior back towards N(0, I).
            K = cfg.prior_components
            self.prior_means = nn.Parameter(torch.randn(K, cfg.z_dim))
            self.prior_logvars = nn.Parameter(torch.zeros(K, cfg.z_dim))
            self.prior_logits = nn.Parameter(torch.zeros(K))
        # The optimizer step, set by train.py before each step, for the KL warm-up; a tensor,
        # so that torch.compile reads it rather than baking each value into a new graph.
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=False)

    def parameters_of(self, player):
        return self.parameters()

    def no_weight_decay(self):
        """The mixture prior's parameters: a density's, not weights (see __init__)."""
        return [self.prior_means, self.prior_logvars, self.prior_logits] if self.cfg.prior_components else []

    def io_layers(self):
        """The layers that read x and write the decoder's distribution (train.py: AdamW's
        under --optimizer muon; Muon is for the maps between hidden features)."""
        return [self.encoder[0], self.decoder[-1]]

    def encode(self, x):
        """q(z|x): (mean, log-variance), each [B, z_dim]."""
        mean, logvar = self.encoder(x).float().chunk(2, 1)
        return mean, logvar.clamp(-30, 20)

    def log_px(self, x, z):
        """log p(x|z) per example, in nats: a discrete probability for images (8-bit levels),
        a density for points. z may carry extra leading dims [..., B, z_dim]."""
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, z.shape[-1])).float()
        x = x.expand(*lead[:-1], *x.shape).reshape(-1, *x.shape[1:])
        if self.cfg.point_dim:
            mean, logvar = out.chunk(2, 1)
            lp = gaussian_log_density(x, mean, logvar.clamp(-12, 8))
        else:
            B, C, H, W = x.shape
            out = out.view(B, C, 3, self.cfg.n_mix, H, W).permute(0, 1, 4, 5, 2, 3)  # [B, C, H, W, 3, K]
            logits, means, log_scales = out.unbind(-2)
            lp = discretized_logistic_mixture_log_prob(x, logits, means, log_scales.clamp(min=-7))
        return lp.flatten(1).sum(1).view(lead)

    def log_prior(self, z):
        """log p(z) for z [..., z_dim]: N(0, I), or the learned mixture (logsumexp over its
        components, each a product of 1D Gaussians)."""
        if not self.cfg.prior_components:
            return gaussian_log_density(z, 0, torch.zeros_like(z)).sum(-1)
        log_w, means, logvars = self.mixture()
        per = gaussian_log_density(z.unsqueeze(-2), means, logvars).sum(-1)  # [..., K]
        return torch.logsumexp(log_w + per, -1)

    def mixture(self):
        """The learned prior's (log weights [K], means [K, z_dim], log-variances [K, z_dim]) in fp32."""
        return (F.log_softmax(self.prior_logits.float(), -1), self.prior_means.float(),
                self.prior_logvars.float().clamp(-12, 8))

    def kl(self, mean, logvar, z=None):
        """KL(q(z|x) || p(z)) per example in nats: in closed form for the N(0, I) prior;
        for a mixture, E_q[log q] (the Gaussian's negative entropy, exact) minus log p(z)
        at the one draw z from q: unbiased, and less noisy than log q(z|x) at that draw."""
        if not self.cfg.prior_components:
            return 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(1)
        return -0.5 * (LOG_2PI + 1 + logvar).sum(-1) - self.log_prior(z)

    def forward(self, x, y=None, player="model"):
        """Training: -(E_q log p(x|z) - w * KL) with w = beta, ramped up over kl_warmup
        steps; evaluation (eval mode): the plain negative ELBO. Either way in nats per
        dimension of x, so the loss / ln 2 is an upper bound on bits/dim. The log holds
        the reconstruction term and the KL in nats per example."""
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()  # reparameterised: gradients reach the encoder
        rec, kl = -self.log_px(x, z), self.kl(mean, logvar, z)
        w = 1.0
        if self.training:
            ramp = (self.step.float() / self.cfg.kl_warmup).clamp(max=1) if self.cfg.kl_warmup else 1.0
            w = self.cfg.beta * ramp
        loss = (rec + w * kl).mean() / x[0].numel()
        return loss, {"rec": rec.detach().mean(), "kl": kl.detach().mean()}

    @torch.no_grad()
    def elbo(self, x, generator=None):
        """The evidence lower bound on log p(x) per example, one z sample each."""
        mean, logvar = self.encode(x)
        z = mean + torch.randn(mean.shape, generator=generator, device=x.device) * (0.5 * logvar).exp()
        return self.log_px(x, z) - self.kl(mean, logvar, z)

    @torch.no_grad()
    def nll(self, x, y=None, k=1000, chunk=None, generator=None):
        """-log p(x) estimated from above by the IWAE bound with k samples, in nats per
        example: -(logsumexp_i [log p(x|z_i) + log p(z_i) - log q(z_i|x)] - log k), z_i ~ q(z|x).
        Samples are drawn `chunk` at a time (default: about 2048 decodes per pass) and
        combined with a running logsumexp."""
        chunk = chunk or max(1, 2048 // len(x))
        mean, logvar = self.encode(x)
        std = (0.5 * logvar).exp()
        total = None
        for start in range(0, k, chunk):
            m = min(chunk, k - start)
            eps = torch.randn((m, *mean.shape), generator=generator, device=x.device)
            z = mean + eps * std
            log_q = -0.5 * (LOG_2PI + logvar + eps ** 2).sum(-1)  # log N(z; mean, std^2), from eps exactly
            log_w = self.log_px(x, z) + self.log_prior(z) - log_q  # [m, B]
            part = torch.logsumexp(log_w.double(), 0)
            total = part if total is None else torch.logaddexp(total, part)
        return -(total - math.log(k))

    def decode_mean(self, z):
        """The mean of p(x|z): images in [-1, 1], or points."""
        out = self.decoder(z).float()
        if self.cfg.point_dim:
            return out.chunk(2, 1)[0]
        B = z.shape[0]
        C, S, K = self.cfg.channels, self.cfg.image_size, self.cfg.n_mix
        out = out.view(B, C, 3, K, S, S)
        probs = F.softmax(out[:, :, 0], 2)
        return (probs * out[:, :, 1]).sum(2).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n, y=None, temperature=1.0, generator=None):
        """n draws of z from the prior, shown as the decoder's mean (drawing every subpixel's
        own noise as well adds speckle that carries no structure). temperature scales the
        prior's standard deviations (each component's, for a mixture): below 1, fewer
        but more typical samples, as in Glow and NVAE."""
        device = next(self.parameters()).device
        eps = torch.randn(n, self.cfg.z_dim, generator=generator, device=device)
        if not self.cfg.prior_components:
            return self.decode_mean(temperature * eps)
        log_w, means, logvars = self.mixture()
        k = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)
        return self.decode_mean(means[k] + temperature * eps * (0.5 * logvars[k]).exp())

    @torch.no_grad()
    def reconstruct(self, x):
        """The decoder's mean at the encoder's mean."""
        return self.decode_mean(self.encode(x)[0])

    @torch.no_grad()
    def interpolate(self, x_a, x_b, steps=8):
        """[B, steps, ...]: decoder means along the great circle between the encoder means
        of x_a and x_b (spherical: N(0, I)'s mass lies near a sphere, not on the chord;
        straight under a learned mixture prior)."""
        a, b = self.encode(x_a)[0], self.encode(x_b)[0]
        t = torch.linspace(0, 1, steps, device=a.device)[None, :, None]
        cos = F.cosine_similarity(a, b, dim=1).clamp(-1, 1)[:, None, None]
        omega = torch.acos(cos)
        # Where the two are (almost) parallel or opposite the sines vanish: take the chord.
        # So too under a learned mixture prior, whose mass is not on a sphere about 0.
        straight = (omega < 1e-4) | (omega > math.pi - 1e-4) | bool(self.cfg.prior_components)
        s = torch.sin(omega).clamp(min=1e-8)
        wa = torch.where(straight, 1 - t, torch.sin((1 - t) * omega) / s)
        wb = torch.where(straight, t, torch.sin(t * omega) / s)
        z = wa * a[:, None] + wb * b[:, None]
        out = self.decode_mean(z.flatten(0, 1))
        return out.view(a.shape[0], steps, *out.shape[1:])
