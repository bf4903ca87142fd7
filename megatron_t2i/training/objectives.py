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

A new objective (a CE + KL of a CVAE, an x0 loss of a denoiser) is one class here and one entry in
OBJECTIVES, named by the tasks that train with it (megatron_t2i/tasks.py).
"""
from __future__ import annotations

import torch

from megatron_t2i import mpu
from megatron_t2i import tasks as registry


class TokenCrossEntropy:
    """Cross entropy of the LM head's logits at every target token; the caption's targets in
    caption-first sequences (text->image, super-resolution: those starting with [ROI1]) weighted
    by txt_loss_scale. In the caption direction the text is what the model learns to write, so
    its targets keep weight 1. Reported apart for image and text targets."""

    label_keys = ("labels", "loss_mask", "weights")
    metric_size = 4  # [image loss sum, image targets, text loss sum, text targets]

    def __init__(self, layout, txt_loss_scale: float = 1.0):
        self.layout, self.txt_loss_scale = layout, txt_loss_scale

    def prepare(self, batch: dict) -> dict:
        is_image = batch["labels"] < self.layout.num_image_codes
        caption_first = batch["tokens"][:, :1] == self.layout["[ROI1]"]        # [B, 1]
        scale = torch.where(is_image | ~caption_first, 1.0, self.txt_loss_scale)
        return {**batch, "weights": batch["loss_mask"] * scale}

    def weight(self, batch: dict) -> torch.Tensor:
        return batch["weights"].sum()

    def loss(self, logits, batch: dict, weights=None):
        """-> (Σ weights · per-token loss, [image loss sum, image count, text loss sum, text
        count]). weights: instead of batch["weights"] (already scaled by the loop)."""
        labels, loss_mask = batch["labels"], batch["loss_mask"]
        per_token = mpu.vocab_parallel_cross_entropy(logits.float(), labels)
        with torch.no_grad():
            mask = loss_mask > 0
            image = mask & (labels < self.layout.num_image_codes)
            text = mask & ~image
            sums = torch.stack([(per_token * image).sum(), image.sum(), (per_token * text).sum(),
                                text.sum()]).double()
        weights = batch["weights"] if weights is None else weights
        return (per_token * weights).sum(), sums

    @staticmethod
    def summary(sums: torch.Tensor) -> dict[str, float]:
        s = sums.tolist()
        return {"image_loss": s[0] / max(s[1], 1), "text_loss": s[2] / max(s[3], 1),
                "loss": (s[0] + s[2]) / max(s[1] + s[3], 1)}


OBJECTIVES = {"token-ce": TokenCrossEntropy}


def build_objective(names, layout, txt_loss_scale: float = 1.0):
    """The one objective the tasks `names` train with (megatron_t2i/tasks.py)."""
    kinds = {registry.get(n).objective for n in names}
    if len(kinds) != 1:
        raise ValueError(f"--tasks {', '.join(names)} train with different objectives "
                         f"({', '.join(sorted(kinds))}); train them in separate runs")
    kind = kinds.pop()
    if kind not in OBJECTIVES:
        raise ValueError(f"objective {kind!r} of --tasks is not known; known: "
                         f"{', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind](layout, txt_loss_scale)
