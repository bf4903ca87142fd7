"""What makes a VQ-VAE a VQGAN (taming-transformers): a patch-GAN discriminator whose loss is
weighted adaptively against the reconstruction loss, switched on after a delay, and an optional
perceptual loss.

The generator is the VQ-VAE itself (tokenizers/vqvae.py: the same encoders, decoders, EMA codebook
and file), so everything that reads a tokenizer reads a VQGAN; only training differs
(train_vqvae.py with kind "vqgan"):

    L_G = recon + commitment_cost * commitment + perceptual_weight * perceptual
          + disc_factor(step) * lambda * (-D(x')),          hinge generator loss
    lambda = disc_weight * ||grad_w L_rec|| / (||grad_w L_gan|| + 1e-4), clamped to [0, 1e4],
             w = the decoder's last layer (taming's adaptive weight, eq. 7 of Esser et al. 2021)
    L_D = disc_factor(step) * (mean(relu(1 - D(x))) + mean(relu(1 + D(x')))) / 2

disc_factor is 0 before `disc_start` steps and 1 from it: the autoencoder first learns to
reconstruct, then the discriminator sharpens what it reconstructs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GANConfig:
    disc_start: int = 1000            # training steps before the discriminator counts
    disc_weight: float = 0.8          # taming's default
    disc_channels: int = 64
    disc_layers: int = 3              # stride-2 layers: receptive field 70 px at 3 (pix2pix)
    disc_lr: float | None = None      # None: the generator's
    perceptual_weight: float = 0.0    # 0: no perceptual loss (feature_net.py when > 0)
    feature_steps: int = 600          # training steps of the perceptual feature network

    def __post_init__(self):
        if self.disc_start < 0 or self.disc_layers < 1 or self.disc_channels < 8:
            raise ValueError("vqgan: --vqgan-disc-start must be >= 0, --vqgan-disc-layers >= 1 and "
                             "--vqgan-disc-channels >= 8")
        if self.disc_weight < 0 or self.perceptual_weight < 0:
            raise ValueError("vqgan: --vqgan-disc-weight and --vqgan-perceptual-weight must be >= 0")
        if self.disc_lr is not None and not self.disc_lr > 0:
            raise ValueError(f"vqgan: --vqgan-disc-lr must be positive, got {self.disc_lr}")

    def to_dict(self) -> dict:
        return asdict(self)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: images [B, 3, H, W] -> a map of real/fake logits [B, 1, h, w], each of
    a patch of the image. GroupNorm instead of BatchNorm, so that a logit does not depend on the
    other images of the batch (nor on how a batch is split over data-parallel ranks)."""

    def __init__(self, c: GANConfig, in_channels: int = 3):
        super().__init__()
        ch = c.disc_channels
        layers = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, c.disc_layers + 1):
            c_in, c_out = ch * min(2 ** (i - 1), 8), ch * min(2 ** i, 8)
            stride = 2 if i < c.disc_layers else 1  # the last one keeps the resolution
            layers += [nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1),
                       nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch * min(2 ** c.disc_layers, 8), 1, 4, stride=1, padding=1))
        self.blocks = nn.Sequential(*layers)
        for m in self.modules():  # taming's init: N(0, 0.02) convolutions
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def disc_factor(step: int, start: int) -> float:
    """1 once `step` (1-based, the step being taken) is past `start` steps, else 0."""
    return 1.0 if step > start else 0.0


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float, average=None) -> torch.Tensor:
    """disc_weight * ||d rec / d w|| / (||d gan / d w|| + 1e-4), clamped to [0, 1e4], no gradient.
    `average` (data-parallel training) turns a rank's gradient into the global batch's, so that
    every rank weighs with the same lambda, the one a single process would."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    if average is not None:
        g_rec, g_gan = average(g_rec), average(g_gan)
    weight = g_rec.norm() / (g_gan.norm() + 1e-4)
    return (weight.clamp(0.0, 1e4) * disc_weight).detach()
