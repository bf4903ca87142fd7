"""post-selection: rank images by how well they explain a text, with a caption model (trained with
--tasks image2text). Input lines `text<TAB>image1<TAB>image2...`. Every image gets the caption
likelihood of the text given the image (generation/scoring.py) and, with clip_model NAME and
clip_checkpoint FILE, the cosine similarity of an open_clip model's image and text embeddings
(local weights only; NAME is a built-in architecture or a model config .json). Images are ranked
by the CLIP score when given, else by the caption score; one line per image goes to
{out}/post_selection.tsv (`[id] text image caption_score [clip_score] rank`) and with `top` K the
K best are copied to {out}/{id or text}/{rank}-{name}.
"""
from __future__ import annotations

import os
import shutil

import torch

from megatron_t2i.data.images import load_rgb
from megatron_t2i.generation import io
from megatron_t2i.generation.scoring import score_captions
from megatron_t2i.safe_load import load_torch_file


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
        state = load_torch_file(checkpoint)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            self.model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:  # keys, shapes: one line
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


def main_post_selection(ctx, config) -> None:
    clip = ClipScorer(config.clip_model, config.clip_checkpoint, ctx.device) \
        if config.clip_model and ctx.is_writer else None

    def parse(line):  # on the writer: "text<TAB>image1<TAB>image2..."
        text, *paths = line.split("\t")
        paths = [p.strip() for p in paths if p.strip()]
        if not text.strip() or not paths:
            raise ValueError("expected text<TAB>image1<TAB>image2... (--task post-selection)")
        return text, paths, [ctx.encode_image_file(p) for p in paths]

    results = None
    if ctx.is_writer:
        header = (["id"] if config.with_id else []) + ["text", "image", "caption_score"] \
            + (["clip_score"] if clip else []) + ["rank"]
        results = io.open_results(os.path.join(config.output_path, "post_selection.tsv"), header)
    for query in io.queries(config.input_source, config.with_id, ctx.is_writer, parse):
        text, paths, codes = query.item
        scores = score_captions(ctx, text, torch.tensor(codes), config.max_inference_batch_size)
        if not ctx.is_writer:
            continue
        clip_scores = clip(text, paths) if clip else None
        ranking = clip_scores if clip else scores
        ranks = torch.empty(len(paths), dtype=torch.long)
        ranks[ranking.argsort(descending=True, stable=True)] = torch.arange(1, len(paths) + 1)
        for i, path in enumerate(paths):
            io.append_row(results, ([query.id] if config.with_id else [])
                          + [text, path, f"{scores[i]:.4f}"]
                          + ([f"{clip_scores[i]:.4f}"] if clip else []) + [int(ranks[i])])
        folder = io.query_folder(config.output_path, query.id, text)
        for i in ranks.argsort()[:config.top].tolist():
            target = os.path.join(folder, f"{int(ranks[i])}-{os.path.basename(paths[i])}")
            io.save_new(target, lambda tmp, src=paths[i]: shutil.copyfile(src, tmp))
        best = int(ranks.argmin())
        print(f"[{query.index}] {text[:60]!r}: best of {len(paths)} is {paths[best]} (caption "
              f"score {scores[best]:.2f}" + (f", CLIP {clip_scores[best]:.3f}" if clip else "")
              + ")" + (f"; top {min(config.top, len(paths))} copied to {folder}" if config.top
                       else ""), flush=True)
    if ctx.is_writer:
        print(f"scores -> {results}", flush=True)
