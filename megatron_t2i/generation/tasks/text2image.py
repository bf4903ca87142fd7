"""text2image and completion ("text and part of an image"), raster or L-shape decoded, or
denoised by a diffusion model.

text2image: prompt `[ROI1] text [size] [BOI1]`, then grid^2 image codes sampled in the order of
the checkpoint's layout (inside the image only codes may be drawn): raster, one code per step, or
L-shape (Lformer), one L-shaped block of codes per step (strategies/lshape.py); a denoiser's
latents in --diffusion-steps of its sampler, snapped to codes (strategies/diffusion.py).
`samples` per query in rounds of at most `max_inference_batch_size` (generation/batching.py:
per-sample seeds). With `cfg_scale` s,
classifier-free guidance against the unconditional prompt `[ROI1] [size] [BOI1]` (what training
with --text-dropout sees when it drops the caption).

completion: input lines `text<TAB>image_path`; the image is encoded with the VQ-VAE, its first
`keep_rows` rows of codes are kept unchanged and the rest is generated; of an L-shape model, its
first `keep_rows` blocks (the top-left square of that side: Lformer's regeneration from a block).
A denoiser keeps any part: the rows, or all but `mask_box` (inpainting), or only the box
(`mask_outside`: outpainting), denoising the rest around the kept patches.

`rerank_top` K keeps the K samples whose image best explains the text (generation/scoring.py).
Without reranking or a --debug grid, each round's images are written as soon as it is drawn.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from megatron_t2i.data.latents import box_known_mask
from megatron_t2i.generation import io
from megatron_t2i.generation.batching import in_rounds, query_seeds
from megatron_t2i.generation.scoring import rerank, rerank_kind
from megatron_t2i.generation.state import Prompt
from megatron_t2i.generation.strategies.diffusion import sample_latent_codes
from megatron_t2i.generation.strategies.lshape import generate_lshape
from megatron_t2i.generation.strategies.raster import generate
from megatron_t2i.generation.vocab import image_vocab_mask
from megatron_t2i.tokenizers.layout import Sequence


def decoding_order(layout, requested: str = "auto") -> str:
    """The order a checkpoint of `layout` decodes in; --decoding may name it, not another."""
    if requested in ("auto", layout.image_order):
        return layout.image_order
    raise ValueError(f"--decoding {requested}: this checkpoint was trained to generate in "
                     f"{layout.image_order} order (its token layout's image_order); for {requested} "
                     f"decoding train on data preprocessed with --image-order {requested}")


def generation_method(model_config, requested: str = "auto") -> str:
    """What a checkpoint samples by (autoregressive or diffusion); --method may name it, not
    the other."""
    method = "diffusion" if model_config.latent_channels else "autoregressive"
    if requested in ("auto", method):
        return method
    kind = "a denoiser" if method == "diffusion" else "an autoregressive model"
    raise ValueError(f"--method {requested}: this checkpoint is {kind}; use --method {method} "
                     f"or auto")


def with_latent(model, prompt: Prompt, uncond: Prompt | None, generators):
    """The prompts with a CVAE model's latent z drawn from its prior p(z | caption), each row's
    noise from its own generator (before its codes: per-sample seeds hold); the unconditional
    branch of guidance reads the same z (Lformer)."""
    d = model.config.latent_dim
    noise = torch.stack([torch.randn(d, generator=g, device=prompt.tokens.device)
                         for g in generators])
    z = model.prior_latent(prompt.tokens, noise)
    return (dataclasses.replace(prompt, latent=z),
            dataclasses.replace(uncond, latent=z) if uncond is not None else None)


def sample_codes(ctx, config, prompt: Sequence, uncond: Sequence | None, num_tokens: int,
                 seeds: list[int], desc: str = "", on_round=None,
                 token_progress: bool | None = None, given=None, known=None) -> torch.Tensor:
    """Image codes after `prompt`, one row per seed -> LongTensor [len(seeds), num_tokens] (CPU).
    `uncond` is CFG's prompt (None: no CFG); on_round as in batching.in_rounds; token_progress:
    a bar over the tokens (L-shape: blocks) of each round (None: on the writer, in a terminal).
    L-shape: the whole image [len(seeds), grid^2] in raster order; given: raster codes [k^2] of
    its top-left k x k square (the first k blocks), kept. known: a denoiser's (codes [grid^2],
    mask [grid^2]) kept where mask (strategies/diffusion.py)."""
    diffusion = generation_method(ctx.config, config.method) == "diffusion"
    allowed = image_vocab_mask(ctx.layout, ctx.config.vocab_size).to(ctx.device)
    decoding = config.decoding(ctx.layout.vocab_size)
    lshape = decoding_order(ctx.layout, config.decoding_order) == "lshape"
    if token_progress is None:
        token_progress = io.token_progress(ctx.is_writer)

    def draw(generators, label):
        rows = len(generators)
        first = Prompt.of(prompt, rows, ctx.device)
        second = Prompt.of(uncond, rows, ctx.device) if uncond is not None else None
        if ctx.config.latent_dim:  # z from the CVAE's prior, one per sample; guidance: the same
            first, second = with_latent(ctx.model, first, second, generators)
        progress = (label or True) if token_progress else False
        if diffusion:
            return sample_latent_codes(ctx, config, prompt, uncond, generators, progress, known)
        if lshape:
            square = given.to(ctx.device).expand(rows, -1) if given is not None else None
            return generate_lshape(ctx.model, first, ctx.layout.image_grid, ctx.layout["[PAD]"],
                                   decoding, allowed, generators, second, square, progress)
        return generate(ctx.model, first, num_tokens, decoding, allowed, generators, second,
                        progress=progress)

    return in_rounds(seeds, config.max_inference_batch_size, ctx.device, draw, on_round, desc)


def prompts(ctx, text: str, guided: bool) -> tuple[Sequence, Sequence | None]:
    """The prompt of `text` and, for guidance, the unconditional one. A caption model reads the
    caption's ids; a CLIP-conditioned one (language-free) the CLIP's text embedding of it in its
    slots, and the null embedding unconditionally."""
    layout, denoiser = ctx.layout, bool(ctx.config.latent_channels)
    if not ctx.config.condition_slots:
        # a denoiser's caption comes before its latent placeholders
        template = layout.text_to_latents if denoiser else layout.text_to_image
        return (template(ctx.text_tokenizer.encode(text)), template([]) if guided else None)
    slots = ctx.config.condition_slots
    prompt = layout.condition_to_latents(slots) if denoiser else layout.condition_to_image(slots)
    prompt.condition = ctx.clip.encode_texts([text])[0]
    return prompt, dataclasses.replace(prompt, condition_present=False) if guided else None


def text2image(ctx, config, text: str, query_index: int, on_round=None,
               token_progress: bool | None = None) -> torch.Tensor:
    """-> codes [samples, grid^2] of `text` (query number query_index)."""
    layout = ctx.layout
    prompt, uncond = prompts(ctx, text, bool(config.cfg_scale))
    return sample_codes(ctx, config, prompt, uncond, layout.image_tokens,
                        query_seeds(config.seed, query_index, config.samples), f"[{query_index}]",
                        on_round, token_progress)


def complete(ctx, config, text: str, codes, query_index: int, keep_rows: int,
             on_round=None) -> torch.Tensor:
    """-> codes [samples, grid^2]: the first keep_rows rows of `codes` [grid^2] unchanged, the
    rest generated after `text` and them; of an L-shape model, the first keep_rows blocks; of a
    denoiser, the patches known_patches keeps (a box's inside or outside, or the rows)."""
    layout = ctx.layout
    if ctx.config.latent_channels:
        codes = layout.image_codes(codes, layout.image_tokens)
        prompt, uncond = prompts(ctx, text, bool(config.cfg_scale))
        return sample_codes(ctx, config, prompt, uncond, layout.image_tokens,
                            query_seeds(config.seed, query_index, config.samples),
                            f"[{query_index}]", on_round,
                            known=(codes, known_patches(layout.image_grid, config, keep_rows)))
    if decoding_order(layout, config.decoding_order) == "lshape":
        grid = layout.image_grid
        square = layout.image_codes(codes, layout.image_tokens).view(grid, grid)
        square = square[:keep_rows, :keep_rows].reshape(-1)
        prompt, uncond = prompts(ctx, text, bool(config.cfg_scale))
        return sample_codes(ctx, config, prompt, uncond, layout.image_tokens,
                            query_seeds(config.seed, query_index, config.samples),
                            f"[{query_index}]", on_round, given=square)
    kept = layout.image_codes(codes, layout.image_tokens)[:keep_rows * layout.image_grid]
    prompt = layout.completion(ctx.text_tokenizer.encode(text), kept)
    uncond = layout.completion([], kept) if config.cfg_scale else None

    def whole(rows):  # [n, rest] -> [n, grid^2]
        return torch.cat([kept.expand(rows.shape[0], -1), rows], dim=1)

    rest = sample_codes(ctx, config, prompt, uncond, layout.image_tokens - kept.numel(),
                        query_seeds(config.seed, query_index, config.samples), f"[{query_index}]",
                        on_round and (lambda rows, first: on_round(whole(rows), first)))
    return whole(rest)


def known_patches(grid: int, config, keep_rows: int) -> torch.Tensor:
    """A denoiser's kept patches [grid^2] bool: outside --mask-box (inside with --mask-outside),
    or the first keep_rows rows."""
    if config.mask_box is not None:
        return torch.from_numpy(box_known_mask(grid, config.mask_box, config.mask_outside))
    return torch.arange(grid * grid) < keep_rows * grid


def round_writer(ctx, config, query, text: str):
    """An on_round callback writing each round's images as it is done (nothing is lost to an
    interrupt), when they need not wait for the others: no reranking, no --debug grid."""
    if config.rerank_top or config.debug or not ctx.is_writer:
        return None

    def save(codes, first):
        io.save_samples(ctx.image_tokenizer.decode_codes(codes), config.output_path, query.id,
                        text, start=first)
    return save


def finish_query(ctx, config, query, text: str, codes: torch.Tensor, started: float,
                 generated: int, scores=None, first_images=(), saved: bool = False) -> None:
    """On the writer: decode and save (see io.save_samples, names from `text`) unless the rounds
    were saved already, and print one summary line."""
    if not ctx.is_writer:
        return
    folder = io.query_folder(config.output_path, query.id, text)
    if not saved:
        images = list(first_images) + ctx.image_tokenizer.decode_codes(codes)
        paths = io.save_samples(images, config.output_path, query.id, text, config.debug)
        folder = paths[0] if len(paths) == 1 else os.path.dirname(paths[0])
    elapsed = time.perf_counter() - started
    ranked = (f" | {rerank_kind(ctx, config.rerank_by)} scores "
              f"{', '.join(f'{s:.2f}' for s in scores.tolist())}") if scores is not None else ""
    ids = len(ctx.text_tokenizer.encode(text))
    cut = (f" | caption cut to {ctx.layout.max_text_tokens} of its {ids} ids (the checkpoint's "
           f"max_text_tokens)" if ids > ctx.layout.max_text_tokens else "")
    print(f"[{query.index}] {text[:60]!r}: {codes.shape[0]} image(s) in {elapsed:.1f} s, "
          f"{generated / max(elapsed, 1e-9):.0f} image tokens/s{ranked}{cut} -> {folder}",
          flush=True)


def main_text2image(ctx, config) -> None:
    for query in io.queries(config.input_source, config.with_id, ctx.is_writer):
        started = time.perf_counter()
        on_round = round_writer(ctx, config, query, query.item)
        codes = text2image(ctx, config, query.item, query.index, on_round)
        scores = None
        if config.rerank_top:
            codes, scores = rerank(ctx, query.item, codes, config.rerank_top, config.rerank_by)
        finish_query(ctx, config, query, query.item, codes, started,
                     config.samples * ctx.layout.image_tokens, scores, saved=on_round is not None)


def main_completion(ctx, config) -> None:
    denoiser = bool(ctx.config.latent_channels)
    if ctx.config.condition_slots and not denoiser:
        raise ValueError("--task completion needs a model trained on captions; this checkpoint "
                         "is CLIP-conditioned (language-free)")
    if (config.mask_box is not None or config.mask_outside) and not denoiser:
        raise ValueError("--mask-box / --mask-outside: in/outpainting is a denoiser's; an "
                         "autoregressive model completes the top rows (--keep-rows)")
    if config.mask_outside and config.mask_box is None:
        raise ValueError("--mask-outside: give the box to keep with --mask-box X0,Y0,X1,Y1")
    grid = ctx.layout.image_grid
    if config.mask_box is not None:
        kept = int(known_patches(grid, config, 0).sum())
        if kept in (0, grid * grid):
            raise ValueError(f"--mask-box {','.join(map(str, config.mask_box))}: nothing would be "
                             f"{'kept' if kept == 0 else 'repainted'} (a cell of the {grid} x "
                             f"{grid} grid is repainted when its centre lies in the box)")
    keep_rows = grid // 2 if config.keep_rows is None else config.keep_rows
    if not 0 < keep_rows < grid:
        raise ValueError(f"--keep-rows {keep_rows}: must be between 1 and {grid - 1} (the image "
                         f"has {grid} rows of codes)")

    def parse(line):  # on the writer: "text<TAB>image_path" -> (text, all codes of the image)
        text, tab, path = line.partition("\t")
        if not tab or not path.strip():
            raise ValueError("expected text<TAB>image_path (--task completion)")
        return text, ctx.encode_image_file(path.strip())

    for query in io.queries(config.input_source, config.with_id, ctx.is_writer, parse):
        started = time.perf_counter()
        text, codes = query.item
        on_round = round_writer(ctx, config, query, text)
        completed = complete(ctx, config, text, codes, query.index, keep_rows, on_round)
        scores = None
        if config.rerank_top:
            completed, scores = rerank(ctx, text, completed, config.rerank_top, config.rerank_by)
        # the debug grid starts with the original image (as the tokenizer reconstructs it)
        original = ctx.image_tokenizer.decode_codes(torch.tensor([codes])) \
            if ctx.is_writer and config.debug else []
        finish_query(ctx, config, query, text, completed, started,
                     config.samples * (ctx.layout.image_tokens - keep_rows * (
                         keep_rows if ctx.layout.image_order == "lshape" else grid)), scores,
                     original, saved=on_round is not None)

