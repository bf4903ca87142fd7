"""The attribute reader: a small CNN that reads back, from pixels, what a synthetic caption names.

An image of the embedded default data set (megatron_t2i/data/synthetic.py) is a background colour
and at most one shape per cell of a 3x3 grid. The reader cuts an image into its nine cells and
classifies each one with the same small CNN:

    image [B, 3, H, W] in [0, 1] -> resize to 3R x 3R -> 9 cells [B*9, 3, R, R]
        -> CNN -> per cell: occupied (2), colour (8), kind (5), size (2), background (4)

The background of the image is the average of its nine cells' background log-probabilities (every
cell shows some background). The output is an `attributes` dict in the format of
synthetic.make_example, so a reading compares field by field with a caption's ground truth.

Training data is unlimited and free: make_example at the reader's own seed (never a data set's
seed by default), augmented with shifts, blur, noise and colour jitter, and, when an image
tokenizer is given, partly replaced by its reconstructions, so that the reader also reads the
blurred pictures a VQ-VAE decodes. Training is deterministic given the config; the trained reader
is cached on disk (`load_or_train`), keyed by its config and the tokenizer's hash.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_t2i.data.synthetic import BACKGROUNDS, COLOURS, KINDS, POSITIONS, SIZES, make_example
from megatron_t2i.io_utils import dataclass_from_dict, write_torch_atomic
from megatron_t2i.progress import progress_bar
from megatron_t2i.safe_load import load_torch_file

FORMAT = "megatron_t2i.attribute_reader/1"
READER_SEED = 314159  # seed of the reader's own synthetic images

COLOUR_NAMES, BACKGROUND_NAMES, SIZE_NAMES = list(COLOURS), list(BACKGROUNDS), list(SIZES)
HEADS = {"occupied": 2, "colour": len(COLOUR_NAMES), "kind": len(KINDS), "size": len(SIZE_NAMES),
         "background": len(BACKGROUND_NAMES)}
IGNORE = -100  # label of a head that does not apply (the colour of an empty cell)


@dataclass(frozen=True)
class ReaderConfig:
    image_size: int = 64       # side of the images it is trained on (others are resized to it)
    cell_pixels: int = 16      # each grid cell is resampled to R x R pixels (a multiple of 8)
    channels: int = 16         # width of the CNN
    steps: int = 700           # optimiser steps
    batch_size: int = 32       # images per step (x9 cells)
    lr: float = 3e-3
    pool_size: int = 4000      # distinct training images, drawn from make_example
    reconstructed: float = 0.5  # share of the pool replaced by tokenizer reconstructions (if any)
    augment: bool = True
    seed: int = READER_SEED

    def __post_init__(self):
        if self.cell_pixels <= 0 or self.cell_pixels % 8:
            raise ValueError(f"reader config: cell_pixels must be a positive multiple of 8 (three "
                             f"halvings), got {self.cell_pixels}")
        if not 0.0 <= self.reconstructed <= 1.0:
            raise ValueError(f"reader config: reconstructed is a share in [0, 1], got "
                             f"{self.reconstructed}")
        if self.image_size < 8:
            raise ValueError(f"reader config: image_size must be at least 8, got {self.image_size}")
        if self.pool_size < self.batch_size:
            raise ValueError(f"reader config: pool_size {self.pool_size} is smaller than one batch "
                             f"({self.batch_size})")

    def key(self, tokenizer_sha256: str | None) -> str:
        """Short hash naming a trained reader: same config + same tokenizer = same weights."""
        blob = json.dumps([asdict(self), tokenizer_sha256], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- the network ---------------------------------------------------------------------------------
class AttributeReader(nn.Module):
    def __init__(self, config: ReaderConfig):
        super().__init__()
        self.config = config
        c = config.channels

        def conv(cin, cout):  # batch norm: converges in a few hundred steps
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.MaxPool2d(2)]

        # conv + halve, three times: R -> R/8; one conv per scale keeps training within minutes
        self.features = nn.Sequential(
            *conv(3, c), *conv(c, 2 * c), *conv(2 * c, 2 * c),
            nn.Flatten(), nn.Linear(2 * c * (config.cell_pixels // 8) ** 2, 96), nn.ReLU())
        self.head = nn.Linear(96, sum(HEADS.values()))

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the nine cells [B, 9, 3, R, R], row-major."""
        r = self.config.cell_pixels
        x = F.interpolate(images.float(), size=(3 * r, 3 * r), mode="bilinear", antialias=True,
                          align_corners=False)
        b = x.shape[0]
        return x.view(b, 3, 3, r, 3, r).permute(0, 2, 4, 1, 3, 5).reshape(b, 9, 3, r, r)

    def classify(self, cells: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cells [N, 3, R, R] in [0, 1] -> logits per head [N, n] (background per cell)."""
        # centre the pixels: a fixed shift keeps the first layer's inputs around zero
        logits = self.head(self.features(cells - 0.5))
        return dict(zip(HEADS, logits.split(list(HEADS.values()), dim=-1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, H, W] in [0, 1] -> logits per head: cell heads [B, 9, n], and the image's
        background log-probabilities [B, 4] (the mean over its cells)."""
        cells = self.cells(images)
        logits = self.classify(cells.flatten(0, 1))
        out = {k: v.unflatten(0, cells.shape[:2]) for k, v in logits.items()}
        out["background"] = out["background"].log_softmax(-1).mean(1)
        return out

    @torch.no_grad()
    def read(self, images, batch_size: int = 256) -> list[dict]:
        """Images (PIL list or [B, 3, H, W] in [0, 1]) -> one attributes dict per image, as
        make_example writes them: {"background", "shapes": [{colour, kind, size, row, col,
        position}, ...]} (shapes in row-major cell order; no "language")."""
        self.eval()
        x = to_tensor(images)
        device = next(self.parameters()).device
        found = []
        for start in range(0, x.shape[0], batch_size):
            out = self(x[start:start + batch_size].to(device))
            pick = {name: logits.argmax(-1).cpu() for name, logits in out.items()}
            for i in range(pick["background"].shape[0]):
                shapes = []
                for cell in range(9):
                    if pick["occupied"][i, cell]:
                        row, col = divmod(cell, 3)
                        shapes.append({"colour": COLOUR_NAMES[pick["colour"][i, cell]],
                                       "kind": KINDS[pick["kind"][i, cell]],
                                       "size": SIZE_NAMES[pick["size"][i, cell]],
                                       "row": row, "col": col, "position": POSITIONS[row][col]})
                found.append({"background": BACKGROUND_NAMES[pick["background"][i]],
                              "shapes": shapes})
        return found


def to_tensor(images) -> torch.Tensor:
    """A list of PIL images (one size) or a [B, 3, H, W] tensor -> float [B, 3, H, W] in [0, 1]."""
    if torch.is_tensor(images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images of different sizes: {sorted({a.shape[:2] for a in arrays})}")
    if not arrays:
        return torch.zeros(0, 3, 1, 1)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


# ---- labels and training data --------------------------------------------------------------------
def labels(attributes: dict) -> dict[str, torch.Tensor]:
    """Ground-truth attributes -> targets: cell heads [9] (IGNORE where empty), background [1]."""
    t = {name: torch.full((9,), IGNORE, dtype=torch.long) for name in ("colour", "kind", "size")}
    t["occupied"] = torch.zeros(9, dtype=torch.long)
    for s in attributes["shapes"]:
        cell = 3 * s["row"] + s["col"]
        t["occupied"][cell] = 1
        t["colour"][cell] = COLOUR_NAMES.index(s["colour"])
        t["kind"][cell] = KINDS.index(s["kind"])
        t["size"][cell] = SIZE_NAMES.index(s["size"])
    t["background"] = torch.tensor([BACKGROUND_NAMES.index(attributes["background"])])
    return t


def training_pool(config: ReaderConfig, tokenizer=None, progress: bool = True):
    """-> (images uint8 [N, 3, S, S], targets {head: [N, 9] or [N]}) from make_example at the
    reader's seed; with a tokenizer, a share of the images replaced by its reconstructions."""
    n, s = config.pool_size, config.image_size
    images, targets = [], []
    for index in progress_bar(range(n), desc="reader training images", unit="img",
                              disable=not progress):
        ex = make_example(index, config.seed, s)
        images.append(np.asarray(ex.image))
        targets.append(labels(ex.attributes))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # [N, 3, S, S]
    targets = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
    targets["background"] = targets["background"].squeeze(1)
    if tokenizer is not None and config.reconstructed > 0:
        # every k-th image becomes its reconstruction, k = 1 / share rounded
        chosen = torch.arange(0, n, max(1, round(1 / config.reconstructed)))
        pixels[chosen] = reconstruct(tokenizer, pixels[chosen], s, progress)
    return pixels, targets


@torch.no_grad()
def reconstruct(tokenizer, pixels: torch.Tensor, image_size: int, progress: bool = True,
                batch_size: int = 64) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> the tokenizer's encode-decode round trip, uint8 [N, 3, S, S]."""
    out = []
    for start in progress_bar(range(0, pixels.shape[0], batch_size),
                              desc="tokenizer reconstructions", unit="batch", disable=not progress):
        x = pixels[start:start + batch_size].float() / 255
        x = resize(x, tokenizer.image_size)
        codes = tokenizer.encode_images(tokenizer.normalize(x))
        y = resize(tokenizer.decode_to_tensor(codes), image_size)
        out.append((y * 255).round().clamp(0, 255).byte())
    return torch.cat(out)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] float -> [B, 3, size, size] (antialiased bilinear; unchanged if already so)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def gaussian_kernel(sigma: float, radius: int, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of 2*radius+1 taps."""
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [B, C, H, W] (separable, edges replicated)."""
    r, c = math.ceil(2.5 * sigma), x.shape[1]
    k = gaussian_kernel(sigma, r, x.dtype)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def augment(x: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Per image, [B, 3, S, S] in [0, 1]: a shift of up to S/32 pixels, a Gaussian blur (sigma up
    to S/48), a per-channel gain and offset, and pixel noise -- the ways a decoded sample departs
    from a clean render, none large enough to change a colour name or move a shape out of its
    cell."""
    b, _, s, _ = x.shape
    pad = max(1, s // 32)
    padded = F.pad(x, (pad,) * 4, mode="replicate")
    out = torch.empty_like(x)
    for i in range(b):
        dy, dx = rng.integers(0, 2 * pad + 1, size=2)
        img = padded[i:i + 1, :, dy:dy + s, dx:dx + s]
        sigma = rng.uniform(0, s / 48)
        out[i] = (blur(img, sigma) if sigma > 0.3 else img)[0]
    gain = 1 + 0.08 * (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1)
    offset = 0.04 * (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1)
    noise = torch.randn(out.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.06
    return (out * gain + offset + noise).clamp(0, 1)


def cell_batch(model: AttributeReader, x: torch.Tensor, targets: dict,
               rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    """The cells of images x [B, 3, S, S] worth training on: every occupied cell and as many
    empty ones (most cells are empty; they teach little beyond "empty" and the background)
    -> (cells [N, 3, R, R], per-cell targets {head: [N]})."""
    cells = model.cells(x).flatten(0, 1)                                       # [B*9, 3, R, R]
    per_cell = {k: v.flatten() for k, v in targets.items() if k != "background"}
    per_cell["background"] = targets["background"].repeat_interleave(9)         # [B*9]
    occupied = per_cell["occupied"].nonzero().squeeze(1).numpy()
    empty = (per_cell["occupied"] == 0).nonzero().squeeze(1).numpy()
    keep = np.concatenate([occupied, rng.choice(empty, min(len(empty), max(len(occupied), 8)),
                                                replace=False)])
    keep = torch.from_numpy(keep)
    return cells[keep], {k: v[keep] for k, v in per_cell.items()}


def loss_fn(logits: dict, targets: dict) -> torch.Tensor:
    """Sum of the heads' cross entropies over the cells they apply to."""
    return sum(F.cross_entropy(logits[name], targets[name], ignore_index=IGNORE) for name in HEADS)


def train_reader(config: ReaderConfig = ReaderConfig(), tokenizer=None,
                 progress: bool = True) -> AttributeReader:
    """Train a reader from scratch on the CPU; the same config (and tokenizer) gives the same
    weights. One thread: convolutions this small gain nothing from more, and on a busy machine
    threads waiting for each other make training several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, tokenizer, progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: ReaderConfig, tokenizer, progress: bool) -> AttributeReader:
    pixels, targets = training_pool(config, tokenizer, progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = AttributeReader(config).train()
    rng = np.random.default_rng([config.seed, 1])
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps,
                                                pct_start=0.15)
    bar = progress_bar(range(config.steps), desc="training the attribute reader", unit="step",
                       disable=not progress)
    for _ in bar:
        idx = torch.from_numpy(rng.choice(pixels.shape[0], config.batch_size, replace=False))
        x = pixels[idx].float() / 255
        if config.augment:
            x = augment(x, rng, gen)
        cells, cell_targets = cell_batch(model, x, {k: v[idx] for k, v in targets.items()}, rng)
        loss = loss_fn(model.classify(cells), cell_targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


# ---- files ---------------------------------------------------------------------------------------
def save_reader(model: AttributeReader, path: str, tokenizer_sha256: str | None = None) -> None:
    """Atomic write; readable with torch.load(weights_only=True)."""
    write_torch_atomic(path, {"format": FORMAT, "config": asdict(model.config),
                              "tokenizer_sha256": tokenizer_sha256,
                              "state_dict": {k: v.detach().cpu()
                                             for k, v in model.state_dict().items()}})


def load_reader(path: str, device="cpu") -> AttributeReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"attribute reader not found: {path}")
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not an attribute reader of format {FORMAT}")
    try:
        model = AttributeReader(dataclass_from_dict(ReaderConfig, ckpt["config"], f"{path} config"))
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: attribute reader does not match its config "
                         f"({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def reader_path(cache_dir: str, config: ReaderConfig, tokenizer=None) -> str:
    """Where the reader of this config (trained with this tokenizer's reconstructions) is cached."""
    sha = None
    if tokenizer is not None:
        sha = getattr(tokenizer, "sha256", None)
        if sha is None:
            raise ValueError("attribute reader: the image tokenizer has no sha256 (load it from a "
                             "file) to name the cached reader by")
    return os.path.join(cache_dir, f"reader-{config.key(sha)}.pt")


def load_or_train(cache_dir: str, config: ReaderConfig = ReaderConfig(), tokenizer=None,
                  progress: bool = True) -> AttributeReader:
    """The cached reader of this config and tokenizer under cache_dir, trained (once) if missing."""
    path = reader_path(cache_dir, config, tokenizer)
    if os.path.isfile(path):
        return load_reader(path)
    model = train_reader(config, tokenizer, progress)
    os.makedirs(cache_dir, exist_ok=True)
    save_reader(model, path, getattr(tokenizer, "sha256", None))
    return model
