"""Distributed, resumable sampling of training sequences.

The global order is a seeded permutation of the training indices per epoch. Each optimiser step
consumes `global_batch = micro_batch * data_parallel_size * accumulation` samples; inside each
slice of `micro_batch * dp` samples, data-parallel rank r takes [r*micro, (r+1)*micro). Hence
  * the state is one number, the samples consumed so far: a resumed run continues exactly, also
    on another data-parallel size with the same global batch;
  * DP=2 with micro-batch b sees exactly the samples DP=1 sees with micro-batch 2b.

Every sample also gets its own seed from (seed, global position), which decides its task and
whether its text is dropped (classifier-free guidance), so these choices too survive a resume.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_t2i import tasks as registry
from megatron_t2i.data.latents import random_known_mask
from megatron_t2i.model.diffusion import noised
from megatron_t2i.tokenizers.layout import TokenLayout, block_ids, real_length


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, held-out) indices of a data set of n records, the same for every run."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    n_eval = int(round(n * holdout_fraction))
    if holdout_fraction > 0 and n_eval == 0 and n > 1:
        n_eval = 1
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


class ResumableSampler:
    """Yields (record index, sample seed) for one data-parallel rank, forever, from `consumed`."""

    def __init__(self, indices, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, consumed: int = 0):
        if len(indices) == 0:
            raise ValueError("no training records to sample from (empty data set or split)")
        self.indices = np.asarray(indices)
        self.micro, self.rank, self.size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.consumed = consumed  # global samples consumed; what a checkpoint stores

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))

    def position(self, global_position: int) -> tuple[int, int]:
        n = len(self.indices)
        epoch, offset = divmod(global_position, n)
        index = int(self.indices[self._permutation(epoch)[offset]])
        sample_seed = int(np.random.default_rng([self.seed, 1, global_position]).integers(2**31))
        return index, sample_seed

    def next_micro_batch(self) -> list[tuple[int, int]]:
        start = self.consumed + self.rank * self.micro
        batch = [self.position(start + i) for i in range(self.micro)]
        self.consumed += self.micro * self.size
        return batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"data position was saved with seed {state.get('seed')}, "
                             f"this run uses --seed {self.seed}")
        self.consumed = int(state["consumed"])


class SequenceBuilder:
    """Turns records into fixed-length training sequences of one or several tasks (names of
    megatron_t2i/tasks.py with their weights).

    Task "super-resolution" needs records with low-resolution codes (preprocess --sr-low-res):
    the image at half the side, (grid/2)^2 codes, is the low-resolution window and the image's
    grid^2 codes the high-resolution one; the whole image is one window. This is what inference
    asks of the model: there each window pairs (grid/2)^2 codes of the input image with grid^2
    codes of the output at twice the side, i.e. the same area at the same pixel scale ratio, 2x
    (codes of one VQ-VAE always cover the same number of pixels).
    """

    def __init__(self, layout: TokenLayout, tasks: dict[str, float] | None = None,
                 text_dropout: float = 0.0, condition_slots: int = 0,
                 condition_noise: float = 0.0, latent_dim: int = 0, latent_table=None,
                 noise_beta: tuple[float, float] = (0.75, 0.75), mask_ratio: float = 0.0,
                 inpaint_share: float | None = None):
        """condition_slots: the [MASK] slots of a conditioned task's template (the model's);
        condition_noise: LAFITE's xi, see perturb; latent_dim: of a CVAE model, the size of the
        noise each text->image sample draws for its latent (its posterior reads the record's
        clip_image array). latent_table [K, d]: of a denoiser, the (scaled) latent patch of each
        image code; noise_beta: the Beta(a, b) its noise levels are drawn from (TLD's 0.75,
        0.75: most mass near 0 and 1); mask_ratio: the share of its patches hidden from the
        trunk (MaskDiT, model/masked.py; 0: none), an attribute the trainer sets to 0 for the
        unmasked fine-tune; inpaint_share: of a denoiser with an inpainting channel (None:
        without), the share of samples given some of their patches (data/latents.py,
        random_known_mask), the others none."""
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"--mask-ratio {mask_ratio}: must be in [0, 1)")
        if inpaint_share is not None and not 0 <= inpaint_share <= 1:
            raise ValueError(f"--inpaint-masks {inpaint_share}: must be in [0, 1]")
        self.mask_ratio, self.inpaint_share = mask_ratio, inpaint_share
        self.layout, self.latent_dim = layout, latent_dim
        self.latent_table, self.noise_beta = latent_table, noise_beta
        self.condition_slots, self.condition_noise = condition_slots, condition_noise
        weights = tasks or {"text2image": 1.0}
        self.tasks = [registry.get(name) for name in weights]
        not_trained = [t.name for t in self.tasks if not t.trainable]
        if not_trained:
            raise ValueError(f"tasks {not_trained} are not trained on their own; trainable: "
                             f"{', '.join(registry.trainable())}")
        total = sum(weights.values())
        if total <= 0 or min(weights.values()) < 0:
            raise ValueError(f"task weights must be non-negative and not all zero: {weights}")
        self.cumulative = np.cumsum([w / total for w in weights.values()])
        self.text_dropout = text_dropout
        self.length = max(t.seq_length(layout) for t in self.tasks)

    def __call__(self, text_ids, image_codes, sample_seed: int, low_codes=None, arrays=None):
        rng = np.random.default_rng(sample_seed)
        task = self.tasks[int(np.searchsorted(self.cumulative, rng.random(), side="right").clip(
            max=len(self.tasks) - 1))]
        dropped = task.caption_dropout and rng.random() < self.text_dropout
        if dropped:
            text_ids = []  # unconditional sample, for classifier-free guidance
        if task.needs_low_codes and low_codes is None:
            raise ValueError(f"--tasks {task.name} needs low-resolution codes in every record; "
                             f"this data set has none: preprocess it with --sr-low-res")
        if task.condition:
            seq = self._conditioned(task, image_codes, arrays, rng, dropped)
        elif task.latents:
            seq = self.layout.text_to_latents(text_ids)
        else:
            seq = self.layout.template(task.template, text_ids, image_codes, low_codes)
        if task.latents:
            self._noise(seq, image_codes, rng)
        if self.latent_dim and task.template == "text_to_image":
            seq.latent_source = self._array(task, arrays, "clip_image")
            seq.latent_noise = torch.from_numpy(rng.standard_normal(self.latent_dim)).float()
        pad = self.length - seq.tokens.numel()
        if pad:  # tasks of a mixture share one length
            seq.tokens = torch.cat([seq.tokens, seq.tokens.new_full((pad,), self.layout["[PAD]"])])
            seq.position_ids = torch.cat([seq.position_ids, seq.position_ids[-1:].expand(pad)])
            seq.loss_mask = torch.cat([seq.loss_mask, seq.loss_mask.new_zeros(pad)])
            if seq.targets is not None:
                seq.targets = torch.cat([seq.targets, seq.targets.new_full((pad,),
                                                                           self.layout["[PAD]"])])
        if task.attention != "causal" and seq.block_ids is None:
            seq.block_ids = block_ids(task.attention, self.length, prefix=seq.image_start,
                                      real=real_length(seq.tokens, self.layout["[PAD]"]))
        elif seq.block_ids is not None and pad:
            after = int(seq.block_ids.max()) + 1
            seq.block_ids = torch.cat([seq.block_ids, torch.arange(after, after + pad)])
        return seq

    @staticmethod
    def _array(task, arrays, name: str) -> torch.Tensor:
        if not arrays or name not in arrays:
            raise ValueError(f"--tasks {task.name} needs the array {name!r} in every record; "
                             f"this data set has none: preprocess it with --clip FILE")
        return torch.from_numpy(np.asarray(arrays[name], dtype=np.float32).reshape(-1))

    def _conditioned(self, task, image_codes, arrays, rng, dropped: bool):
        f = self._array(task, arrays, task.condition).double().numpy()
        if not self.condition_slots:
            raise ValueError(f"--tasks {task.name}: a model without condition slots")
        seq = self.layout.condition_to_latents(self.condition_slots) if task.latents \
            else self.layout.condition_to_image(self.condition_slots, image_codes)
        seq.condition = torch.from_numpy(
            np.zeros_like(f) if dropped else perturb(f, self.condition_noise, rng)).float()
        seq.condition_present = not dropped
        return seq

    def _noise(self, seq, image_codes, rng) -> None:
        """A denoiser's sequence (layout.text_to_latents or condition_to_latents) gets its record's
        x0, the codebook latents of its codes, noised to x_t = (1 - sigma) x0 + sigma e at a sigma
        ~ Beta(noise_beta) of its own; with a mask ratio, also the patches its trunk reads."""
        if self.latent_table is None:
            raise ValueError("a denoising task needs the latent table of the image tokenizer")
        x0 = self.latent_table[self.layout.image_codes(image_codes, self.layout.image_tokens)
                               .numpy()]                                              # [N, d]
        sigma = float(rng.beta(*self.noise_beta))
        noise = torch.from_numpy(rng.standard_normal(x0.shape))
        seq.x0 = torch.from_numpy(x0).float()
        seq.noisy_latents = noised(torch.from_numpy(x0).double(), noise, sigma).float()
        seq.noise_level = sigma
        if self.mask_ratio:
            n = len(x0)
            seq.visible = torch.zeros(n, dtype=torch.bool)
            keep = max(1, n - round(self.mask_ratio * n))
            seq.visible[torch.from_numpy(rng.permutation(n)[:keep])] = True
        if self.inpaint_share is not None:  # a model with an inpainting channel
            known = np.zeros(len(x0), dtype=bool)
            if self.inpaint_share and rng.random() < self.inpaint_share:
                known = random_known_mask(self.layout.image_grid, rng)
            seq.known_mask = torch.from_numpy(known)


def perturb(f: np.ndarray, xi: float, rng: np.random.Generator) -> np.ndarray:
    """LAFITE's noise for language-free training: normalise((1 - xi) f + xi normalise(e)), e
    standard normal, f normalised first; xi = 0 is f itself (normalised), unchanged when it is
    a unit vector already. It blurs the image embedding towards the cone where the CLIP's text
    embeddings of its captions lie."""
    f = f / max(np.linalg.norm(f), 1e-12)
    if xi == 0:
        return f
    e = rng.standard_normal(f.shape)
    h = (1 - xi) * f + xi * e / max(np.linalg.norm(e), 1e-12)
    return h / max(np.linalg.norm(h), 1e-12)


def collate(sequences) -> dict[str, torch.Tensor]:
    """Stack sequences into model inputs: tokens/positions [B, L-1], labels/loss_mask [B, L-1]
    (labels: the sequences' targets where they have them, e.g. L-shape slots), and block_ids [B, L-1] of the inputs when any sequence is not causal (the attention mask the
    model gets is model.attention.block_causal_mask of them; causal rows count 0, 1, 2...)."""
    tokens = torch.stack([s.tokens for s in sequences])
    positions = torch.stack([s.position_ids for s in sequences])
    loss_mask = torch.stack([s.loss_mask for s in sequences])
    labels = torch.stack([s.targets if s.targets is not None else s.tokens for s in sequences])
    batch = {"tokens": tokens[:, :-1], "position_ids": positions[:, :-1], "labels": labels[:, 1:],
             "loss_mask": loss_mask[:, 1:]}
    if any(s.block_ids is not None for s in sequences):
        ids = torch.stack([s.block_ids if s.block_ids is not None else torch.arange(len(s.tokens))
                           for s in sequences])
        batch["block_ids"] = ids[:, :-1]
    conditioned = [s.condition for s in sequences if s.condition is not None]
    if conditioned:  # rows without one (other tasks of a mixture) read no slots
        zero = torch.zeros_like(conditioned[0])
        batch["condition"] = torch.stack([s.condition if s.condition is not None else zero
                                          for s in sequences])
        batch["condition_mask"] = torch.tensor([s.condition is not None and s.condition_present
                                                for s in sequences])
    latent = [s for s in sequences if s.latent_noise is not None]
    if latent:  # rows without one (the caption direction) get no CVAE context
        source, noise = torch.zeros_like(latent[0].latent_source), torch.zeros_like(
            latent[0].latent_noise)
        batch["latent_source"] = torch.stack([s.latent_source if s.latent_noise is not None
                                              else source for s in sequences])
        batch["latent_noise"] = torch.stack([s.latent_noise if s.latent_noise is not None
                                             else noise for s in sequences])
        batch["latent_mask"] = torch.tensor([s.latent_noise is not None for s in sequences])
    if sequences[0].x0 is not None:  # a denoiser's batch (its objective trains no other task)
        batch["x0"] = torch.stack([s.x0 for s in sequences])
        batch["noisy_latents"] = torch.stack([s.noisy_latents for s in sequences])
        batch["noise_level"] = torch.tensor([s.noise_level for s in sequences])
        if sequences[0].visible is not None:
            batch["visible_patches"] = torch.stack([s.visible for s in sequences])
        if sequences[0].known_mask is not None:
            batch["known_mask"] = torch.stack([s.known_mask for s in sequences])
            batch["known_latents"] = batch["x0"] * batch["known_mask"][..., None]
    return batch


def target_length(target_mask: torch.Tensor) -> int:
    """Columns up to the last one in which a row of target_mask [B, L] has a target (at least 1).
    Cutting a batch there drops only trailing padding: exact, since no real token attends to it
    (causal attention sees nothing after it; other kinds put padding in blocks of its own, see
    model.attention.block_ids) and those columns carry no loss."""
    has_target = (target_mask != 0).any(dim=0)                              # [L]
    return int(has_target.nonzero().max()) + 1 if has_target.any() else 1


def trim_padding(batch: dict[str, torch.Tensor], length: int | None = None) -> dict[str, torch.Tensor]:
    """The batch cut to `length` columns, by default to target_length of its loss mask (the
    padding after the longest sequence goes). Not for the pipeline engine, which wants one shape
    throughout."""
    length = target_length(batch["loss_mask"]) if length is None else length
    return {k: v[:, :length] if k in PER_TOKEN else v for k, v in batch.items()}


PER_TOKEN = ("tokens", "position_ids", "labels", "loss_mask", "block_ids")  # [B, L] entries


def open_dataset(paths: list[str]):
    """One data set over --data-path: LMDB folders written by preprocess, or CogView .bin files.
    All must share a token layout; returns (dataset, layout)."""
    from torch.utils.data import ConcatDataset

    from megatron_t2i.data.cogview_bin import CogViewBinaryDataset
    from megatron_t2i.data.lmdb_store import TokenDataset

    parts = [CogViewBinaryDataset(p) if p.endswith(".bin") else TokenDataset(p) for p in paths]
    layout = parts[0].layout
    for part, path in zip(parts[1:], paths[1:]):
        layout.check_compatible(part.layout, f"--data-path {path}")
    return (parts[0] if len(parts) == 1 else ConcatDataset(parts)), layout
