"""The figures of an evaluation, none of which needs a pretrained network:

  - caption alignment: the share of what captions name that the attribute reader finds in the
    images made from them (colour, kind, size, position, count, background; per attribute, overall
    and per image);
  - diversity: how different the samples of one prompt are (pixel distances);
  - tokenizer reconstruction: PSNR, SSIM, code usage and codebook perplexity;
  - held-out token loss, split into image and text targets.

Images are float tensors [B, 3, H, W] in [0, 1] throughout.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from megatron_t2i.data.loader import SequenceBuilder, collate
from megatron_t2i.evaluation.reader import gaussian_kernel
from megatron_t2i.progress import progress_bar
from megatron_t2i.tokenizers.vqvae import code_usage, psnr
from megatron_t2i.training.loop import attention_mask, condition_inputs
from megatron_t2i.training.objectives import TokenCrossEntropy, build_objective

SHAPE_ATTRIBUTES = ("colour", "kind", "size", "position")  # checked once per named shape
IMAGE_ATTRIBUTES = ("count", "background")                  # checked once per image


# ---- caption alignment ---------------------------------------------------------------------------
def check_image(found: dict, wanted: dict) -> dict[str, list[bool]]:
    """What the reader found in one image against the attributes its caption names ->
    {attribute: [bool per check]}. A named shape counts for colour, kind and size only where the
    reader sees a shape at the named cell (position); count compares the number of shapes (so a
    picture with an extra shape fails it), background the background colour."""
    at = {(s["row"], s["col"]): s for s in found["shapes"]}
    checks = {name: [] for name in SHAPE_ATTRIBUTES + IMAGE_ATTRIBUTES}
    for shape in wanted["shapes"]:
        seen = at.get((shape["row"], shape["col"]))
        checks["position"].append(seen is not None)
        for name in ("colour", "kind", "size"):
            checks[name].append(seen is not None and seen[name] == shape[name])
    checks["count"].append(len(found["shapes"]) == len(wanted["shapes"]))
    checks["background"].append(found["background"] == wanted["background"])
    return checks


def alignment(found: list[dict], wanted: list[dict]) -> dict:
    """Readings vs ground truth of N images -> {"colour": share, ..., "overall": share of all
    checks, "exact": share of images that pass every check, "images": N, "per_image": [bool]}."""
    if len(found) != len(wanted):
        raise ValueError(f"alignment: {len(found)} readings for {len(wanted)} captions")
    passed = {name: 0 for name in SHAPE_ATTRIBUTES + IMAGE_ATTRIBUTES}
    total = dict(passed)
    per_image = []
    for f, w in zip(found, wanted):
        checks = check_image(f, w)
        for name, results in checks.items():
            passed[name] += sum(results)
            total[name] += len(results)
        per_image.append(all(itertools.chain(*checks.values())))
    out = {name: passed[name] / total[name] if total[name] else float("nan") for name in passed}
    out["overall"] = sum(passed.values()) / max(1, sum(total.values()))
    out["exact"] = sum(per_image) / max(1, len(per_image))
    out["images"] = len(per_image)
    out["per_image"] = per_image
    return out


def without_per_image(a: dict) -> dict:
    """An alignment() result without its per-image list (what reports keep)."""
    return {k: v for k, v in a.items() if k != "per_image"}


def alignment_by_caption(found: list[dict], wanted: list[dict]) -> dict[str, dict]:
    """alignment() of each kind of caption: {"en, 1 shape": {...}, "zh, 2 shapes": {...}, ...}
    (language from the attributes when they name it), without per-image results."""
    groups: dict[str, tuple[list, list]] = {}
    for f, w in zip(found, wanted):
        n = len(w["shapes"])
        name = (f"{w['language']}, " if "language" in w else "") + f"{n} shape{'s' * (n != 1)}"
        group = groups.setdefault(name, ([], []))
        group[0].append(f)
        group[1].append(w)
    return {name: without_per_image(alignment(*groups[name])) for name in sorted(groups)}


# ---- diversity -----------------------------------------------------------------------------------
def pairwise_distances(samples: torch.Tensor) -> torch.Tensor:
    """[K, 3, H, W] -> RMS pixel distance of every unordered pair [K*(K-1)/2]."""
    flat = samples.flatten(1).double()
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5  # [K, K]
    i, j = torch.triu_indices(len(flat), len(flat), offset=1)
    return d[i, j]


def diversity(groups: list[torch.Tensor], threshold: float = 0.05) -> dict:
    """Samples of each prompt ([K, 3, H, W] per prompt) -> {"pairwise_distance": mean RMS
    distance between two samples of a prompt, "distinct_pairs": share of such pairs farther apart
    than `threshold` (0 when every prompt's samples are identical), "threshold"}."""
    distances = [pairwise_distances(g) for g in groups if len(g) > 1]
    if not distances:
        return {"pairwise_distance": float("nan"), "distinct_pairs": float("nan"),
                "threshold": threshold}
    d = torch.cat(distances)
    return {"pairwise_distance": d.mean().item(),
            "distinct_pairs": (d > threshold).double().mean().item(), "threshold": threshold}


# ---- reconstruction ------------------------------------------------------------------------------
def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, [B]: local means, variances and
    covariance under a Gaussian window, per channel, over every position where the window fits
    inside the image ("valid"), averaged over positions and channels.

        SSIM = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)),
        C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = data_range
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim: need two [B, C, H, W] tensors of one shape, got {list(a.shape)} "
                         f"and {list(b.shape)}")
    if window % 2 == 0:
        raise ValueError(f"ssim: the window must have an odd side, got {window}")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"ssim: images of {list(a.shape[-2:])} pixels are smaller than the "
                         f"{window}x{window} window")
    c = a.shape[1]
    g = gaussian_kernel(sigma, window // 2, torch.float64)
    w = (g[:, None] * g[None, :]).expand(c, 1, window, window)  # [C, 1, window, window]
    a, b = a.double(), b.double()

    def local_mean(x):  # [B, C, H, W] -> [B, C, H-window+1, W-window+1]
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a ** 2
    var_b = local_mean(b * b) - mu_b ** 2
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1)
                                                     * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def tokenizer_figures(tokenizer, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Round trip of held-out images [N, 3, S, S] (the tokenizer's size) through an
    ImageTokenizer -> {"psnr", "ssim" (means), "code_usage" (share of the codebook the images
    use), "perplexity" (exp entropy of the code histogram), "images"}."""
    codes, p, s = [], [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        c = tokenizer.encode_images(tokenizer.normalize(x))
        y = tokenizer.decode_to_tensor(c)
        codes.append(c)
        p.append(psnr(y, x))
        s.append(ssim(y, x))
    usage, perplexity = code_usage(torch.cat(codes), tokenizer.codebook_size)
    return {"psnr": torch.cat(p).mean().item(), "ssim": torch.cat(s).mean().item(),
            "code_usage": usage, "perplexity": perplexity, "codebook_size": tokenizer.codebook_size,
            "images": images.shape[0]}


# ---- held-out token loss -------------------------------------------------------------------------
@torch.no_grad()
def heldout_losses(model, layout, dataset, indices, batch_size: int = 8, device="cpu",
                   progress: bool = True, task: str = "text2image", latent_table=None) -> dict:
    """Mean loss of `model` on the `task` sequences (text2image; clip2image of a CLIP-conditioned
    model) of records `indices` of `dataset`, over image targets and over text targets (every
    non-image target: caption tokens and the special tokens around them), as training's
    evaluation splits it (a CVAE's KL aside); of a denoiser (task diffusion, latent_table its
    scaled codebook latents), the x0 loss at the noise level each record draws from its index as
    the seed. Single process."""
    builder = SequenceBuilder(layout, {task: 1.0}, text_dropout=0.0,  # no randomness left
                              condition_slots=model.config.condition_slots,
                              latent_dim=model.config.latent_dim, latent_table=latent_table)
    objective = build_objective([task], layout)
    sums = torch.zeros(objective.metric_size, dtype=torch.float64)
    for start in progress_bar(range(0, len(indices), batch_size), desc="held-out loss",
                              unit="batch", disable=not progress):
        chunk = [int(i) for i in indices[start:start + batch_size]]
        records = [dataset[i] for i in chunk]
        batch = objective.prepare({k: v.to(device) for k, v in
                                   collate([builder(r.text_ids, r.image_codes, i, r.low_codes,
                                                    r.arrays) for i, r in zip(chunk, records)])
                                   .items()})
        # as training evaluates: its attention mask (L-shape: block-causal), its conditions
        # (a CVAE: z from the posterior of the image's CLIP embedding)
        sums += objective.loss(model(batch["tokens"], batch["position_ids"],
                                     attention_mask(batch), **condition_inputs(batch)),
                               batch)[1].cpu()
    counts = {"image_targets": int(sums[1]), "text_targets": int(sums[3])} \
        if isinstance(objective, TokenCrossEntropy) else {"patches": int(sums[1])}
    return {**objective.summary(sums), **counts, "records": len(indices)}
