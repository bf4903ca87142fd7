"""text2image and completion ("text and part of an image").

text2image: prompt `[ROI1] text [size] [BOI1]`, then grid^2 image codes sampled in raster order
(inside the image only codes may be drawn). `--batch-size` samples per query, run in rounds of at
most `--max-inference-batch-size`. Sample k of query q uses its own seed, hash(--seed, q, k), so
an image depends neither on the round it falls in nor on the batch size. With `--cfg-scale s`,
classifier-free guidance against the unconditional prompt `[ROI1] [size] [BOI1]` (what training
with --text-dropout sees when it drops the caption).

completion: input lines `text<TAB>image_path`; the image is encoded with the VQ-VAE, its first
`--keep-rows` rows of codes are kept unchanged and the rest is generated.

`--rerank-top K` keeps the K samples whose image best explains the text, scored by
`score_captions(ctx, text, codes) -> float [N]` of megatron_t2i/generation/image2text.py.
`image_log_likelihood` is the other direction, log p(image | text) (evaluation's swap test).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import time

import torch

from megatron_t2i.data.images import load_rgb
from megatron_t2i.generation import io
from megatron_t2i.generation.decoding import generate, image_vocab_mask, score_sequences
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.tokenizers.layout import Sequence


def image_log_likelihood(model, layout, codes: torch.Tensor, texts: list[list[int]],
                         batch_size: int = 8) -> torch.Tensor:
    """log p(image_i | text_i) for codes [N, grid^2] and N captions of text ids -> float32 [N]
    (CPU): the training template, only the image codes as targets, each normalised over the
    codes (as sampling draws them). Runs in rounds of batch_size images."""
    seqs = [layout.text_to_image(t, c) for t, c in zip(texts, codes)]
    return score_sequences(model, seqs, lambda tokens, _: tokens < layout.num_image_codes,
                           image_vocab_mask(layout, model.config.vocab_size), layout.vocab_size,
                           batch_size)


def sample_seed(seed: int, query_index: int, sample_index: int) -> int:
    """A 63-bit seed of one sample, a hash of (seed, query, sample): independent streams per
    sample, the same on every run, rank and batch composition."""
    digest = hashlib.blake2b(f"{seed}/{query_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampling_config(args) -> SamplingConfig:
    return SamplingConfig(args.temperature, args.top_k, args.top_p)


def sample_codes(ctx, args, prompt: Sequence, uncond: Sequence | None, num_tokens: int,
                 seeds: list[int], desc: str = "", on_round=None) -> torch.Tensor:
    """Image codes after `prompt`, one row per seed -> LongTensor [len(seeds), num_tokens] (CPU).
    Rounds of at most --max-inference-batch-size rows; `uncond` is CFG's prompt (None: no CFG).
    on_round(codes [rows, num_tokens], first row): called as each round is done."""
    allowed = image_vocab_mask(ctx.layout, ctx.config.vocab_size).to(ctx.device)
    rows, step = [], args.max_inference_batch_size
    rounds = (len(seeds) + step - 1) // step
    for start in range(0, len(seeds), step):
        chunk = seeds[start:start + step]
        generators = [torch.Generator(device=ctx.device).manual_seed(s) for s in chunk]

        def batch(seq):  # [L] -> [rows, L] on the device
            return (seq.tokens.to(ctx.device).expand(len(chunk), -1),
                    seq.position_ids.to(ctx.device).expand(len(chunk), -1))

        tokens, positions = batch(prompt)
        uncond_tokens, uncond_positions = batch(uncond) if uncond is not None else (None, None)
        label = f"{desc} round {start // step + 1}/{rounds}" if rounds > 1 else desc
        rows.append(generate(
            ctx.model, tokens, positions, num_tokens, sampling_config(args), allowed, generators,
            use_cache=not args.no_kv_cache, uncond_prompt=uncond_tokens,
            uncond_position_ids=uncond_positions, cfg_scale=args.cfg_scale,
            progress=(label or True) if ctx.is_writer else False,
            vocab_size=ctx.layout.vocab_size).cpu())
        if on_round is not None:
            on_round(rows[-1], start)
    return torch.cat(rows)


def text2image(ctx, args, text: str, query_index: int, on_round=None) -> torch.Tensor:
    """-> codes [--batch-size, grid^2] of `text` (query number query_index); on_round as in
    sample_codes."""
    layout = ctx.layout
    prompt = layout.text_to_image(ctx.text_tokenizer.encode(text))
    uncond = layout.text_to_image([]) if args.cfg_scale else None
    seeds = [sample_seed(args.seed, query_index, k) for k in range(args.batch_size)]
    return sample_codes(ctx, args, prompt, uncond, layout.image_tokens, seeds, f"[{query_index}]",
                        on_round)


def complete(ctx, args, text: str, codes, query_index: int, keep_rows: int) -> torch.Tensor:
    """-> codes [--batch-size, grid^2]: the first keep_rows rows of `codes` [grid^2] unchanged,
    the rest generated after `text` and them."""
    layout = ctx.layout
    kept = layout.image_codes(codes, layout.image_tokens)[:keep_rows * layout.image_grid]
    prompt = layout.completion(ctx.text_tokenizer.encode(text), kept)
    uncond = layout.completion([], kept) if args.cfg_scale else None
    seeds = [sample_seed(args.seed, query_index, k) for k in range(args.batch_size)]
    rest = sample_codes(ctx, args, prompt, uncond, layout.image_tokens - kept.numel(), seeds,
                        f"[{query_index}]")
    return torch.cat([kept.expand(len(seeds), -1), rest], dim=1)


def rerank(ctx, text: str, codes: torch.Tensor, top: int):
    """The `top` best of `codes` [N, grid^2] by caption score -> (codes [top, grid^2],
    scores [top]), best first. On every rank (scoring runs the model)."""
    if importlib.util.find_spec("megatron_t2i.generation.image2text") is None:
        raise ValueError("--rerank-top needs post-selection (megatron_t2i/generation/"
                         "image2text.py), which this installation lacks")
    from megatron_t2i.generation.image2text import score_captions

    scores = torch.as_tensor(score_captions(ctx, text, codes)).float().cpu()
    order = scores.argsort(descending=True)[:top]
    return codes[order], scores[order]


def check_args(args) -> None:
    if args.rerank_top > args.batch_size:
        raise ValueError(f"--rerank-top {args.rerank_top} exceeds --batch-size {args.batch_size} "
                         f"(the samples it chooses from)")


def save_round(ctx, args, query, text: str):
    """An on_round callback writing each round's images as it is done (nothing is lost to an
    interrupt), when they need not wait for the others: no --rerank-top, no --debug grid."""
    if args.rerank_top or args.debug or not ctx.is_writer:
        return None

    def save(codes, first):
        io.save_samples(ctx.image_tokenizer.decode_codes(codes), args.output_path, query.id, text,
                        start=first)
    return save


def finish_query(ctx, args, query, text: str, codes: torch.Tensor, started: float,
                 generated: int, scores=None, first_images=(), saved: bool = False) -> None:
    """On the writer: decode and save (see io.save_samples, names from `text`) unless the rounds
    were saved already, and print one summary line."""
    if not ctx.is_writer:
        return
    folder = io.query_folder(args.output_path, query.id, text)
    if not saved:
        images = list(first_images) + ctx.image_tokenizer.decode_codes(codes)
        paths = io.save_samples(images, args.output_path, query.id, text, args.debug)
        folder = paths[0] if len(paths) == 1 else os.path.dirname(paths[0])
    elapsed = time.perf_counter() - started
    ranked = f" | caption scores {', '.join(f'{s:.2f}' for s in scores.tolist())}" \
        if scores is not None else ""
    ids = len(ctx.text_tokenizer.encode(text))
    cut = (f" | caption cut to {ctx.layout.max_text_tokens} of its {ids} ids (the checkpoint's "
           f"max_text_tokens)" if ids > ctx.layout.max_text_tokens else "")
    print(f"[{query.index}] {text[:60]!r}: {codes.shape[0]} image(s) in {elapsed:.1f} s, "
          f"{generated / max(elapsed, 1e-9):.0f} image tokens/s{ranked}{cut} -> {folder}",
          flush=True)


def main_text2image(args, ctx) -> None:
    check_args(args)
    for query in io.queries(args, ctx.is_writer):
        started = time.perf_counter()
        on_round = save_round(ctx, args, query, query.item)
        codes = text2image(ctx, args, query.item, query.index, on_round)
        scores = None
        if args.rerank_top:
            codes, scores = rerank(ctx, query.item, codes, args.rerank_top)
        finish_query(ctx, args, query, query.item, codes, started,
                     args.batch_size * ctx.layout.image_tokens, scores, saved=on_round is not None)


def main_completion(args, ctx) -> None:
    check_args(args)
    grid = ctx.layout.image_grid
    keep_rows = grid // 2 if args.keep_rows is None else args.keep_rows
    if not 0 < keep_rows < grid:
        raise ValueError(f"--keep-rows {keep_rows}: must be between 1 and {grid - 1} (the image "
                         f"has {grid} rows of codes)")

    def parse(line):  # on the writer: "text<TAB>image_path" -> (text, all codes of the image)
        text, tab, path = line.partition("\t")
        if not tab or not path.strip():
            raise ValueError("expected text<TAB>image_path (--task completion)")
        try:
            image = load_rgb(path.strip())
        except ValueError as e:
            raise ValueError(f"{path.strip()}: {e}") from None
        return text, ctx.image_tokenizer.encode_images([image])[0].tolist()

    for query in io.queries(args, ctx.is_writer, parse):
        started = time.perf_counter()
        text, codes = query.item
        completed = complete(ctx, args, text, codes, query.index, keep_rows)
        scores = None
        if args.rerank_top:
            completed, scores = rerank(ctx, text, completed, args.rerank_top)
        # the debug grid starts with the original image (as the tokenizer reconstructs it)
        original = ctx.image_tokenizer.decode_codes(torch.tensor([codes])) \
            if ctx.is_writer and args.debug else []
        finish_query(ctx, args, query, text, completed, started,
                     args.batch_size * (ctx.layout.image_tokens - keep_rows * grid), scores, original)
