"""image2text (captioning) with a caption model: a GPT trained with `--tasks image2text` (alone or
in a mixture) on sequences `[size] [BOI1] codes [EOI1] [ROI1] text [PAD]`, where the first [PAD]
ends the caption.

Input lines are image paths (`id<TAB>path` with --with-id). The image is encoded with the
checkpoint's VQ-VAE and the caption decoded after [ROI1]:
  beam_size N >= 1: beam search (strategies/beam.py; 1 is greedy);
  beam_size 0: `samples` captions sampled per image (temperature, top-k, top-p), each from its
      own seed as in text2image (strategies/raster.py).
A caption has at most max_text_tokens ids, as in training; a caption of that length ends there
(the training template has no room for its end token, so that end is forced and scores 0).
Captions are printed and appended, as they come, to {out}/captions.tsv (`path<TAB>caption` with
absolute paths: a TSV preprocess reads); a run never touches another run's file: it takes
captions-1.tsv, ...
"""
from __future__ import annotations

import os

import torch

from megatron_t2i.generation import io
from megatron_t2i.generation.batching import in_rounds, query_seeds
from megatron_t2i.generation.scoring import caption_log_likelihood
from megatron_t2i.generation.state import Prompt
from megatron_t2i.generation.strategies.beam import beam_search
from megatron_t2i.generation.strategies.raster import generate
from megatron_t2i.generation.vocab import caption_vocab_mask


def caption_text_ids(tokens: torch.Tensor, layout) -> list[int]:
    """Generated tokens [n] -> the caption's text ids (SentencePiece space), up to its end."""
    ids = []
    for token in tokens.tolist():
        if token == layout["[PAD]"]:
            break
        ids.append(token - layout.text_offset)
    return ids


def caption_image(ctx, config, codes, query_index: int) -> list[tuple[list[int], float]]:
    """Caption(s) of one image's codes [grid^2] -> [(text ids, log-likelihood)]: the best beam
    with beam_size >= 1, else `samples` samples. On every rank (it runs the model)."""
    layout, device = ctx.layout, ctx.device
    prompt = Prompt.of(layout.image_to_text(codes), 1, device)
    allowed = caption_vocab_mask(layout, ctx.config.vocab_size).to(device)
    end, limit = layout["[PAD]"], layout.max_text_tokens + 1
    decoding = config.decoding(layout.vocab_size)
    if config.beam_size:
        best, ll = beam_search(ctx.model, prompt, limit, config.beam_size, allowed, end,
                               decoding)[0]
        return [(caption_text_ids(best, layout), ll)]
    end_only = torch.zeros_like(allowed)
    end_only[end] = True

    def draw(generators, _):
        rows = Prompt(prompt.tokens.expand(len(generators), -1),
                      prompt.positions.expand(len(generators), -1))
        return generate(ctx.model, rows, limit, decoding,
                        lambda step: allowed if step < limit - 1 else end_only, generators)

    rows = in_rounds(query_seeds(config.seed, query_index, config.samples),
                     config.max_inference_batch_size, device, draw)
    captions = [caption_text_ids(row, layout) for row in rows]
    scores = caption_log_likelihood(ctx.model, layout, torch.as_tensor(codes)[None].expand(
        len(captions), -1), captions, config.max_inference_batch_size)
    return list(zip(captions, scores.tolist()))


def main_image2text(ctx, config) -> None:
    def parse(line):  # on the writer
        path = line.strip()
        return path, ctx.encode_image_file(path)

    results = io.open_results(os.path.join(config.output_path, "captions.tsv"),
                              ["path", "caption"]) if ctx.is_writer else None
    for query in io.queries(config.input_source, config.with_id, ctx.is_writer, parse):
        path, codes = query.item
        captions = caption_image(ctx, config, codes, query.index)
        if not ctx.is_writer:
            continue
        label = f"{query.id} " if query.id is not None else ""
        for ids, log_likelihood in captions:
            text = ctx.text_tokenizer.decode(ids)
            io.append_row(results, [os.path.abspath(path), text])
            print(f"[{query.index}] {label}{path}: {text!r} (log-likelihood {log_likelihood:.2f}, "
                  f"{len(ids) + 1} tokens)", flush=True)
    if ctx.is_writer:
        print(f"captions -> {results}", flush=True)
