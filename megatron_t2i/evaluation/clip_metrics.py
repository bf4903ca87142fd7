"""Figures that need the CLIP trained here: how well samples match their captions in its space
(CLIP score, R-precision), and how good the CLIP itself is on held-out pairs (retrieval both
ways, the gap between the cosine of a picture with its own caption and with others)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_t2i.tokenizers.train_clip import evaluate as clip_retrieval


def to_clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """float [N, 3, S, S] in [0, 1] -> uint8 [N, 3, size, size]."""
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bicubic",
                               antialias=True).clamp(0, 1)
    return (images * 255).round().byte()


@torch.no_grad()
def clip_figures(clip, samples: torch.Tensor, captions: list[str], pool: list[str],
                 truth: torch.Tensor, truth_captions: list[str], best: list[int] | None = None,
                 candidates: int = 100) -> dict:
    """samples [N, 3, S, S] in [0, 1] with the caption each was drawn for; pool: other captions
    (held-out, >= candidates - 1 of them) the R-precision draws distractors from; truth: the
    held-out pictures [M, 3, S, S] with their own captions; best: the indices of the reranked
    samples, reported apart."""
    size = clip.config.image_size
    image = clip.encode_pixels(to_clip_pixels(samples, size))                     # [N, D]
    unique = sorted(set(captions) | set(pool))
    text = dict(zip(unique, clip.encode_texts(unique)))
    own = torch.stack([text[c] for c in captions])                               # [N, D]
    cosine = (image * own).sum(1)                                                # [N]
    hits = []
    for i, caption in enumerate(captions):  # own caption among candidates - 1 distractors
        others = [c for c in pool if c != caption][:candidates - 1]
        sims = image[i] @ torch.stack([text[c] for c in others]).T
        hits.append(bool((sims < cosine[i]).all()))
    hits = torch.tensor(hits, dtype=torch.float)
    out = {"clip_score": cosine.mean().item(), "r_precision": hits.mean().item(),
           "candidates": min(candidates, len(pool) + 1), "samples": len(captions)}
    if best:
        out.update(clip_score_reranked=cosine[best].mean().item(),
                   r_precision_reranked=hits[best].mean().item())
    ids = [clip.tokens.text.encode(c, clip.config.max_text_tokens) for c in truth_captions]
    out["clip_heldout"] = clip_retrieval(clip, to_clip_pixels(truth, size), ids)
    return out
