"""A small image feature network trained here, self-supervised, on the user's own images.

Perceptual losses (LPIPS) and FID use networks trained on ImageNet (VGG, Inception) whose weights
cannot be downloaded here, and which say little about a domain of one's own anyway. This network
learns on any unlabelled images by predicting which of four rotations (0, 90, 180, 270 degrees) an
image was given: to tell them apart it must see edges, textures and the layout of objects, which
is what a perceptual distance needs (Gidaris et al., 2018, "Unsupervised representation learning
by predicting image rotations").

    x [B,3,S,S] in [0,1] -> 4 stages of (3x3 conv, GroupNorm, ReLU) with 2x average pooling between
    them -> stage activations (the perceptual loss compares them) -> global mean of the last stage
    [B, 128] -> linear -> 4 rotation logits

The FID/KID features (`forward`) are every stage's channel means and standard deviations over
positions [B, 704]: texture statistics, so that blur, noise and lost detail move them (the last
stage's means alone barely see a 5-pixel blur: FID 0.003 against 0.08 with the statistics, on
held-out photo crops).

Two uses, kept apart: the VQGAN's optional perceptual loss trains its own instance on the
tokenizer's training images; the tokenizer comparison's FID trains another, on different images
with another seed, so a tokenizer is not scored by the network it was trained against.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_t2i.io_utils import write_torch_atomic
from megatron_t2i.progress import progress_bar
from megatron_t2i.safe_load import check_state_dict, load_torch_file

FORMAT = "megatron_t2i.feature_net/1"
CHANNELS = (32, 64, 128, 128)


class FeatureNet(nn.Module):
    def __init__(self):
        super().__init__()
        stages, c_in = [], 3
        for c in CHANNELS:
            stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU(),
                                        nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU()))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(CHANNELS[-1], 4)
        self.num_features = 2 * sum(CHANNELS)  # what torchmetrics' FID/KID read

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pixels [B, 3, S, S] in [0, 1] -> the activations of each stage."""
        h, out = (x - 0.5) / 0.25, []
        for i, stage in enumerate(self.stages):
            h = stage(F.avg_pool2d(h, 2) if i else h)
            out.append(h)
        return out

    def pooled(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, 128]
        return self.stage_outputs(x)[-1].mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, 704]
        return torch.cat([torch.cat([h.mean((2, 3)), h.std((2, 3))], 1)
                          for h in self.stage_outputs(x.float())], 1)


def perceptual_distance(net: FeatureNet, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS' form without its learned channel weights: the mean over stages of the squared
    distance between channel-normalised activations of a and b (pixels in [0, 1])."""
    total = 0.0
    for fa, fb in zip(net.stage_outputs(a), net.stage_outputs(b)):
        fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
        fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
        total = total + (fa - fb).pow(2).sum(1).mean()
    return total / len(net.stages)


def train_feature_net(pixels: torch.Tensor, steps: int = 600, batch_size: int = 32,
                      lr: float = 2e-3, seed: int = 0, progress: bool = True,
                      device="cpu") -> tuple[FeatureNet, float]:
    """Train on uint8 images [N, 3, S, S] by rotation prediction; -> (network in eval mode with
    frozen weights, rotation accuracy on its last batches)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = FeatureNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    correct = seen = 0
    net.train()
    for step in progress_bar(range(steps), desc="feature network", unit="step", disable=not progress):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=gen)
        rot = torch.randint(0, 4, (batch_size,), generator=gen)
        x = torch.stack([torch.rot90(p, int(k), (1, 2)) for p, k in zip(pixels[idx], rot)])
        logits = net.head(net.pooled(x.to(device).float() / 255))
        loss = F.cross_entropy(logits, rot.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps - 50:
            correct += (logits.argmax(1).cpu() == rot).sum().item()
            seen += batch_size
    net.eval().requires_grad_(False)
    return net, correct / max(seen, 1)


def save_feature_net(net: FeatureNet, path: str, accuracy: float) -> None:
    write_torch_atomic(path, {"format": FORMAT, "rotation_accuracy": accuracy,
                              "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}})


def load_feature_net(path: str, device="cpu") -> FeatureNet:
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a feature network of format {FORMAT}")
    net = FeatureNet()
    check_state_dict(ckpt["state_dict"], net.state_dict(), path)
    net.load_state_dict(ckpt["state_dict"])
    return net.to(device).eval().requires_grad_(False)
