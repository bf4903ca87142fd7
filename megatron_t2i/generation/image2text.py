"""image2text (captioning) and post-selection (ranking images by how well they explain a text).

Both use a caption model: a GPT trained with `--tasks image2text` (alone or in a mixture) on sequences
`[size] [BOI1] codes [EOI1] [ROI1] text [PAD]`, where the first [PAD] ends the caption.

image2text: input lines are image paths (`id<TAB>path` with --with-id). The image is encoded with
the checkpoint's VQ-VAE and the caption decoded after [ROI1]:
  --beam-size N >= 1: beam search (1 is greedy). The N live hypotheses are one batch; after each
      step the KV cache rows follow their hypotheses (KVCache.select), so no prefix is ever
      recomputed. Each step ranks every one-token extension by log-likelihood: those among the
      best N that end with [PAD] finish, the best N that do not stay live. Finished hypotheses
      are ranked by log-likelihood per token (end token included), so a caption does not win
      merely by being short. The search stops at the length limit, when a step's best N all end
      (so beam 1 is exactly greedy), or once N have finished that no live hypothesis can still
      overtake (its sum only falls, so its per-token score ends at most at sum / limit).
  --beam-size 0: --batch-size captions sampled per image (temperature, top-k, top-p), each from
      its own seed as in text2image.
A caption has at most max_text_tokens ids, as in training; a caption of that length ends there
(the training template has no room for its end token, so that end is forced and scores 0).
Captions are printed and appended, as they come, to {out}/captions.tsv (`path<TAB>caption` with
absolute paths: a TSV preprocess reads); a run never touches another run's file: it takes
captions-1.tsv, ...

Caption likelihood: the sum of log p(token | image, earlier tokens) over the caption's tokens and
its end token, each distribution renormalised over the caption vocabulary (text ids and [PAD]).
CogView masked the image codes' logits when scoring; we mask the other special tokens as well, so
the score is the likelihood under exactly the distribution captions are decoded from.

post-selection: input lines `text<TAB>image1<TAB>image2...`. Every image gets the likelihood of
the text given the image and, with --clip-model NAME --clip-checkpoint FILE, the cosine
similarity of an open_clip model's image and text embeddings (local weights only; NAME is a
built-in architecture or a model config .json). Images are ranked by the CLIP score when given,
else by the caption score; one line per image goes to {out}/post_selection.tsv
(`[id] text image caption_score [clip_score] rank`) and with --top K the K best are copied to
{out}/{id or text}/{rank}-{name}. text2image's --rerank-top calls `score_captions`.
"""
from __future__ import annotations

import os
import shutil

import torch

from megatron_t2i.data.images import load_rgb
from megatron_t2i.generation import io
from megatron_t2i.generation.decoding import _Stream, generate, score_sequences, text_vocab_mask
from megatron_t2i.generation.text2image import sample_seed, sampling_config


# ----------------------------------------------------------------------------------------------
# Caption likelihood (post-selection, re-ranking)

def caption_vocab_mask(layout, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: what a caption is made of, the text ids and its end token [PAD]."""
    return text_vocab_mask(layout, vocab_size, extra=(layout["[PAD]"],))


def caption_log_likelihood(model, layout, codes: torch.Tensor, texts: list[list[int]],
                           batch_size: int = 8) -> torch.Tensor:
    """log p(text_i | image_i) for codes [N, grid^2] and N captions of text ids -> float32 [N]
    (CPU). The sequences are the training template's; only the caption's tokens and its end
    token are targets. Runs in rounds of batch_size images."""
    caption_start = layout.image_tokens + 4  # after [size] [BOI1] codes [EOI1] [ROI1]

    def targets(tokens, loss_mask):
        mask = loss_mask > 0
        mask[:, :caption_start] = False  # the image is given, not scored
        return mask

    seqs = [layout.image_to_text(c, t) for c, t in zip(codes, texts)]
    return score_sequences(model, seqs, targets, caption_vocab_mask(layout, model.config.vocab_size),
                           layout.vocab_size, batch_size)


def score_captions(ctx, text: str, codes: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The log-likelihood of `text` given each image of codes [N, grid^2] -> float32 [N]. Called on
    every rank (it runs the model), e.g. by text2image's --rerank-top."""
    ids = ctx.text_tokenizer.encode(text, ctx.layout.max_text_tokens)  # warns once if cut
    return caption_log_likelihood(ctx.model, ctx.layout, torch.as_tensor(codes), [ids] * len(codes),
                                  batch_size)


# ----------------------------------------------------------------------------------------------
# Decoding captions

@torch.no_grad()
def beam_search(model, prompt: torch.Tensor, position_ids: torch.Tensor, num_tokens: int,
                beam_size: int, allowed: torch.Tensor, end_token: int, use_cache: bool = True,
                vocab_size: int | None = None) -> list[tuple[torch.Tensor, float]]:
    """Finished hypotheses after `prompt` [1, P] (positions [1, P]) -> [(tokens [n] ending with
    end_token, log-likelihood)], best first by log-likelihood / n.

    allowed: bool [V], the vocabulary each step is normalised over (it must contain end_token).
    num_tokens: the most tokens a hypothesis has, its end included; at the last step only the
    end may follow and adds 0 (the template's limit ends the caption). use_cache=False recomputes
    every hypothesis from scratch at each step: the reference the cached path is tested against.
    """
    if beam_size < 1 or num_tokens < 1:
        raise ValueError(f"beam_search: beam_size and num_tokens must be >= 1, got {beam_size}, "
                         f"{num_tokens}")
    stream = _Stream(model, prompt, position_ids, num_tokens, use_cache)
    p, last_position = prompt.shape[1], position_ids[0, -1]
    sums = torch.zeros(1, device=prompt.device)  # [k] log-likelihood of each live hypothesis
    finished = []
    for step in range(num_tokens):
        logits = stream.logits()[:, :vocab_size]                             # [k, V]
        logp = logits.masked_fill(~allowed[:logits.shape[-1]].to(logits.device),
                                  float("-inf")).log_softmax(dim=-1)
        if step == num_tokens - 1:  # the length limit ends every hypothesis
            logp = torch.full_like(logp, float("-inf"))
            logp[:, end_token] = 0.0
        vocab = logp.shape[-1]
        candidates = (sums[:, None] + logp).flatten()                       # [k * V]
        values, indices = candidates.topk(min(2 * beam_size, candidates.numel()))
        rows, tokens, kept, first_live = [], [], [], None
        for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist())):
            if value == float("-inf"):
                break
            row, token = divmod(index, vocab)
            if token != end_token:
                first_live = rank if first_live is None else first_live
                rows.append(row)
                tokens.append(token)
                kept.append(value)
                if len(rows) == beam_size:
                    break
            elif rank < beam_size:  # an end outside the step's best k is not a best continuation
                ended = torch.cat([stream.tokens[row, p:stream.length], prompt.new_tensor([token])])
                finished.append((ended, value))
        # stop when the step's best k all ended (beam 1: greedy's end), or nothing live can win
        if first_live is None or first_live >= beam_size \
                or _settled(finished, beam_size, max(kept) / num_tokens):
            break
        # the hypotheses kept, in their new order: tokens, positions and cache rows follow them
        order = torch.tensor(rows, device=prompt.device)
        stream.tokens, stream.positions = stream.tokens[order], stream.positions[order]
        if stream.cache is not None:
            stream.cache.select(order)
        sums = torch.tensor(kept, device=prompt.device)
        stream.append(torch.tensor(tokens, device=prompt.device), last_position + step + 1)
    return sorted(finished, key=lambda f: f[1] / f[0].numel(), reverse=True)


def _settled(finished, beam_size: int, bound: float) -> bool:
    """Whether beam_size hypotheses have finished and no live one can overtake the worst of
    the best beam_size: log-probabilities are <= 0, so a live hypothesis with sum s ends with a
    per-token score of at most s / (longest length), the `bound` of the best live one."""
    if len(finished) < beam_size:
        return False
    scores = sorted((ll / tokens.numel() for tokens, ll in finished), reverse=True)
    return scores[beam_size - 1] >= bound


def caption_text_ids(tokens: torch.Tensor, layout) -> list[int]:
    """Generated tokens [n] -> the caption's text ids (SentencePiece space), up to its end."""
    ids = []
    for token in tokens.tolist():
        if token == layout["[PAD]"]:
            break
        ids.append(token - layout.text_offset)
    return ids


def caption_image(ctx, args, codes, query_index: int) -> list[tuple[list[int], float]]:
    """Caption(s) of one image's codes [grid^2] -> [(text ids, log-likelihood)]: the best beam
    with --beam-size N >= 1, else --batch-size samples. On every rank (it runs the model)."""
    layout, device = ctx.layout, ctx.device
    prompt = layout.image_to_text(codes)
    tokens, positions = prompt.tokens[None].to(device), prompt.position_ids[None].to(device)
    allowed = caption_vocab_mask(layout, ctx.config.vocab_size).to(device)
    end, limit = layout["[PAD]"], layout.max_text_tokens + 1
    if args.beam_size:
        best, ll = beam_search(ctx.model, tokens, positions, limit, args.beam_size, allowed, end,
                               not args.no_kv_cache, layout.vocab_size)[0]
        return [(caption_text_ids(best, layout), ll)]
    end_only = torch.zeros_like(allowed)
    end_only[end] = True
    seeds = [sample_seed(args.seed, query_index, k) for k in range(args.batch_size)]
    captions = []
    for start in range(0, len(seeds), args.max_inference_batch_size):
        chunk = seeds[start:start + args.max_inference_batch_size]
        generators = [torch.Generator(device=device).manual_seed(s) for s in chunk]
        rows = generate(ctx.model, tokens.expand(len(chunk), -1), positions.expand(len(chunk), -1),
                        limit, sampling_config(args),
                        lambda step: allowed if step < limit - 1 else end_only, generators,
                        use_cache=not args.no_kv_cache, vocab_size=layout.vocab_size)
        captions += [caption_text_ids(row, layout) for row in rows.cpu()]
    scores = caption_log_likelihood(ctx.model, layout, torch.as_tensor(codes)[None].expand(
        len(captions), -1), captions, args.max_inference_batch_size)
    return list(zip(captions, scores.tolist()))


# ----------------------------------------------------------------------------------------------
# Files

def encode_image_file(ctx, path: str) -> list[int]:
    """An image file -> its codes [grid^2] under the checkpoint's VQ-VAE (on the writer)."""
    try:
        image = load_rgb(path)
    except ValueError as e:  # unreadable or missing: load_rgb says which
        raise ValueError(f"{path}: {e}") from None
    return ctx.image_tokenizer.encode_images([image])[0].tolist()


def open_results(path: str, header: list[str]) -> str:
    """A new TSV file with `header` at `path`, or at a suffixed free name if taken (never another
    run's file); returns its path. Lines are then appended with append_row."""
    return io.save_new(path, lambda tmp: append_row(tmp, header))


def append_row(path: str, fields: list) -> None:
    """One TSV line, in one write (tabs and newlines inside a field become spaces)."""
    line = "\t".join(" ".join(str(f).split()) for f in fields) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


# ----------------------------------------------------------------------------------------------
# CLIP scores

class ClipScorer:
    """Cosine similarity between an open_clip model's embeddings of a text and of images."""

    def __init__(self, name: str, checkpoint: str, device):
        import open_clip

        if name.endswith(".json"):  # a model config of one's own: registered under its stem
            if not os.path.isfile(name):
                raise FileNotFoundError(f"--clip-model {name}: no such file")
            open_clip.add_model_config(name)
            name = os.path.splitext(os.path.basename(name))[0]
        if name not in open_clip.list_models():
            raise ValueError(f"--clip-model {name}: not an open_clip architecture (e.g. ViT-B-32, "
                             f"or a model config .json)")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, pretrained_text=False, device=device)
        try:
            open_clip.load_checkpoint(self.model, checkpoint, strict=True, weights_only=True)
        except Exception as e:  # unpickling, missing keys, wrong shapes: one line
            raise ValueError(f"--clip-checkpoint {checkpoint}: not weights of {name} "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
        self.model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device

    @torch.no_grad()
    def __call__(self, text: str, paths: list[str]) -> torch.Tensor:
        """-> float32 [len(paths)] cosine similarities (CPU)."""
        images = torch.stack([self.preprocess(load_rgb(p)) for p in paths]).to(self.device)
        image = self.model.encode_image(images).float()
        words = self.model.encode_text(self.tokenizer([text]).to(self.device)).float()
        image = image / image.norm(dim=-1, keepdim=True)
        words = words / words.norm(dim=-1, keepdim=True)
        return (image @ words.T)[:, 0].cpu()


# ----------------------------------------------------------------------------------------------
# Tasks

def main_image2text(args, ctx) -> None:
    def parse(line):  # on the writer
        path = line.strip()
        return path, encode_image_file(ctx, path)

    results = open_results(os.path.join(args.output_path, "captions.tsv"), ["path", "caption"]) \
        if ctx.is_writer else None
    for query in io.queries(args, ctx.is_writer, parse):
        path, codes = query.item
        captions = caption_image(ctx, args, codes, query.index)
        if not ctx.is_writer:
            continue
        label = f"{query.id} " if query.id is not None else ""
        for ids, log_likelihood in captions:
            text = ctx.text_tokenizer.decode(ids)
            append_row(results, [os.path.abspath(path), text])
            print(f"[{query.index}] {label}{path}: {text!r} (log-likelihood {log_likelihood:.2f}, "
                  f"{len(ids) + 1} tokens)", flush=True)
    if ctx.is_writer:
        print(f"captions -> {results}", flush=True)


def main_post_selection(args, ctx) -> None:
    clip = ClipScorer(args.clip_model, args.clip_checkpoint, ctx.device) \
        if args.clip_model and ctx.is_writer else None

    def parse(line):  # on the writer: "text<TAB>image1<TAB>image2..."
        text, *paths = line.split("\t")
        paths = [p.strip() for p in paths if p.strip()]
        if not text.strip() or not paths:
            raise ValueError("expected text<TAB>image1<TAB>image2... (--task post-selection)")
        return text, paths, [encode_image_file(ctx, p) for p in paths]

    results = None
    if ctx.is_writer:
        header = (["id"] if args.with_id else []) + ["text", "image", "caption_score"] \
            + (["clip_score"] if clip else []) + ["rank"]
        results = open_results(os.path.join(args.output_path, "post_selection.tsv"), header)
    for query in io.queries(args, ctx.is_writer, parse):
        text, paths, codes = query.item
        scores = score_captions(ctx, text, torch.tensor(codes), args.max_inference_batch_size)
        if not ctx.is_writer:
            continue
        clip_scores = clip(text, paths) if clip else None
        ranking = clip_scores if clip else scores
        ranks = torch.empty(len(paths), dtype=torch.long)
        ranks[ranking.argsort(descending=True, stable=True)] = torch.arange(1, len(paths) + 1)
        for i, path in enumerate(paths):
            append_row(results, ([query.id] if args.with_id else []) + [text, path, f"{scores[i]:.4f}"]
                       + ([f"{clip_scores[i]:.4f}"] if clip else []) + [int(ranks[i])])
        folder = io.query_folder(args.output_path, query.id, text)
        for i in ranks.argsort()[:args.top].tolist():
            target = os.path.join(folder, f"{int(ranks[i])}-{os.path.basename(paths[i])}")
            io.save_new(target, lambda tmp, src=paths[i]: shutil.copyfile(src, tmp))
        best = int(ranks.argmin())
        print(f"[{query.index}] {text[:60]!r}: best of {len(paths)} is {paths[best]} (caption "
              f"score {scores[best]:.2f}" + (f", CLIP {clip_scores[best]:.3f}" if clip else "")
              + ")" + (f"; top {min(args.top, len(paths))} copied to {folder}" if args.top else ""),
              flush=True)
    if ctx.is_writer:
        print(f"scores -> {results}", flush=True)
