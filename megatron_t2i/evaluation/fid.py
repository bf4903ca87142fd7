"""FID and KID between generated and held-out images, with feature networks trained here.

FID's usual Inception-v3 weights cannot be downloaded here, and ImageNet features say little
about flat shapes anyway, so the distance is taken in the space of a network trained on the data's
own kind of images (torchmetrics computes both figures from any feature module):
  - "reader": the evaluation reader's class scores of each of the nine cells of the picture
    (9 x 20 values: occupancy, colour, kind, size and background per cell), so layout counts;
  - "clip": the unit image embedding of the CLIP trained here (tokenizers/clip.py), when the
    checkpoint has one.
Figures in one feature space are comparable with each other only (the report names the network);
FID is biased upwards for small sets, KID (polynomial-kernel MMD, mean and spread over subsets)
is not, so both are reported with the image counts.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

KID_SUBSETS = 50
KID_SUBSET_SIZE = 100


class ReaderFeatures(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> the reader's per-cell class scores, flattened [B, 9*20]."""

    def __init__(self, reader):
        super().__init__()
        self.reader = reader.eval()
        self.num_features = 9 * reader.head.out_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cells = self.reader.cells(images.float())                         # [B, 9, 3, R, R]
        logits = self.reader.classify(cells.flatten(0, 1))                # per head [B*9, n]
        return torch.cat(list(logits.values()), dim=-1).view(images.shape[0], -1)


class ClipFeatures(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> the CLIP's unit image embeddings [B, D]."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.num_features = clip.config.embed_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.clip.config.image_size
        if images.shape[-1] != s:
            images = F.interpolate(images.float(), size=(s, s), mode="bicubic", antialias=True)
        return self.clip.encode_pixels((images * 255).round().clamp(0, 255).byte()).float()


@torch.no_grad()
def fid_kid(features: nn.Module, real: torch.Tensor, fake: torch.Tensor,
            batch_size: int = 256) -> dict:
    """FID and KID of the images `fake` against `real` ([N, 3, H, W] in [0, 1] each)."""
    # subsets of at most half of each side, so that they differ and their spread means something
    size = min(KID_SUBSET_SIZE, len(real) // 2, len(fake) // 2)
    if size < 2:
        raise ValueError(f"FID/KID need at least 4 images on each side, got {len(real)} real "
                         f"and {len(fake)} generated")
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    with warnings.catch_warnings():  # that KID keeps every feature row: a few thousand here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=features, normalize=True, subsets=KID_SUBSETS,
                                      subset_size=size)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].float()
            fid.update(chunk, real=is_real)
            kid.update(chunk, real=is_real)
    with torch.random.fork_rng():  # KID draws its subsets with torch's generator: fixed here
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item(),
            "real": len(real), "generated": len(fake), "kid_subset_size": size}
