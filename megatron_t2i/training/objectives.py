"""Training objectives: what a batch's outputs are scored by, behind one interface the loop and the
pipeline's last stage share.

    objective.prepare(batch)          -> batch with what the loss needs added (before forward,
                                         e.g. per-target weights), on the batch's device
    objective.weight(batch)           -> this micro-batch's share of the normaliser (a scalar);
                                         the loop all-reduces the global batch's total first, so
                                         any split over ranks and accumulation steps gives the
                                         same gradient
    objective.loss(outputs, batch)    -> (weighted sum of the loss, metric sums float64 [M])
    objective.summary(metric sums)    -> {name: value} for logs and TensorBoard, "loss" included
    objective.label_keys              the batch entries the pipeline's last stage receives

A new objective is one class here and one entry in OBJECTIVES, named by the tasks that train with
it (megatron_t2i/tasks.py).
"""
from __future__ import annotations

import torch

from megatron_t2i import mpu
from megatron_t2i import tasks as registry
from megatron_t2i.model.diffusion import latent_positions


class TokenCrossEntropy:
    """Cross entropy of the LM head's logits at every target token; the caption's targets in
    caption-first sequences (text->image, super-resolution: those starting with [ROI1]) weighted
    by txt_loss_scale. In the caption direction the text is what the model learns to write, so
    its targets keep weight 1. Reported apart for image and text targets.

    Of a CVAE model (model/cvae.py; outputs (logits, KL [B])), plus beta * Σ KL over its images:
    the objective is normalised per target, so beta = 1 is the ELBO per token. beta rises
    linearly from 0 over the first kl_warmup iterations (the loop calls at_iteration), so the
    decoder learns to read z before the prior pulls the posterior in."""

    label_keys = ("labels", "loss_mask", "weights")
    # [image loss sum, image targets, text loss sum, text targets, KL sum, images with a latent]
    metric_size = 6

    def __init__(self, layout, txt_loss_scale: float = 1.0, kl_weight: float = 1.0,
                 kl_warmup: int = 0, **unused):
        self.layout, self.txt_loss_scale = layout, txt_loss_scale
        self.kl_weight, self.kl_warmup, self.beta = kl_weight, kl_warmup, kl_weight

    def at_iteration(self, iteration: int) -> None:
        """Set the KL weight of the step after `iteration` steps."""
        ramp = min(1.0, (iteration + 1) / self.kl_warmup) if self.kl_warmup else 1.0
        self.beta = self.kl_weight * ramp

    def prepare(self, batch: dict) -> dict:
        is_image = batch["labels"] < self.layout.num_image_codes
        caption_first = batch["tokens"][:, :1] == self.layout["[ROI1]"]        # [B, 1]
        scale = torch.where(is_image | ~caption_first, 1.0, self.txt_loss_scale)
        return {**batch, "weights": batch["loss_mask"] * scale}

    def weight(self, batch: dict) -> torch.Tensor:
        return batch["weights"].sum()

    def loss(self, outputs, batch: dict, weights=None):
        """-> (Σ weights · per-token loss [+ beta Σ KL], [image loss sum, image count, text loss
        sum, text count, KL sum, latent count]). weights: instead of batch["weights"] (already
        scaled by the loop)."""
        logits, kl = outputs if isinstance(outputs, tuple) else (outputs, None)
        labels, loss_mask = batch["labels"], batch["loss_mask"]
        per_token = mpu.vocab_parallel_cross_entropy(logits.float(), labels)
        with torch.no_grad():
            mask = loss_mask > 0
            image = mask & (labels < self.layout.num_image_codes)
            text = mask & ~image
            latents = batch["latent_mask"].sum() if kl is not None else per_token.new_zeros(())
            sums = torch.stack([(per_token * image).sum(), image.sum(), (per_token * text).sum(),
                                text.sum(), kl.sum() if kl is not None else latents,
                                latents]).double()
        weights = batch["weights"] if weights is None else weights
        total = (per_token * weights).sum()
        return (total + self.beta * kl.float().sum() if kl is not None else total), sums

    @staticmethod
    def summary(sums: torch.Tensor) -> dict[str, float]:
        s = sums.tolist()
        out = {"image_loss": s[0] / max(s[1], 1), "text_loss": s[2] / max(s[3], 1),
               "loss": (s[0] + s[2]) / max(s[1] + s[3], 1)}
        if s[5]:
            out["kl"] = s[4] / s[5]  # nats per image
        return out


class X0MeanSquaredError:
    """A denoiser's objective (model/diffusion.py): the mean squared error of its x0 prediction
    at every latent patch, per channel, each patch weighted 1 (TLD's loss). Reported also apart
    for noise levels below and above 0.5, where the task is touch-up and invention.

    Masked training (MaskDiT, model/masked.py; batches with visible_patches): the x0 error at
    the patches the trunk read, plus mask_loss_weight times the error of the prediction at each
    hidden patch against its noisy input x_t, the patch the model did not see (MaskDiT's MAE
    term). Normalised by the visible patches, so with every patch visible it is the plain loss."""

    label_keys = ("tokens", "targets", "noise_level", "weights")
    # [x0 loss sum, patches, the same at sigma < 0.5, patches there, hidden-patch loss sum, count]
    metric_size = 6

    def __init__(self, layout, txt_loss_scale: float = 1.0, mask_loss_weight: float = 0.1,
                 **unused):
        self.latent_token = layout["[ENC]"]
        self.mask_loss_weight = mask_loss_weight

    def at_iteration(self, iteration: int) -> None:
        pass

    def prepare(self, batch: dict) -> dict:
        x0 = batch["x0"]
        visible = batch.get("visible_patches")
        if visible is None:
            return {**batch, "weights": torch.ones(x0.shape[:2], device=x0.device),
                    "targets": x0}
        weights = torch.where(visible, 1.0, self.mask_loss_weight).to(x0.dtype)
        targets = torch.where(visible[..., None], x0, batch["noisy_latents"])
        return {**batch, "weights": weights, "targets": targets}

    def weight(self, batch: dict) -> torch.Tensor:
        visible = batch.get("visible_patches")
        return batch["weights"].sum() if visible is None else visible.sum().to(torch.float32)

    def loss(self, outputs, batch: dict, weights=None):
        targets = batch["targets"]                                              # [B, N, d]
        where = latent_positions(batch["tokens"], self.latent_token, targets.shape[1])
        pred = outputs[where].view(targets.shape).float()
        per_patch = (pred - targets.float()).pow(2).mean(-1)                   # [B, N]
        with torch.no_grad():
            visible = batch.get("visible_patches")
            seen = torch.ones_like(per_patch) if visible is None else visible.to(per_patch.dtype)
            low = (batch["noise_level"] < 0.5).to(per_patch.dtype)[:, None] * seen
            sums = torch.stack([(per_patch * seen).sum(), seen.sum(), (per_patch * low).sum(),
                                low.sum(), (per_patch * (1 - seen)).sum(),
                                (1 - seen).sum()]).double()
        weights = batch["weights"] if weights is None else weights
        return (per_patch * weights).sum(), sums

    @staticmethod
    def summary(sums: torch.Tensor) -> dict[str, float]:
        s = sums.tolist()
        out = {"loss": s[0] / max(s[1], 1), "x0_loss": s[0] / max(s[1], 1)}
        if s[3]:
            out["x0_loss_low_noise"] = s[2] / s[3]
        if s[1] > s[3]:
            out["x0_loss_high_noise"] = (s[0] - s[2]) / (s[1] - s[3])
        if s[5]:
            out["hidden_patch_loss"] = s[4] / s[5]
        return out


OBJECTIVES = {"token-ce": TokenCrossEntropy, "x0-mse": X0MeanSquaredError}


def build_objective(names, layout, txt_loss_scale: float = 1.0, **options):
    """The one objective the tasks `names` train with (megatron_t2i/tasks.py)."""
    kinds = {registry.get(n).objective for n in names}
    if len(kinds) != 1:
        raise ValueError(f"--tasks {', '.join(names)} train with different objectives "
                         f"({', '.join(sorted(kinds))}); train them in separate runs")
    kind = kinds.pop()
    if kind not in OBJECTIVES:
        raise ValueError(f"objective {kind!r} of --tasks is not known; known: "
                         f"{', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind](layout, txt_loss_scale, **options)
