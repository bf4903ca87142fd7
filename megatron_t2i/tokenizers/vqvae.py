"""The image tokenizer: a VQ-VAE that turns an image into a grid of codebook ids and back.

    encoder:  x [B,3,H,W] -> stride-2 convs (+ residual blocks) -> 1x1 conv -> z [B,D,H/f,W/f]
    codebook: z -> nearest of K embeddings (L2) -> codes [B,H/f,W/f]; EMA-updated, no gradient
    decoder:  codes -> embeddings -> (3x3 conv + residual blocks) -> stride-2 transposed convs
              -> 1x1 conv -> x' [B,3,H,W]

CogView's released tokenizer is one configuration of this class (`VQVAEConfig.cogview()`: three
4x4/stride-2 convs of 512 channels, 256-dim codes, 8192 codes, no residual blocks); with
`num_res_blocks=0` the module names are exactly CogView's (`enc_b.blocks.N`, `quantize_t.embed`,
`dec.blocks.N`), so its state dict loads with strict=True.

`VQVAE` works in normalised pixel space; `ImageTokenizer` adds the normalisation, PIL
preprocessing and the checkpoint file, and is what the rest of the system uses.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from megatron_t2i.io_utils import write_torch_atomic
from megatron_t2i.safe_load import check_state_dict, load_torch_file
from megatron_t2i.tokenizers.pixels import crop_square

FORMAT = "megatron_t2i.vqvae/1"
KINDS = ("vqvae", "vqgan")


@dataclass(frozen=True)
class VQVAEConfig:
    in_channels: int = 3
    hidden_channels: int = 32
    embed_dim: int = 32                  # dimension of one codebook entry
    codebook_size: int = 1024
    downsample: int = 4                  # pixels per code along a side (a power of two)
    num_res_blocks: int = 2              # 0: plain conv stacks (CogView's layout)
    # "conv": strided 4x4 convolutions, so a code also depends on the pixels around its patch
    # (CogView's); "patch": a code depends on its own downsample x downsample patch only, so a
    # plain background patch is always the same code, wherever the shapes of the picture are.
    # Codes that leak what lies below or beside them let an autoregressive model read a shape's
    # colour from the codes before it instead of from the caption.
    encoder: str = "conv"
    # the decoder's 2x steps: "transposed" (4x4 stride-2 transposed convolutions, CogView's) or
    # "nearest" (nearest-neighbour 2x, then a 3x3 convolution, taming's): transposed steps overlap
    # unevenly and leave a checkerboard, which an adversarial loss amplifies (seen on photos)
    upsample: str = "transposed"
    # LlamaGen's codes: encoder outputs and codebook entries on the unit sphere, so the nearest
    # code is the most similar direction and no code drifts off in scale (with a small embed_dim,
    # e.g. 8, most of the codebook stays in use)
    l2_codes: bool = False
    image_size: int = 64                 # side of the square images the tokenizer is used at
    mean: tuple = (0.5, 0.5, 0.5)        # per-channel pixel normalisation, pixels in [0, 1]
    std: tuple = (0.5, 0.5, 0.5)
    commitment_cost: float = 0.25        # weight of ||z - sg(e)||^2 in the loss
    decay: float = 0.99                  # EMA decay of the codebook statistics
    eps: float = 1e-5                    # Laplace smoothing of the EMA cluster sizes
    dead_code_steps: int = 50            # re-seed codes unused this many training steps (0: never)
    # how it was trained: "vqvae" (reconstruction loss only) or "vqgan" (plus a patch-GAN and an
    # optional perceptual loss, tokenizers/vqgan.py); the networks and the file are the same
    kind: str = "vqvae"

    def __post_init__(self):
        for f in ("in_channels", "hidden_channels", "embed_dim", "codebook_size", "image_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"vqvae config: {f} must be a positive integer, got {getattr(self, f)!r}")
        d = self.downsample
        if not isinstance(d, int) or d < 2 or d & (d - 1):
            raise ValueError(f"vqvae config: downsample must be a power of two >= 2 (4, 8, 16), got {d!r}")
        if self.encoder not in ("conv", "patch"):
            raise ValueError(f"vqvae config: encoder must be conv or patch, got {self.encoder!r}")
        if self.upsample not in ("transposed", "nearest"):
            raise ValueError(f"vqvae config: upsample must be transposed or nearest, got {self.upsample!r}")
        if self.kind not in KINDS:
            raise ValueError(f"vqvae config: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.num_res_blocks < 0 or self.dead_code_steps < 0:
            raise ValueError("vqvae config: num_res_blocks and dead_code_steps must be >= 0")
        for f in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, f))
            if len(v) != self.in_channels:
                raise ValueError(f"vqvae config: {f} needs {self.in_channels} values, got {len(v)}")
            object.__setattr__(self, f, v)
        if min(self.std) <= 0:
            raise ValueError(f"vqvae config: std must be positive, got {self.std}")
        if self.image_size % d:
            raise ValueError(f"vqvae config: image_size {self.image_size} is not a multiple of "
                             f"downsample {d}")

    @classmethod
    def cogview(cls) -> "VQVAEConfig":
        """CogView's released tokenizer (vqvae_hard_biggerset_011.pt): 256 px -> 32x32 codes."""
        return cls(hidden_channels=512, embed_dim=256, codebook_size=8192, downsample=8,
                   num_res_blocks=0, image_size=256, mean=(0.79093, 0.76271, 0.75340),
                   std=(0.30379, 0.32279, 0.32800))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean=list(self.mean), std=list(self.std))  # plain types: JSON and weights_only
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "vqvae config") -> "VQVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{source}: unknown vqvae config fields {sorted(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:  # a bad value names the file it came from
            raise ValueError(f"{source}: {e}") from None


class ResBlock(nn.Module):
    """x + conv1x1(relu(convKxK(relu(x)))): adds capacity at code resolution without resampling
    (K = 3, or 1 to keep every position apart)."""

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, kernel, padding=kernel // 2),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        return x + self.conv(x)


class Encoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        layers, kernel = [], 3
        if c.encoder == "patch":  # one f x f patch -> one vector, then per-position layers only
            layers += [nn.Conv2d(c.in_channels, c.hidden_channels, c.downsample, stride=c.downsample),
                       nn.ReLU()]
            kernel = 1
        else:
            for i in range(int(math.log2(c.downsample))):
                # kernel 4, stride 2, padding 1 halves the side exactly (256 -> 128 -> 64 -> 32)
                layers += [nn.Conv2d(c.in_channels if i == 0 else c.hidden_channels,
                                     c.hidden_channels, 4, stride=2, padding=1), nn.ReLU()]
        if c.num_res_blocks:
            layers += [ResBlock(c.hidden_channels, kernel) for _ in range(c.num_res_blocks)] + [nn.ReLU()]
        layers.append(nn.Conv2d(c.hidden_channels, c.embed_dim, 1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x):  # [B, C, H, W] -> [B, D, H/f, W/f]
        return self.blocks(x)


class Decoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        n_up = int(math.log2(c.downsample))
        layers = []
        if c.num_res_blocks:
            # residual blocks need hidden channels at code resolution; CogView instead lifts D to
            # hidden with its first transposed conv, which is what the plain layout below does
            layers += [nn.Conv2d(c.embed_dim, c.hidden_channels, 3, padding=1)]
            layers += [ResBlock(c.hidden_channels) for _ in range(c.num_res_blocks)] + [nn.ReLU()]
        for i in range(n_up):
            c_in = c.embed_dim if i == 0 and not c.num_res_blocks else c.hidden_channels
            if c.upsample == "nearest":
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(c_in, c.hidden_channels, 3, padding=1), nn.ReLU()]
            else:  # kernel 4, stride 2, padding 1 doubles the side exactly (32 -> 64 -> 128)
                layers += [nn.ConvTranspose2d(c_in, c.hidden_channels, 4, stride=2, padding=1),
                           nn.ReLU()]
        layers.append(nn.Conv2d(c.hidden_channels, c.in_channels, 1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, z):  # [B, D, h, w] -> [B, C, h*f, w*f]
        return self.blocks(z)


class EMACodebook(nn.Module):
    """Nearest-neighbour codebook learnt by exponential moving averages instead of gradients.

    Buffers (CogView's names): embed [D, K] the codes, cluster_size [K] the EMA of how many vectors
    each code received, embed_avg [D, K] the EMA of their sum; embed = embed_avg / smoothed size.
    A code that wins no vector for `dead_code_steps` training steps is re-seeded from a random
    encoder output of the current batch, so the whole codebook stays in use.
    """

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        self.decay, self.eps, self.dead_code_steps = c.decay, c.eps, c.dead_code_steps
        self.l2 = c.l2_codes
        embed = torch.randn(c.embed_dim, c.codebook_size)
        if self.l2:
            embed = F.normalize(embed, dim=0)
        self.register_buffer("embed", embed)
        # a fresh code counts as having received one vector, so that until it wins one it stays
        # where it is instead of being divided by the tiny smoothed size of an empty cluster
        self.register_buffer("cluster_size", torch.ones(c.codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        # Training steps since each code last won a vector; training-only state, not saved
        # (CogView's state dict has no such key). A fresh codebook starts all dead, so the first
        # training step seeds it from encoder outputs (a data-dependent init); a loaded one starts
        # all alive.
        self.register_buffer("idle_steps", torch.full((c.codebook_size,), c.dead_code_steps),
                             persistent=False)
        self.register_load_state_dict_post_hook(EMACodebook._loaded)
        # Data-parallel training sets this to a function that concatenates a tensor's rows from
        # every rank in rank order: the EMA statistics and restarts then see the global batch, so
        # every rank keeps the same codebook, the one a single process would (None: one process).
        self.gather_rows = None

    @staticmethod
    def _loaded(module, incompatible_keys) -> None:
        module.idle_steps.zero_()

    @property
    def codebook_size(self) -> int:
        return self.embed.shape[1]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N] code ids
        # In float64: in float32 this expansion cancels to errors of ~1e-6 while two codes can be
        # as near as 8e-7 (measured on grey scans), so rounding that varies between runs (batch
        # composition, threads) flipped codes: 1 in 115,000 when 2-process tokenizing of a real
        # data set was compared with 1-process.
        z, embed = z.double(), self.embed.double()
        dist = (z.pow(2).sum(1, keepdim=True) - 2 * z @ embed
                + embed.pow(2).sum(0, keepdim=True))  # [N, K] squared L2
        return dist.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:  # [...] -> [..., D]
        return F.embedding(codes, self.embed.t())

    def forward(self, z: torch.Tensor):
        """z [B, h, w, D] -> (quantised z with straight-through gradient, commitment loss, codes [B, h, w])."""
        flat = z.detach().reshape(-1, z.shape[-1]).float()  # [N, D]
        codes = self.nearest(flat)
        zq = self.lookup(codes).view_as(z)
        if self.training:
            self._ema_update(flat, codes)
        commitment = F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()  # forward: the code; backward: identity into the encoder
        return zq, commitment, codes.view(z.shape[:-1])

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        if self.gather_rows is not None:
            flat, codes = self.gather_rows(flat), self.gather_rows(codes)
        onehot = F.one_hot(codes, self.codebook_size).type(flat.dtype)  # [N, K]
        counts = onehot.sum(0)                                           # [K]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(flat.t() @ onehot, alpha=1 - self.decay)
        # Laplace smoothing keeps never-used codes from dividing by zero; total mass is preserved
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        embed = self.embed_avg / smoothed.unsqueeze(0)
        self.embed.copy_(F.normalize(embed, dim=0) if self.l2 else embed)

        if self.dead_code_steps:
            self.idle_steps.add_(1).masked_fill_(counts > 0, 0)
            dead = (self.idle_steps >= self.dead_code_steps).nonzero().squeeze(1)
            if dead.numel():
                pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
                # restart as a code that has just received exactly this one vector
                self.embed[:, dead] = flat[pick].t()
                self.embed_avg[:, dead] = flat[pick].t()
                self.cluster_size[dead] = 1.0
                self.idle_steps[dead] = 0


def code_usage(codes: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity exp(H) of the code histogram) of any code tensor."""
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).float().mean().item(), entropy.exp().item()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image [B] of images [B, ...] in [0, data_range]; an
    exact reconstruction scores 100 dB (MSE floored at 1e-10), so means stay finite."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-10))


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.enc_b = Encoder(config)         # names as in CogView's checkpoint
        self.quantize_t = EMACodebook(config)
        self.dec = Decoder(config)

    def grid_size(self, image_size: int) -> int:
        """Codes per side for a square image of `image_size` pixels."""
        if image_size % self.config.downsample:
            raise ValueError(f"image size {image_size} is not a multiple of the tokenizer's "
                             f"downsampling factor {self.config.downsample}")
        return image_size // self.config.downsample

    def _check_input(self, x: torch.Tensor) -> None:
        f, c = self.config.downsample, self.config.in_channels
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"vqvae input must be [B, {c}, H, W] with H, W multiples of {f}, "
                             f"got {list(x.shape)}")

    def _latents(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, h, w, D]
        z = self.enc_b(x).permute(0, 2, 3, 1)
        return F.normalize(z, dim=-1) if self.config.l2_codes else z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, C, H, W] -> codes [B, H/f, W/f] (int64)."""
        self._check_input(x)
        z = self._latents(x)
        codes = self.quantize_t.nearest(z.reshape(-1, z.shape[-1]).float())
        return codes.view(z.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] or [B, h*w] (square grid) -> normalised images [B, C, h*f, w*f]."""
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"cannot decode {codes.shape[1]} codes per image: not a square grid")
            codes = codes.view(codes.shape[0], side, side)
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, h, w] or [B, h*w], got {list(codes.shape)}")
        k = self.config.codebook_size
        if codes.numel() and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(f"image code out of range [0, {k}): {codes.min().item()}..{codes.max().item()}")
        z = self.quantize_t.lookup(codes.long()).permute(0, 3, 1, 2)  # [B, D, h, w]
        return self.dec(z.to(self.dec.blocks[0].weight.dtype))

    def forward(self, x: torch.Tensor):
        """-> (reconstruction [B, C, H, W], losses {loss, recon, commitment, usage, perplexity},
        codes [B, h, w]). `loss` is what to minimise; usage/perplexity describe this batch."""
        self._check_input(x)
        z = self._latents(x)                   # [B, h, w, D]
        zq, commitment, codes = self.quantize_t(z)
        recon = self.dec(zq.permute(0, 3, 1, 2))
        recon_loss = F.mse_loss(recon, x)
        usage, perplexity = code_usage(codes, self.config.codebook_size)
        losses = {"loss": recon_loss + self.config.commitment_cost * commitment, "recon": recon_loss,
                  "commitment": commitment, "usage": usage, "perplexity": perplexity}
        return recon, losses, codes


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _torch_load(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return load_torch_file(path)


class ImageTokenizer:
    """A VQ-VAE plus its pixel normalisation and preprocessing: PIL images <-> code sequences."""

    def __init__(self, model: VQVAE, sha256: str | None = None, path: str | None = None):
        self.model = model.eval()
        self.config = model.config
        self.sha256, self.path = sha256, path
        shape = (1, self.config.in_channels, 1, 1)
        self.mean = torch.tensor(self.config.mean).view(shape)
        self.std = torch.tensor(self.config.std).view(shape)

    @property
    def device(self) -> torch.device:
        return self.model.quantize_t.embed.device

    def at_grid(self, grid: int) -> "ImageTokenizer":
        """The same networks on images of grid x downsample pixels: encoder and decoder are
        convolutional, so a model moved to another grid (training/regrid.py) reads and writes its
        codes through the tokenizer it was trained with."""
        if grid == self.grid:
            return self
        out = ImageTokenizer(self.model, self.sha256, self.path)
        out.config = replace(self.config, image_size=grid * self.config.downsample)
        return out

    def to(self, device) -> "ImageTokenizer":
        self.model.to(device)
        return self

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def grid(self) -> int:
        return self.model.grid_size(self.image_size)

    # ---- pixels ----------------------------------------------------------------------------------
    def crop_uint8(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> uint8 [3, S, S]: RGB, short side resized to S, centre crop."""
        return crop_square(image, self.image_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float [..., 3, S, S] -> normalised float."""
        x = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean[0]) / std[0] if x.dim() == 3 else (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, S, S] -> pixels in [0, 1]."""
        return (x.float() * self.std.to(x.device) + self.mean.to(x.device)).clamp(0, 1)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised FloatTensor [3, S, S]."""
        return self.normalize(self.crop_uint8(image))

    # ---- codes -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images, batch_size: int = 64) -> torch.Tensor:
        """list of PIL images, or normalised [B, 3, S, S] -> LongTensor [B, grid*grid] (CPU)."""
        self.model.eval()
        s = self.image_size
        if torch.is_tensor(images) and (images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s)):
            raise ValueError(f"images must be [B, 3, {s}, {s}] normalised, got {list(images.shape)}")
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = chunk if torch.is_tensor(chunk) else torch.stack([self.prepare(im) for im in chunk])
            out.append(self.model.encode(x.to(self.device).float()).flatten(1).cpu())
        return torch.cat([torch.zeros(0, self.grid ** 2, dtype=torch.long)] + out)

    @torch.no_grad()
    def decode_to_tensor(self, codes, batch_size: int = 64) -> torch.Tensor:
        """Codes [B, grid*grid] -> FloatTensor [B, 3, S, S] in [0, 1] (CPU)."""
        self.model.eval()
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() != 2 or codes.shape[1] != self.grid ** 2:
            raise ValueError(f"codes must be [B, {self.grid ** 2}], got {list(codes.shape)}")
        s = self.image_size
        out = [torch.zeros(0, 3, s, s)] + [
            self.denormalize(self.model.decode(codes[i:i + batch_size].to(self.device))).cpu()
            for i in range(0, codes.shape[0], batch_size)]
        return torch.cat(out)

    def decode_codes(self, codes, batch_size: int = 64) -> list[Image.Image]:
        """Codes [B, grid*grid] -> list of RGB PIL images of S x S pixels."""
        pixels = (self.decode_to_tensor(codes, batch_size) * 255).round().byte()  # [B, 3, S, S]
        return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]

    # ---- files -----------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config.kind

    def save(self, path: str, training: dict | None = None) -> None:
        """Atomic write of {"format", "config", "state_dict", "training"} (how it was trained: the
        losses' settings, for the record); readable with weights_only=True."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        write_torch_atomic(path, {"format": FORMAT, "config": self.config.to_dict(),
                                  "state_dict": state, "training": training or {}})
        self.sha256, self.path = file_sha256(path), path

    def check_kind(self, kind: str | None, flag: str = "--image-tokenizer-kind") -> "ImageTokenizer":
        """One line when a tokenizer of one kind is given where `kind` is asked for (None: any)."""
        if kind is not None and kind != self.kind:
            raise ValueError(f"{self.path}: a {self.kind} image tokenizer, but {flag} asks for {kind}")
        return self

    @classmethod
    def load(cls, path: str, device="cpu") -> "ImageTokenizer":
        """Our own checkpoint, as written by `save`."""
        ckpt = _torch_load(path, "image tokenizer checkpoint")
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
            hint = " (a CogView file? use from_cogview)" if isinstance(ckpt, dict) and "format" not in ckpt else ""
            raise ValueError(f"{path}: not an image tokenizer checkpoint of format {FORMAT} "
                             f"(found {found!r}){hint}")
        model = VQVAE(VQVAEConfig.from_dict(ckpt["config"], source=f"{path} config"))
        check_state_dict(ckpt["state_dict"], model.state_dict(), path)
        model.load_state_dict(ckpt["state_dict"], strict=True)
        return cls(model.to(device), sha256=file_sha256(path), path=path)

    @classmethod
    def from_cogview(cls, path: str, device="cpu") -> "ImageTokenizer":
        """CogView's released tokenizer: a raw state dict, or one under 'module'/'state_dict', with
        or without DataParallel's `module.` key prefix."""
        sd = _torch_load(path, "CogView image tokenizer")
        for key in ("module", "state_dict"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
        if not isinstance(sd, dict) or not sd:
            raise ValueError(f"{path}: expected a state dict of CogView's VQ-VAE, found {type(sd).__name__}")
        if all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        model = VQVAE(VQVAEConfig.cogview())
        check_state_dict(sd, model.state_dict(), f"{path} (CogView VQ-VAE layout)")
        model.load_state_dict(sd, strict=True)  # copies fp16 weights into fp32 parameters
        return cls(model.to(device), sha256=file_sha256(path), path=path)
