"""Train the image tokenizer (a VQ-VAE, or a VQGAN) on a folder of images, shards or PIL images.

    python -m megatron_t2i.cli.train_vqvae --input images/ --image-tokenizer vqvae.pt
    python -m megatron_t2i.cli.train_vqvae --input photos/ --image-tokenizer vqgan.pt \
        --image-tokenizer-kind vqgan --vqvae-downsample 16

Without --input it trains on the embedded synthetic data set (written to --synthetic-dir if absent).

Images are resized and centre-cropped once and kept in memory as uint8; a slice is held out to
measure the final quality (PSNR, codebook usage and perplexity), which is printed and returned,
and shown in TensorBoard as originals over reconstructions. Every `save_every` steps the whole
training state is written beside the output (`<out>.resume.pt`); the same command run again goes
on from it and ends with the tokenizer it would have written uninterrupted, bit for bit.

Data-parallel when torch.distributed is initialised (torchrun): each rank takes its share of every
global batch, gradients are averaged, and the codebook's EMA statistics, code restarts and the
VQGAN's adaptive weight are computed from the whole global batch, so every rank holds the same
networks, those one process would train on the same global batches. Rank 0 writes the files.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from PIL import Image

from megatron_t2i.data.images import BadInput, load_rgb
from megatron_t2i.data.sources import all_examples, is_shards
from megatron_t2i.io_utils import write_torch_atomic
from megatron_t2i.mpu.state import global_rank_world
from megatron_t2i.progress import progress_bar
from megatron_t2i.safe_load import load_torch_file
from megatron_t2i.tokenizers.feature_net import (FeatureNet, perceptual_distance,
                                                 train_feature_net)
from megatron_t2i.tokenizers.vqgan import (GANConfig, PatchDiscriminator, adaptive_weight,
                                           disc_factor, hinge_d_loss)
from megatron_t2i.tokenizers.vqvae import VQVAE, ImageTokenizer, VQVAEConfig, code_usage, psnr

RESUME_FORMAT = "megatron_t2i.vqvae_training/1"
GRID_IMAGES = 8  # held-out images shown in TensorBoard, originals over reconstructions
TAGS = {"recon": "recon_loss", "commitment": "commitment_loss", "usage": "code_usage",
        "perplexity": "codebook_perplexity"}  # TensorBoard names of the logged values

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return paths


def load_pixels(images, tokenizer: ImageTokenizer) -> torch.Tensor:
    """A folder, webdataset shards or a list of PIL images -> uint8 [N, 3, S, S], resized and
    centre-cropped."""
    if isinstance(images, str) and is_shards(images):
        crops = []
        for source in progress_bar(all_examples(images), desc="loading images", unit="img"):
            try:
                crops.append(tokenizer.crop_uint8(load_rgb(source.data)))
            except BadInput:
                pass  # counted and named when the shards are tokenized
    elif isinstance(images, (str, os.PathLike)):
        paths, crops = list_images(str(images)), []
        for path in progress_bar(paths, desc="loading images", unit="img",
                                 disable=len(paths) < 1000):
            try:
                with Image.open(path) as im:
                    crops.append(tokenizer.crop_uint8(im))
            except OSError as e:
                raise ValueError(f"{path}: cannot read image ({e})") from None
    else:
        crops = [tokenizer.crop_uint8(im) for im in images]
    if len(crops) < 2:
        raise ValueError(f"need at least 2 images to train the image tokenizer, got {len(crops)}")
    return torch.stack(crops)


@torch.no_grad()
def evaluate(tokenizer: ImageTokenizer, pixels: torch.Tensor, batch_size: int) -> dict:
    """PSNR, codebook usage and perplexity of uint8 images [N, 3, S, S] through encode/decode."""
    codes = tokenizer.encode_images(tokenizer.normalize(pixels), batch_size=batch_size)
    recon = tokenizer.decode_to_tensor(codes, batch_size=batch_size)
    usage, perplexity = code_usage(codes, tokenizer.codebook_size)
    return {"psnr": psnr(recon, pixels.float() / 255).mean().item(), "usage": usage,
            "perplexity": perplexity}


@torch.no_grad()
def _image_grid(tokenizer: ImageTokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 3, S, S] -> [3, 2S, n*S] in [0, 1]: the images over their reconstructions."""
    recon = tokenizer.decode_to_tensor(tokenizer.encode_images(tokenizer.normalize(pixels)))
    top = torch.cat(list(pixels.float() / 255), dim=2)
    return torch.cat([top, torch.cat(list(recon), dim=2)], dim=1)


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank (the same n) -> [world * n, ...], rank 0's rows first."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _average(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t.div_(dist.get_world_size())


def _average_gradients(module: torch.nn.Module) -> None:
    """Every rank's gradients -> their mean over ranks, in one all-reduce."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = _average(torch.cat([g.reshape(-1) for g in grads]))
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


class _Trainer:
    """The networks, optimisers and data order of one run; `state()` / `restore()` are all it is."""

    def __init__(self, config: VQVAEConfig, gan: GANConfig | None, steps: int, lr: float,
                 seed: int, device):
        self.world = global_rank_world()[1]
        self.model = VQVAE(config).to(device)
        if self.world > 1:
            self.model.quantize_t.gather_rows = _gather_rows
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        # cosine decay to 10%: a high rate early for speed, a low one late for sharp reconstructions
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        self.gan, self.disc, self.features = gan, None, None
        if gan:
            # from its own seed: the autoencoder's weights and batches stay those of the VQ-VAE
            # of the same seed, which a VQGAN is exactly until its discriminator starts
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 2)
                self.disc = PatchDiscriminator(gan, config.in_channels).to(device)
            self.disc_optimizer = torch.optim.Adam(self.disc.parameters(), lr=gan.disc_lr or lr,
                                                   betas=(0.5, 0.9))  # taming's

    def state(self, step: int, perm, cursor: int, train_psnr: float, settings: dict) -> dict:
        state = {"format": RESUME_FORMAT, "settings": settings, "step": step, "perm": perm,
                 "cursor": cursor, "train_psnr": train_psnr, "rng": torch.get_rng_state(),
                 "model": self.model.state_dict(),
                 # not in the state dict (a loaded tokenizer starts with every code alive)
                 "idle_steps": self.model.quantize_t.idle_steps.clone(),
                 "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}
        if torch.cuda.is_available():  # code restarts draw on the device's generator
            state["cuda_rng"] = torch.cuda.get_rng_state()
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_optimizer=self.disc_optimizer.state_dict())
        if self.features is not None:
            state["features"] = self.features.state_dict()
        return state

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.model.quantize_t.idle_steps.copy_(state["idle_steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        if "features" in state:
            self.features = FeatureNet().to(self.model.quantize_t.embed.device)
            self.features.load_state_dict(state["features"])
            self.features.eval().requires_grad_(False)
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])

    def step(self, tokenizer: ImageTokenizer, batch: torch.Tensor, step: int) -> tuple:
        """One optimisation step on uint8 images [B, 3, S, S] -> (reconstruction, logged values)."""
        x = tokenizer.normalize(batch)                           # [B, 3, S, S]
        recon, losses, _ = self.model(x)
        loss, logged = losses["loss"], dict(losses)
        gan = self.gan
        if gan:
            rec = losses["recon"]
            if self.features is not None:
                to01 = lambda t: t * tokenizer.std.to(t.device) + tokenizer.mean.to(t.device)  # noqa: E731
                perceptual = perceptual_distance(self.features, to01(recon), to01(x))
                rec = rec + gan.perceptual_weight * perceptual
                loss = loss + gan.perceptual_weight * perceptual
                logged["perceptual"] = perceptual
            factor = disc_factor(step, gan.disc_start)
            logged["disc_factor"] = factor
            if factor:
                self.disc.requires_grad_(False)
                g_loss = -self.disc(recon).mean()
                weight = adaptive_weight(rec, g_loss, self.model.dec.blocks[-1].weight,
                                         gan.disc_weight, _average if self.world > 1 else None)
                loss = loss + factor * weight * g_loss
                self.disc.requires_grad_(True)
                logged.update(g_loss=g_loss, adaptive_weight=weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            _average_gradients(self.model)
        self.optimizer.step()
        self.schedule.step()
        if gan and logged["disc_factor"]:
            d_loss = logged["disc_factor"] * hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            if self.world > 1:
                _average_gradients(self.disc)
            self.disc_optimizer.step()
            logged["d_loss"] = d_loss
        return recon, logged


def _read_resume(path: str, settings: dict) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        state = load_torch_file(path)
    except ValueError as e:  # (no --trust-checkpoint here: a training state is ours or nothing)
        raise ValueError(f"{str(e).split('; pass --trust')[0]}; remove it to train from the "
                         f"start") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path}: not a tokenizer training state ({RESUME_FORMAT}); remove it")
    if state["settings"] != settings:
        differ = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        raise ValueError(f"{path}: the interrupted run had other settings ({', '.join(differ)}); "
                         f"run it with the same ones, or remove the file to start over")
    return state


def train_vqvae(images, out_path: str, config: VQVAEConfig | None = None, steps: int = 3000,
                batch_size: int = 4, lr: float = 2e-3, image_size: int | None = None,
                seed: int = 1234, tensorboard_dir: str | None = None, progress: bool = True,
                log_every: int = 50, device="cpu", gan: GANConfig | None = None,
                save_every: int = 500, image_every: int | None = None) -> dict:
    """Train a VQ-VAE (with `gan`: a VQGAN), save it atomically to `out_path` and return held-out
    metrics {psnr, usage, perplexity, train_psnr, steps, seconds, path, sha256, resumed_from}.

    The defaults train the demo tokenizer: on a CPU, many small batches learn far faster per
    second than few large ones (at 64 px, 3000 steps of 4 images reach ~31 dB PSNR where 600
    steps of 32 images, 1.6x the compute, reach ~26 dB and lose the colours of small shapes).
    `batch_size` is the global batch: under torch.distributed each rank takes its share."""
    rank, world = global_rank_world()
    if steps <= 0 or batch_size <= 0 or not lr > 0 or save_every <= 0:
        raise ValueError(f"train_vqvae: steps, batch_size, lr and save_every must be positive, got "
                         f"{steps}, {batch_size}, {lr}, {save_every}")
    config = config or VQVAEConfig()
    if image_size is not None and image_size != config.image_size:
        config = replace(config, image_size=image_size)
    config = replace(config, kind="vqgan" if gan else "vqvae")
    torch.manual_seed(seed)  # model init, batch order and code restarts all follow this seed
    run = _Trainer(config, gan, steps, lr, seed, device)
    tokenizer = ImageTokenizer(run.model)
    pixels = load_pixels(images, tokenizer)                      # [N, 3, S, S] uint8
    order = torch.randperm(len(pixels))
    n_eval = min(512, max(1, len(pixels) // 10))
    eval_pixels, train_pixels = pixels[order[:n_eval]], pixels[order[n_eval:]]
    batch_size = min(batch_size, len(train_pixels))
    if batch_size % world:
        raise ValueError(f"--vqvae-batch-size {batch_size} does not split over {world} ranks")
    share = batch_size // world
    settings = {"config": config.to_dict(), "gan": gan.to_dict() if gan else None, "steps": steps,
                "batch_size": batch_size, "lr": lr, "seed": seed, "images": len(pixels)}
    resume_path = out_path + ".resume.pt"
    state = _read_resume(resume_path, settings)
    if gan and gan.perceptual_weight and state is None:  # (a resumed run has it in its state)
        # every rank trains the same network (its own seeded generator, the same images)
        run.features, accuracy = train_feature_net(train_pixels, gan.feature_steps, seed=seed + 1,
                                                   progress=progress, device=device)
        if rank == 0:
            print(f"perceptual feature network: rotation accuracy {accuracy:.2f} on its last "
              f"batches", flush=True)
    progress = progress and rank == 0
    writer = None
    if tensorboard_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(tensorboard_dir)
    image_every = image_every or max(steps // 10, 1)

    first, perm, cursor, train_psnr = 1, torch.randperm(len(train_pixels)), 0, float("nan")
    if state is not None:
        run.restore(state)
        first, perm, cursor, train_psnr = (state["step"] + 1, state["perm"], state["cursor"],
                                           state["train_psnr"])
        print(f"resuming tokenizer training at step {first} from {resume_path}", flush=True)
    start = time.time()
    bar = progress_bar(range(first, steps + 1), desc=config.kind, unit="step",
                       disable=not progress, initial=first - 1, total=steps)
    run.model.train()
    for step in bar:
        if cursor + batch_size > len(perm):  # a new epoch
            perm, cursor = torch.randperm(len(train_pixels)), 0
        mine = perm[cursor + rank * share:cursor + (rank + 1) * share]  # this rank's share
        batch = train_pixels[mine].to(device)
        cursor += batch_size
        recon, logged = run.step(tokenizer, batch, step)
        if step % log_every == 0 or step == steps:
            train_psnr = psnr(tokenizer.denormalize(recon.detach()), batch.float() / 255).mean().item()
            bar.set_postfix(loss=f"{logged['loss'].item():.4f}", psnr=f"{train_psnr:.1f}",
                            usage=f"{logged['usage']:.2f}", refresh=False)
            if writer:
                logged.update(psnr=train_psnr, lr=run.schedule.get_last_lr()[0])
                for name, value in logged.items():
                    writer.add_scalar(f"vqvae/{TAGS.get(name, name)}",
                                      value.item() if torch.is_tensor(value) else value, step)
        if writer and (step % image_every == 0 or step == steps):
            writer.add_image("vqvae/heldout_over_reconstructions",
                             _image_grid(tokenizer, eval_pixels[:GRID_IMAGES].to(device)), step)
            run.model.train()
        if step % save_every == 0 and step < steps and rank == 0:
            write_torch_atomic(resume_path, run.state(step, perm, cursor, train_psnr, settings))
    bar.close()
    if rank != 0:  # rank 0 evaluates and writes; the others wait for its file
        dist.barrier()
        return {"path": out_path, "kind": config.kind, "steps": steps, "resumed_from": first - 1}
    metrics = evaluate(tokenizer, eval_pixels, batch_size)
    metrics.update(train_psnr=train_psnr, steps=steps, seconds=time.time() - start,
                   resumed_from=first - 1, kind=config.kind)
    if writer:
        for name in ("psnr", "usage", "perplexity"):
            writer.add_scalar(f"vqvae/heldout_{name}", metrics[name], steps)
        writer.close()
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(out_path, training={k: v for k, v in settings.items() if k != "config"})
    if os.path.exists(resume_path):
        os.remove(resume_path)
    metrics.update(path=out_path, sha256=tokenizer.sha256)
    if world > 1:
        dist.barrier()
    return metrics
