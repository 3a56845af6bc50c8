"""
Generative adversarial networks: a generator G(z) against a discriminator D(x)
(Goodfellow et al. 2014), with DCGAN-style convolutional nets for images (Radford et
al. 2016) and MLPs for 2D points; the non-saturating or the hinge loss; spectral norm
in D (Miyato et al. 2018) and the R1 penalty (Mescheder et al. 2018) as options; and a
class-conditional variant with a projection discriminator (Miyato & Koyama 2018) or
with the label concatenated to D's input. One file, torch only.

The two players. Model.players is ("discriminator",) * d_steps + ("generator",):
train.py steps them in that order, each with its own optimizer, calling
forward(x, y, player) for the loss of the player being stepped. The discriminator's
loss takes G's samples without a graph (no gradient reaches G); the generator's loss
backpropagates through D into G, and train.py clears every gradient before the next
player, so that pass never leaks into D's next step.

The latent. z ~ N(0, I) is connected, and G is continuous, so a G that draws several
separate modes (grid25's 25 Gaussians) must also draw points on the paths between them,
and only steep changes of G between the modes' regions of z make those few (Khayatkhoei
et al. 2018). With z_classes, the latent also holds a uniform random category, embedded
and fed to G as a label is: each category can land on one mode, with no path between.
D never sees the category, so the model stays unconditional.

No batch norm anywhere: its statistics depend on how a batch is split, so a run on two
processes (or with gradient accumulation) would differ from one big batch. G
normalises per example instead (GroupNorm), and D relies on spectral norm or nothing.
The one statistic across examples, the optional minibatch std, is taken over small
groups inside a micro-batch, which every split keeps whole.
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
    num_classes: int = 0            # > 0: class-conditional G and D (filled from labelled data); 0:
                                    # unconditional
    point_dim: int = 0              # 2 for 2D points, where both nets are MLPs; 0 for images (filled from
                                    # the data)
    z_dim: int = 64                 # size of the latent z ~ N(0, I)
    width: int = 32                 # images: G has 4x then 2x this many channels, D 2x then 4x; points: 8x
                                    # this is the MLP width
    loss: str = "ns"                # ns (non-saturating, Goodfellow et al.) or hinge
    spectral_norm: bool = True      # spectral norm on every layer of D
    r1: float = 0.0                 # R1 penalty weight gamma: gamma/2 * E |grad_x D(x_real)|^2 (0: off)
    cond: str = "projection"        # conditional D: projection (inner product of a label embedding with D's
                                    # features) or concat (one-hot label channels)
    d_steps: int = 1                # discriminator steps per generator step
    mbstd: int = 0                  # D sees the feature spread within groups of this many examples
                                    # (minibatch std, against collapse; 0: off)
    pac: int = 1                    # D judges packs of this many examples side by side (PacGAN, against
                                    # collapse; unconditional only; 1: off)
    d_lr_mult: float = 1.0          # TTUR (Heusel et al. 2017): D's learning rate is this times --lr
    z_classes: int = 0              # > 0: the latent also holds a uniform random category out of this many,
                                    # which G embeds as it does a label (unconditional only; 0: off)


PRESETS = {
    # Digits on a 2-core CPU in 20 minutes. The minibatch std keeps variety within a class
    # (without it each class collapsed to one prototype); D at twice G's rate (TTUR).
    "tiny": dict(width=32, z_dim=64, mbstd=4, batch_size=64, lr=2e-4, min_lr=2e-4, warmup_iters=0,
                 max_iters=20000, beta1=0.5, beta2=0.999, weight_decay=0.0, grad_clip=0.0, d_lr_mult=2.0,
                 eval_interval=1000, eval_iters=4, ema=0.999, sample_images=100),
    # The 2D mixtures: MLPs, large batches (small ones lose modes). A random category beside z
    # lets G put each on a mode with nothing in between; D at twice G's rate keeps G using z.
    # The LR holds for 70% of the run, then a cosine sharpens the modes; longer runs narrow
    # them. No spectral norm (too smooth for modes 0.05 wide), no R1 (slower). docs/experiments.md: GAN on 2D points.
    "grid25": dict(data="grid25", width=32, z_dim=16, z_classes=100, spectral_norm=False, batch_size=1024,
                   lr=5e-4, d_lr_mult=2.0, min_lr=2.5e-5, lr_hold=0.7, warmup_iters=0, max_iters=6000,
                   beta1=0.5, beta2=0.999, weight_decay=0.0, grad_clip=0.0, eval_interval=2000, eval_iters=1,
                   ema=0.999),
}
PRESETS["ring8"] = dict(PRESETS["grid25"], data="ring8")


def sn(layer, on):
    return nn.utils.parametrizations.spectral_norm(layer) if on else layer


class Generator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        classes = cfg.num_classes or cfg.z_classes  # a label, or the latent's category
        cin = cfg.z_dim * (2 if classes else 1)
        self.embed = nn.Embedding(classes, cfg.z_dim) if classes else None
        if cfg.point_dim:
            h = 8 * cfg.width
            self.net = nn.Sequential(nn.Linear(cin, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                     nn.Linear(h, h), nn.ReLU(), nn.Linear(h, cfg.point_dim))
            return
        w, s = cfg.width, cfg.image_size // 4
        # z -> 4w x s x s -> 2w x 2s x 2s -> image, each upsampling a stride-2 transposed
        # convolution, the last straight to the image's channels, as in DCGAN; GroupNorm
        # rather than batch norm. (A further w-channel layer at full resolution, then a
        # 3x3 conv to the image, doubled G's cost: 60% of a step's time was there.)
        self.net = nn.Sequential(
            nn.Linear(cin, 4 * w * s * s), nn.Unflatten(1, (4 * w, s, s)), nn.GroupNorm(8, 4 * w), nn.ReLU(),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.GroupNorm(8, 2 * w), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, cfg.channels, 4, 2, 1), nn.Tanh())

    def forward(self, z, y=None):
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], 1)
        return self.net(z)


class Logit(nn.Linear):
    """D's last layer, nn.Linear(dim, 1) applied as a matrix-vector product. Through
    F.linear, the weight's gradient summed from R1's double backward and the loss came
    back [1, dim] with strides [1, 1]: the same bytes (a size-1 dim's stride is free), but
    DDP compares strides, so it copied that gradient into its bucket each step, and warned.
    A vector's gradient is laid out as the weight is."""

    def __init__(self, dim):
        super().__init__(dim, 1)

    def forward(self, x):
        return x @ self.weight[0] + self.bias


class Discriminator(nn.Module):
    """A logit per example: high for real. With labels, projection adds <embed(y), phi(x)>
    to the unconditional logit psi(phi(x)); concat feeds one-hot label channels in."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, on = cfg, cfg.spectral_norm
        extra = cfg.num_classes if cfg.num_classes and cfg.cond == "concat" else 0
        if cfg.point_dim:
            h = 8 * cfg.width
            self.features = nn.Sequential(sn(nn.Linear(cfg.pac * cfg.point_dim + extra, h), on), nn.LeakyReLU(0.2),
                                          sn(nn.Linear(h, h), on), nn.LeakyReLU(0.2),
                                          sn(nn.Linear(h, h), on), nn.LeakyReLU(0.2))
            dim = h + (1 if cfg.mbstd else 0)
        else:
            w, s = 2 * cfg.width, cfg.image_size // 4  # DCGAN's D for 28x28: 64 then 128 channels
            self.features = nn.Sequential(
                sn(nn.Conv2d(cfg.pac * cfg.channels + extra, w, 4, 2, 1), on), nn.LeakyReLU(0.2),
                sn(nn.Conv2d(w, 2 * w, 4, 2, 1), on), nn.LeakyReLU(0.2), nn.Flatten())
            dim = 2 * w * s * s + (1 if cfg.mbstd else 0)
        self.head = sn(Logit(dim), on)
        self.embed = sn(nn.Embedding(cfg.num_classes, dim), on) \
            if cfg.num_classes and cfg.cond == "projection" else None

    def forward(self, x, y=None, parts=1):
        """A logit per example, or per pack of cfg.pac consecutive examples. parts: x is
        that many equal batches concatenated (real, then fake), which the minibatch std
        (and the packing, when each part is a multiple of pac) keeps apart."""
        if self.cfg.pac > 1:
            # PacGAN (Lin et al. 2018): pac examples side by side as one input, as channels
            # (images) or coordinates (points). A pack of samples from a generator that has
            # dropped modes looks unlike a pack of real examples even when each sample alone
            # is convincing, so D can penalise the dropping.
            x = x.reshape(x.shape[0] // self.cfg.pac, self.cfg.pac * x.shape[1], *x.shape[2:])
        if self.cfg.num_classes and self.cfg.cond == "concat":
            onehot = F.one_hot(y, self.cfg.num_classes).to(x.dtype)
            planes = onehot[:, :, None, None].expand(-1, -1, *x.shape[2:]) if x.dim() == 4 else onehot
            x = torch.cat([x, planes], 1)
        phi = self.features(x)
        if self.cfg.mbstd:
            phi = torch.cat([phi, self.minibatch_std(phi, parts)], 1)
        logit = self.head(phi)
        if self.embed is not None:
            logit = logit + (self.embed(y) * phi).sum(1)
        return logit


    def minibatch_std(self, phi, parts=1):
        """[B, 1]: for each group of consecutive examples, the standard deviation of every
        feature across the group, averaged (Karras et al. 2018). A generator that ignores z
        gives groups with no spread, which D can then tell from real ones. The group size
        is mbstd, or the largest divisor of it that divides the size of each of the
        `parts` (real and fake), so no group holds both: keep the batch size a multiple
        of mbstd, as at a group size of 1 the feature is a constant."""
        B = phi.shape[0]
        g = math.gcd(B // parts, self.cfg.mbstd)
        groups = phi.float().view(B // g, g, -1)
        # The variance written out: torch's var over this middle dimension took 27% of a
        # training step on CPU (35 ms), the mean of squared deviations 2.5 ms.
        var = (groups - groups.mean(1, keepdim=True)).square().mean(1)
        spread = var.add(1e-8).sqrt().mean(1)
        return spread.repeat_interleave(g)[:, None].to(phi.dtype)


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.loss not in ("ns", "hinge") or cfg.cond not in ("projection", "concat"):
            raise ValueError("loss must be ns or hinge, and cond projection or concat")
        for name, low, high in (("channels", 1, 256), ("num_classes", 0, 2 ** 20), ("point_dim", 0, 4096),
                                ("z_dim", 1, 4096), ("width", 8, 1024), ("d_steps", 1, 64), ("pac", 1, 64),
                                ("z_classes", 0, 2 ** 20)):
            if not low <= getattr(cfg, name) <= high:
                raise ValueError(f"{name} must be in {low}..{high} (got {getattr(cfg, name)})")
        if not cfg.point_dim and (cfg.image_size % 4 or not 8 <= cfg.image_size <= 4096):
            raise ValueError(f"image_size {cfg.image_size}: the nets upsample twice by 2, so it must be "
                             f"a multiple of 4 in 8..4096 (28 and 32 work)")
        if cfg.z_classes and cfg.num_classes:
            raise ValueError("z_classes must be 0 for a class-conditional model (its label already takes G's "
                             "embedding; --num-classes 0 trains unconditionally)")
        if cfg.pac > 1 and cfg.num_classes:
            raise ValueError("pac must be 1 for a class-conditional model (a pack has no one label; --num-classes 0 "
                             "trains unconditionally)")
        if cfg.width % 8 or cfg.mbstd < 0 or not 0 <= cfg.r1 < math.inf or not 0 < cfg.d_lr_mult < math.inf:
            raise ValueError(f"width must be a multiple of 8, mbstd >= 0, r1 a finite number >= 0 and d_lr_mult > 0 "
                             f"(got {cfg.width}, {cfg.mbstd}, {cfg.r1}, {cfg.d_lr_mult})")
        self.cfg = cfg
        self.players = ("discriminator",) * cfg.d_steps + ("generator",)
        self.lr_mult = {"discriminator": cfg.d_lr_mult}
        self.batch_multiple = cfg.pac  # train.py: each micro-batch must split into whole packs
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)

    def parameters_of(self, player):
        return (self.discriminator if player == "discriminator" else self.generator).parameters()

    def io_layers(self):
        """The layers that read z or the data and write images or logits (train.py: AdamW's
        under --optimizer muon; Muon is for the maps between hidden features)."""
        g = [m for m in self.generator.net if isinstance(m, (nn.Linear, nn.ConvTranspose2d))]
        return [g[0], g[-1], self.discriminator.features[0], self.discriminator.head]

    def forward(self, x, y=None, player="generator"):
        """The loss of `player` on a batch of real x (labels y), with fresh z."""
        y = y if self.cfg.num_classes else None
        B = x.shape[0]
        z = torch.randn(B, self.cfg.z_dim, device=x.device)
        # G's label input: the data's label, or the latent's random category (D never sees it).
        g_in = torch.randint(0, self.cfg.z_classes, (B,), device=x.device) if self.cfg.z_classes else y
        if player == "generator":
            logit = self.discriminator(self.generator(z, g_in), y)
            # Non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z))),
            # whose gradient vanishes exactly when D wins, early in training.
            loss = F.softplus(-logit).mean() if self.cfg.loss == "ns" else -logit.mean()
            return loss, {}
        with torch.no_grad():
            fake = self.generator(z, g_in)
        penalise = self.cfg.r1 > 0 and torch.is_grad_enabled()  # not under evaluation's no_grad
        real = x.detach().requires_grad_(penalise)
        # One pass over real and fake together: one power iteration of spectral norm per step.
        both = None if y is None else torch.cat([y, y])
        logit = self.discriminator(torch.cat([real, fake.to(real.dtype)]), both, parts=2)
        lr, lf = logit[:B // self.cfg.pac].float(), logit[B // self.cfg.pac:].float()
        if self.cfg.loss == "ns":  # -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
            loss = F.softplus(-lr).mean() + F.softplus(lf).mean()
        else:
            loss = F.relu(1 - lr).mean() + F.relu(1 + lf).mean()
        if penalise:
            # create_graph: the penalty's own gradient w.r.t. D's weights is what trains D.
            grad, = torch.autograd.grad(lr.sum(), real, create_graph=True)
            # Per D input: with packing, the gradient with respect to the whole pack.
            loss = loss + self.cfg.r1 / 2 * grad.float().pow(2).reshape(B // self.cfg.pac, -1).sum(1).mean()
        return loss, {}

    @torch.no_grad()
    def sample(self, n, y=None, z=None, temperature=1.0, generator=None):
        """n images in [-1, 1] (or 2D points). y: labels [n] for a conditional model, or
        the latent's categories under z_classes (None: uniform random ones). z: the
        latents [n, z_dim] (None: drawn from N(0, temperature^2 I); below 1 trades variety
        for quality, like BigGAN's truncation)."""
        device = next(self.parameters()).device
        if z is None:
            z = temperature * torch.randn(n, self.cfg.z_dim, generator=generator, device=device)
        classes = self.cfg.num_classes or self.cfg.z_classes
        if not classes:
            y = None
        elif y is None:
            y = torch.randint(0, classes, (n,), generator=generator, device=device)
        return self.generator(z.to(device), y).float()
