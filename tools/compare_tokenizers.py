"""VQ-VAE against VQGAN at f8 and f16, on real photographs and on the embedded default.

    python tools/compare_tokenizers.py --data photos   # -> runs/tokenizers/photos/report.json,
    python tools/compare_tokenizers.py --data shapes   #    report.md and reconstructions.png

Photos: the colour and texture photographs that scikit-image ships (astronaut, coffee, rocket,
motorcycles, retina, brick, grass, ...), cut into random 64-pixel crops at full and half
resolution. Crops for training come from the top two thirds of every photo, held-out crops from
the bottom third, so no held-out pixel is ever trained on. Shapes: the embedded default drawn at
64 pixels (held-out images are other indices).

Each tokenizer is trained by the production trainer (tokenizers/train_vqvae.py, the same
networks, budget and seed; the VQGAN adds the patch-GAN and, with --perceptual-weight, the
perceptual loss) and scored on the held-out crops: PSNR, SSIM, code usage and perplexity
(evaluation/metrics.py), and FID / KID of reconstructions against the originals (evaluation/
fid.py) in the space of a feature network trained here on other crops with another seed
(tokenizers/feature_net.py), so no tokenizer is scored by the network it was trained against.
Finished tokenizers are reused: an interrupted comparison goes on where it stopped.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from megatron_t2i.data.synthetic import make_example
from megatron_t2i.evaluation.fid import fid_kid
from megatron_t2i.evaluation.metrics import tokenizer_figures
from megatron_t2i.io_utils import write_bytes_atomic
from megatron_t2i.tokenizers.feature_net import (load_feature_net, save_feature_net,
                                                 train_feature_net)
from megatron_t2i.tokenizers.train_vqvae import train_vqvae
from megatron_t2i.tokenizers.vqgan import GANConfig
from megatron_t2i.tokenizers.vqvae import ImageTokenizer, VQVAEConfig

# scikit-image's bundled photographs (colour, and grey textures/scenes read as RGB)
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg",
          "hubble_deep_field.jpg", "motorcycle_left.png", "motorcycle_right.png", "ihc.png",
          "brick.png", "grass.png", "gravel.png", "camera.png", "coins.png", "moon.png")
KINDS = ("vqvae", "vqgan")


@dataclass(frozen=True)
class Budget:
    crop: int = 64
    train_crops: int = 4000
    eval_crops: int = 500
    steps: int = 3000
    batch_size: int = 8
    lr: float = 2e-3
    channels: int = 64
    codebook: int = 1024
    upsample: str = "nearest"  # the decoders' 2x steps (VQVAEConfig.upsample), for both kinds
    disc_channels: int = 32
    disc_layers: int = 2
    disc_start_fraction: float = 0.3
    perceptual_weight: float = 0.0
    feature_steps: int = 600
    seed: int = 1234


def photo_folder() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("compare_tokenizers: the photos come with scikit-image "
                         "(pip install scikit-image, which env/install.sh installs)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def photo_crops(count: int, size: int, held_out: bool, seed: int) -> list[Image.Image]:
    """`count` random size x size crops of the bundled photos at scales 1 and 1/2, from the top
    two thirds of each photo (training) or its bottom third (held out)."""
    rng, folder, sources = np.random.default_rng(seed), photo_folder(), []
    for name in PHOTOS:
        with Image.open(os.path.join(folder, name)) as im:
            photo = im.convert("RGB")
        for scale in (1.0, 0.5):
            w, h = round(photo.width * scale), round(photo.height * scale)
            scaled = photo.resize((w, h), Image.Resampling.LANCZOS) if scale != 1 else photo
            cut = h * 2 // 3
            top, bottom = (cut, h) if held_out else (0, cut)
            if bottom - top >= size and w >= size:
                sources.append((scaled, top, bottom))
    crops = []
    for i in rng.integers(0, len(sources), count):
        image, top, bottom = sources[i]
        x, y = rng.integers(0, image.width - size + 1), rng.integers(top, bottom - size + 1)
        crops.append(image.crop((int(x), int(y), int(x) + size, int(y) + size)))
    return crops


def shape_images(count: int, size: int, held_out: bool, seed: int) -> list[Image.Image]:
    first = 1_000_000 if held_out else 0  # other indices of the same data set
    return [make_example(first + i, seed, size).image for i in range(count)]


def as_uint8(images: list[Image.Image]) -> torch.Tensor:  # -> [N, 3, S, S]
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)


def train_one(kind: str, f: int, train: list, budget: Budget, out: str) -> tuple[str, float]:
    path = os.path.join(out, f"{kind}-f{f}.pt")
    if os.path.isfile(path):
        return path, float("nan")
    config = VQVAEConfig(hidden_channels=budget.channels, codebook_size=budget.codebook,
                         downsample=f, image_size=budget.crop, upsample=budget.upsample)
    gan = GANConfig(disc_start=int(budget.steps * budget.disc_start_fraction),
                    disc_channels=budget.disc_channels, disc_layers=budget.disc_layers,
                    perceptual_weight=budget.perceptual_weight,
                    feature_steps=budget.feature_steps) if kind == "vqgan" else None
    start = time.time()
    train_vqvae(train, path, config, steps=budget.steps, batch_size=budget.batch_size,
                lr=budget.lr, seed=budget.seed, gan=gan,
                tensorboard_dir=os.path.join(out, "runs", f"{kind}-f{f}"))
    return path, time.time() - start


@torch.no_grad()
def reconstruct(tokenizer: ImageTokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> reconstructions in [0, 1]."""
    codes = tokenizer.encode_images(tokenizer.normalize(pixels))
    return tokenizer.decode_to_tensor(codes).clamp(0, 1)


def grid_png(rows: list[torch.Tensor], path: str, scale: int = 2) -> None:
    """Rows of images [n, 3, S, S] in [0, 1] -> one PNG, each image `scale` times larger."""
    strips = [torch.cat(list(r), dim=2) for r in rows]                   # [3, S, n*S]
    img = (torch.cat(strips, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(img)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def compare(data: str, out: str, budget: Budget, factors=(8, 16)) -> dict:
    os.makedirs(out, exist_ok=True)
    images = photo_crops if data == "photos" else shape_images
    train = images(budget.train_crops, budget.crop, False, budget.seed)
    held_out = as_uint8(images(budget.eval_crops, budget.crop, True, budget.seed + 1))
    real = held_out.float() / 255

    features_path = os.path.join(out, "fid_features.pt")
    if not os.path.isfile(features_path):  # other crops, another seed than any perceptual net's
        other = as_uint8(images(budget.train_crops, budget.crop, False, budget.seed + 2))
        net, accuracy = train_feature_net(other, budget.feature_steps, seed=budget.seed + 3)
        save_feature_net(net, features_path, accuracy)
    features = load_feature_net(features_path)

    report = {"data": data, "budget": asdict(budget), "held_out_images": len(held_out),
              "fid_features": "tokenizers/feature_net.py, trained on other training crops",
              "tokenizers": {}}
    shown = slice(0, 8)
    rows = [real[shown]]
    for f in factors:
        for kind in KINDS:
            path, seconds = train_one(kind, f, train, budget, out)
            tokenizer = ImageTokenizer.load(path)
            figures = tokenizer_figures(tokenizer, real)
            recon = reconstruct(tokenizer, held_out)
            figures.update(fid_kid(features, real, recon), train_seconds=seconds)
            report["tokenizers"][f"{kind}-f{f}"] = figures
            rows.append(recon[shown])
            print(f"{data} {kind} f{f}: PSNR {figures['psnr']:.2f} dB, SSIM {figures['ssim']:.3f},"
                  f" FID {figures['fid']:.2f}, KID {figures['kid']:.4f}, code usage "
                  f"{figures['code_usage']:.2f}", flush=True)
    grid_png(rows, os.path.join(out, "reconstructions.png"))
    write_bytes_atomic(os.path.join(out, "report.json"),
                       (json.dumps(report, indent=2) + "\n").encode())
    write_bytes_atomic(os.path.join(out, "report.md"), markdown(report).encode())
    return report


def markdown(report: dict) -> str:
    up = report["budget"]["upsample"]
    lines = [f"| {report['data']} ({up} decoders): {report['held_out_images']} held-out images | "
             "PSNR (dB) | SSIM |"
             " FID | KID | code usage | perplexity |", "|---|---|---|---|---|---|---|"]
    for name, t in report["tokenizers"].items():
        lines.append(f"| {name} | {t['psnr']:.2f} | {t['ssim']:.3f} | {t['fid']:.2f} | "
                     f"{t['kid']:.4f} ± {t['kid_std']:.4f} | {t['code_usage']:.2f} | "
                     f"{t['perplexity']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    d = Budget()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=("photos", "shapes"), default="photos")
    p.add_argument("--out", help="default: runs/tokenizers/<data>")
    for field in ("steps", "train_crops", "eval_crops", "batch_size", "feature_steps"):
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(d, field))
    p.add_argument("--perceptual-weight", type=float, default=d.perceptual_weight)
    p.add_argument("--upsample", choices=("nearest", "transposed"), default=d.upsample,
                   help="the decoders' upsampling, for both kinds (transposed: CogView's)")
    args = p.parse_args(argv)
    budget = Budget(steps=args.steps, train_crops=args.train_crops, eval_crops=args.eval_crops,
                    batch_size=args.batch_size, feature_steps=args.feature_steps,
                    perceptual_weight=args.perceptual_weight, upsample=args.upsample)
    if min(budget.steps, budget.train_crops, budget.batch_size) < 1 or budget.eval_crops < 8:
        p.error("--steps, --train-crops and --batch-size must be positive, --eval-crops >= 8")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    name = args.data + ("-transposed" if args.upsample == "transposed" else "")
    report = compare(args.data, args.out or os.path.join("runs", "tokenizers", name), budget)
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
