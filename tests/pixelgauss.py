"""A deliberately tiny image model for the tests: an independent Gaussian per pixel,
with the discretised likelihood of 8-bit data. It follows the model contract
(README.md), so train.py, sample grids and metrics.py can be exercised in seconds."""
from dataclasses import dataclass

import torch
import torch.nn as nn

DATA = "digits"


@dataclass
class Config:
    channels: int = 1      # filled from the data
    image_size: int = 28   # filled from the data (no num_classes: the model ignores labels)


PRESETS = {"tiny": dict(batch_size=64, lr=3e-2, warmup_iters=0, max_iters=60, eval_interval=30, eval_iters=2)}


class Model(nn.Module):
    players = ("model",)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        self.mean = nn.Parameter(torch.zeros(shape))
        self.log_std = nn.Parameter(torch.zeros(shape))

    def parameters_of(self, player):
        return self.parameters()

    def forward(self, x, y=None, player="model"):
        return self.nll(x).mean() / x[0].numel(), {}  # nats per dimension

    def nll(self, x, y=None):
        """-log P(x) in nats per image, x on the 256-level grid of [-1, 1]: each pixel's
        probability is the Gaussian mass of its bin, the end bins reaching to infinity."""
        std = self.log_std.exp()
        hi = torch.where(x > 0.999, torch.inf, (x + 1 / 255 - self.mean) / std)
        lo = torch.where(x < -0.999, -torch.inf, (x - 1 / 255 - self.mean) / std)
        p = torch.special.ndtr(hi) - torch.special.ndtr(lo)
        return -p.clamp(min=1e-12).log().flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n, y=None):
        noise = torch.randn(n, *self.mean.shape, device=self.mean.device)
        return (self.mean + self.log_std.exp() * noise).clamp(-1, 1)
