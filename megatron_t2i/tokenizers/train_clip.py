"""Train the CLIP (tokenizers/clip.py) on images with their captions, data-parallel over ranks.

    train_clip(pixels uint8 [N, 3, S, S], captions [[SentencePiece ids]], "data/clip.pt", config,
               text_tokenizer)

open_clip's ClipLoss (local loss with features gathered with their gradients, as open_clip's own
training runs it) under DistributedDataParallel when torch.distributed is initialised: each rank
takes its share of every global batch. A held-out slice (never trained on) measures retrieval both
ways, R@1 and R@5 among every held-out pair and among groups of 100, logged to TensorBoard as it
goes. Resumable: every save_interval steps the whole state (weights, optimiser, schedule, RNG, step;
the batch order follows from seed and step) goes atomically to `{out}.state`; the same call resumes
from it and the result is bitwise that of an uninterrupted run. The finished CLIP is written to
`out` (weights and config only) and the state removed.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from megatron_t2i.io_utils import write_torch_atomic
from megatron_t2i.mpu.state import global_rank_world
from megatron_t2i.progress import progress_bar
from megatron_t2i.safe_load import load_torch_file
from megatron_t2i.tokenizers.clip import Clip, ClipConfig, ClipTextTokens, build_open_clip

STATE_FORMAT = "megatron_t2i.clip_training/1"


def split(n: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices of n pairs, the same for every run of a seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    holdout = min(holdout, n // 5)
    return order[holdout:], order[:holdout]


def batch_indices(train: torch.Tensor, step: int, global_batch: int, seed: int, rank: int,
                  world: int) -> torch.Tensor:
    """This rank's share of global batch `step` (0-based): epochs are seeded permutations, so the
    batches follow from (seed, step) alone and a resumed run draws the same ones."""
    per_epoch = len(train) // global_batch
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    chunk = order[offset * global_batch:(offset + 1) * global_batch]
    share = global_batch // world
    return train[chunk[rank * share:(rank + 1) * share]]


@torch.no_grad()
def retrieval(image_features: torch.Tensor, text_features: torch.Tensor,
              group: int | None = None) -> dict:
    """R@1 and R@5 of matched pairs (row i of each) both ways; with `group`, among consecutive
    groups of that many pairs (the remainder left out), averaged."""
    n = len(image_features)
    groups = [(0, n)] if group is None else [(i, i + group) for i in range(0, n - group + 1, group)]
    hits = {"text_to_image_r1": 0.0, "text_to_image_r5": 0.0, "image_to_text_r1": 0.0,
            "image_to_text_r5": 0.0}
    counted = 0
    for start, end in groups:
        sim = text_features[start:end] @ image_features[start:end].T       # [texts, images]
        truth = torch.arange(end - start)
        for name, s in (("text_to_image", sim), ("image_to_text", sim.T)):
            rank = (s > s[truth, truth][:, None]).sum(1)                  # how many beat the match
            hits[f"{name}_r1"] += (rank < 1).sum().item()
            hits[f"{name}_r5"] += (rank < 5).sum().item()
        counted += end - start
    return {k: v / max(counted, 1) for k, v in hits.items()}


def evaluate(clip: Clip, pixels: torch.Tensor, captions: list) -> dict:
    images, texts = clip.encode_pixels(pixels), clip.encode_text_ids(captions)
    out = {f"{k}_all": v for k, v in retrieval(images, texts).items()}
    if len(pixels) >= 100:
        out.update({f"{k}_among_100": v for k, v in retrieval(images, texts, 100).items()})
    paired = (images * texts).sum(1).mean().item()
    unpaired = (images @ texts.T).mean().item()
    out.update(paired_cosine=paired, unpaired_cosine=unpaired, cosine_gap=paired - unpaired,
               pairs=len(pixels))
    return out


def train_clip(pixels: torch.Tensor, captions: list, out_path: str, config: ClipConfig,
               text_tokenizer, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
               weight_decay: float = 0.1, warmup: float = 0.05, seed: int = 1234,
               holdout: int = 200, eval_interval: int = 500, save_interval: int = 500,
               tensorboard_dir: str | None = None, device="cpu", progress: bool = True) -> dict:
    """Train, save the CLIP to out_path and return its held-out retrieval figures."""
    from open_clip import ClipLoss

    rank, world = global_rank_world()
    if len(pixels) != len(captions):
        raise ValueError(f"train_clip: {len(pixels)} images but {len(captions)} captions")
    if batch_size % world:
        raise ValueError(f"train_clip: the global batch {batch_size} must split evenly over "
                         f"{world} ranks")
    train, held = split(len(pixels), holdout, seed)
    batch_size = min(batch_size, len(train) // world * world)
    if batch_size < 2 * world:
        raise ValueError(f"train_clip: {len(train)} training pairs are too few for a batch")
    torch.manual_seed(seed)
    model = build_open_clip(config).to(device)
    clip = Clip(model, config, text_tokenizer)
    tokens = ClipTextTokens(text_tokenizer, config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, int(warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                        / steps)))
    step = 0
    state_path = f"{out_path}.state"
    if os.path.isfile(state_path):
        state = load_torch_file(state_path)
        if state.get("format") != STATE_FORMAT or state.get("config") != config.to_dict():
            raise ValueError(f"{state_path}: an unfinished CLIP training of other settings; "
                             f"delete it to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    writer = None
    if tensorboard_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(tensorboard_dir, purge_step=step + 1 if step else None)
    start = time.time()
    bar = progress_bar(total=steps, initial=step, desc="clip", unit="step",
                       disable=not progress or rank != 0)
    model.train()
    while step < steps:
        index = batch_indices(train, step, batch_size, seed, rank, world)
        images = clip.normalize(pixels[index].to(device))
        texts = tokens.ids([captions[i] for i in index.tolist()]).to(device)
        image_features, text_features, logit_scale = trained(images, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        if rank == 0 and (step % 25 == 0 or step == steps):
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{logit_scale.item():.1f}",
                            refresh=False)
            if writer:
                writer.add_scalar("clip/loss", loss.item(), step)
                writer.add_scalar("clip/logit_scale", logit_scale.item(), step)
                writer.add_scalar("clip/lr", schedule.get_last_lr()[0], step)
        if writer and (step % eval_interval == 0 or step == steps):
            model.eval()
            figures = evaluate(clip, pixels[held], [captions[i] for i in held.tolist()])
            model.train()
            for name, value in figures.items():
                writer.add_scalar(f"clip/heldout_{name}", value, step)
        if step % save_interval == 0 and step < steps and rank == 0:
            write_torch_atomic(state_path, {
                "format": STATE_FORMAT, "config": config.to_dict(), "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "rng": torch.get_rng_state()})
    bar.close()
    model.eval()
    figures = evaluate(clip, pixels[held], [captions[i] for i in held.tolist()])
    figures.update(steps=steps, seconds=time.time() - start, train_pairs=len(train))
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        clip.save(out_path, text_tokenizer.sha256)
        if os.path.isfile(state_path):
            os.remove(state_path)
        if writer:
            writer.close()
    if world > 1:
        dist.barrier()
    figures["path"] = out_path
    return figures
