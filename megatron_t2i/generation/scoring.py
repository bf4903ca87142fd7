"""Log-likelihoods of given sequences: post-selection, reranking, the swap test of evaluation.

`score` is one teacher-forced forward; `score_sequences` runs it over training-template sequences
in rounds; `image_log_likelihood` and `caption_log_likelihood` are the two directions, each
normalised over what may be drawn there (image codes; the caption's text ids and its end token),
so a score is the likelihood under exactly the distribution sampling draws from. Each TP rank
keeps its own vocabulary slice: the vocab-parallel cross entropy never gathers the logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_t2i import mpu
from megatron_t2i.data.loader import target_length
from megatron_t2i.generation.state import check_positions
from megatron_t2i.generation.vocab import caption_vocab_mask, image_vocab_mask
from megatron_t2i.model.attention import block_causal_mask


@torch.no_grad()
def score(model, tokens: torch.Tensor, position_ids: torch.Tensor, target_mask: torch.Tensor,
          allowed: torch.Tensor | None = None, attention_mask=None,
          vocab_size: int | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Log-likelihood of each sequence: Σ over positions i with target_mask[:, i] of
    log p(targets[:, i] | tokens[:, :i]) -> float32 [B] (targets [B, L]: default tokens; an
    L-shape sequence's slots predict their own cells, see TokenLayout.lshape_sequence).

    tokens, position_ids, target_mask [B, L] (target_mask[:, 0] is ignored: nothing predicts the
    first token). allowed: bool [V] over the model's (padded) vocabulary; the distribution is
    renormalised over the allowed ids. vocab_size: the ids in use (layout.vocab_size); the
    embedding's padding rows beyond are excluded too.
    """
    check_positions(model, position_ids, what="score")
    logits = model(tokens[:, :-1], position_ids[:, :-1], attention_mask).float()  # [B, L-1, V/tp]
    rows = logits.shape[-1]
    start = mpu.get_tensor_model_parallel_rank() * rows  # this rank's slice of the vocabulary
    keep = torch.arange(start, start + rows, device=logits.device) < (vocab_size or start + rows)
    if allowed is not None:
        keep &= allowed.to(logits.device)[start:start + rows]
    logits = logits.masked_fill(~keep, float("-inf"))
    targets = tokens if targets is None else targets
    nll = mpu.vocab_parallel_cross_entropy(logits, targets[:, 1:])  # [B, L-1]
    weights = target_mask[:, 1:].to(nll.device, torch.float32)
    # where the weight is 0 the token may be disallowed (nll inf): select instead of multiplying
    return -torch.where(weights > 0, nll * weights, torch.zeros_like(nll)).sum(dim=1)


@torch.no_grad()
def score_sequences(model, seqs, targets, allowed: torch.Tensor, vocab_size: int,
                    batch_size: int = 8) -> torch.Tensor:
    """score() over training-template sequences of one padded length (layout templates with
    pad=True), in rounds of batch_size -> float32 [N] (CPU). targets(labels [b, L], loss_mask
    [b, L]) -> bool [b, L] marks what is scored (labels: the sequences' targets, else tokens); each round drops the columns after its last
    target (trailing pads, which nothing before them attends to)."""
    device = model.word_embeddings.weight.device
    allowed = allowed.to(device)
    out = []
    for start in range(0, len(seqs), batch_size):
        part = seqs[start:start + batch_size]
        tokens = torch.stack([s.tokens for s in part])                # [b, L]
        positions = torch.stack([s.position_ids for s in part])
        labels = torch.stack([s.targets if s.targets is not None else s.tokens for s in part])
        mask = targets(labels, torch.stack([s.loss_mask for s in part]))
        length = target_length(mask)
        blocks = [s.block_ids for s in part]
        attention = block_causal_mask(torch.stack(blocks)[:, :length - 1].to(device)) \
            if blocks[0] is not None else None
        out.append(score(model, tokens[:, :length].to(device), positions[:, :length].to(device),
                         mask[:, :length].to(device), allowed, attention, vocab_size,
                         labels[:, :length].to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def image_log_likelihood(model, layout, codes: torch.Tensor, texts: list[list[int]],
                         batch_size: int = 8) -> torch.Tensor:
    """log p(image_i | text_i) for codes [N, grid^2] and N captions of text ids -> float32 [N]
    (CPU): the text->image template, only the image codes as targets, each normalised over the
    codes. Runs in rounds of batch_size images."""
    seqs = [layout.text_to_image(t, c) for t, c in zip(texts, codes)]
    return score_sequences(model, seqs, lambda labels, _: labels < layout.num_image_codes,
                           image_vocab_mask(layout, model.config.vocab_size), layout.vocab_size,
                           batch_size)


def caption_log_likelihood(model, layout, codes: torch.Tensor, texts: list[list[int]],
                           batch_size: int = 8) -> torch.Tensor:
    """log p(text_i | image_i) for codes [N, grid^2] and N captions of text ids -> float32 [N]
    (CPU): the image->text template; only the caption's tokens and its end token are targets.
    CogView masked the image codes' logits when scoring; the other special tokens are masked as
    well here, as in caption decoding."""
    caption_start = layout.image_tokens + 4  # after [size] [BOI1] codes [EOI1] [ROI1]

    def targets(labels, loss_mask):
        mask = loss_mask > 0
        mask[:, :caption_start] = False  # the image is given, not scored
        return mask

    seqs = [layout.image_to_text(c, t) for c, t in zip(codes, texts)]
    return score_sequences(model, seqs, targets, caption_vocab_mask(layout, model.config.vocab_size),
                           layout.vocab_size, batch_size)


def score_captions(ctx, text: str, codes: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The log-likelihood of `text` given each image of codes [N, grid^2] -> float32 [N]: the
    caption score of post-selection and --rerank-top. On every rank (it runs the model)."""
    ids = ctx.text_tokenizer.encode(text, ctx.layout.max_text_tokens)  # warns once if cut
    return caption_log_likelihood(ctx.model, ctx.layout, torch.as_tensor(codes), [ids] * len(codes),
                                  batch_size)


@torch.no_grad()
def clip_scores(ctx, text: str, codes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the CLIP's embeddings of `text` and of the images of codes [N, grid^2]
    -> float32 [N] (CPU), the same on every rank: the writer decodes and scores, then
    broadcasts (the other ranks have no image tokenizer)."""
    if ctx.clip is None:
        raise ValueError("--rerank clip needs a CLIP: none is stored with the checkpoint; "
                         "pass --clip FILE.pt")
    scores = torch.zeros(len(codes))
    if ctx.is_writer:
        pixels = ctx.image_tokenizer.decode_to_tensor(codes)                # [N, 3, S, S]
        s = ctx.clip.config.image_size
        if pixels.shape[-1] != s:
            pixels = torch.nn.functional.interpolate(pixels, size=(s, s), mode="bicubic",
                                                     antialias=True).clamp(0, 1)
        scores = ctx.clip.encode_pixels((pixels * 255).round().byte()) @ \
            ctx.clip.encode_texts([text])[0]
    if dist.is_initialized() and dist.get_world_size() > 1:
        scores = scores.to(ctx.device)
        dist.broadcast(scores, src=0)
    return scores.float().cpu()


def reads_captions(ctx) -> bool:
    """Whether the model can score a caption given an image: an autoregressive model whose
    position table holds the image->text template (a text->image-only run's does not)."""
    from megatron_t2i.tasks import max_positions
    return (not (ctx.config.condition_slots or ctx.config.latent_channels)
            and ctx.config.max_position_embeddings >= max_positions(ctx.layout, ["image2text"]))


def rerank_kind(ctx, by: str = "auto") -> str:
    """What reranking scores by: auto is the caption likelihood where the model has an
    image->text direction (reads_captions), else clip (CLIP-conditioned models, denoisers,
    text->image-only runs)."""
    captions = reads_captions(ctx)
    if by == "caption" and not captions:
        raise ValueError("--rerank caption: this model has no image->text direction to score "
                         "captions with (a denoiser, a CLIP-conditioned model, or one trained "
                         "without --tasks image2text); use --rerank clip (a CLIP stored with the "
                         "checkpoint or --clip FILE.pt)")
    return ("caption" if captions else "clip") if by == "auto" else by


def ranked(ctx, text: str, codes: torch.Tensor, by: str = "auto"):
    """codes [N, grid^2] by caption score or CLIP similarity -> (order [N], best first; their
    scores [N] in that order). On every rank (scoring runs the model)."""
    kind = rerank_kind(ctx, by)
    scores = (clip_scores if kind == "clip" else score_captions)(ctx, text, codes).float().cpu()
    order = scores.argsort(descending=True)
    return order, scores[order]


def rerank(ctx, text: str, codes: torch.Tensor, top: int, by: str = "auto"):
    """The `top` best of `codes` [N, grid^2] (see ranked) -> (codes [top, grid^2], scores [top])."""
    order, scores = ranked(ctx, text, codes, by)
    return codes[order[:top]], scores[:top]
