"""Train the CLIP (megatron_t2i/tokenizers/clip.py) on images with captions.

    python -m megatron_t2i.cli.train_clip --input data/synthetic --text-tokenizer data/text.model \
        --clip data/clip.pt
    torchrun --nproc_per_node 2 -m megatron_t2i.cli.train_clip ...   # data-parallel (gloo/NCCL)

--input is anything preprocess reads (a folder with .txt captions, a TSV, a JSONL) or a token data
set (LMDB), whose images are the input it was made from. Unreadable images and empty captions are
skipped and counted. Re-running the same command resumes an interrupted training; a finished one
is kept.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_t2i.arguments import parse_args
from megatron_t2i.data.images import BadInput, load_rgb
from megatron_t2i.data.lmdb_store import TokenDataset
from megatron_t2i.data.sources import all_examples, read_caption
from megatron_t2i.device import resolve_device
from megatron_t2i.progress import progress_bar
from megatron_t2i.tokenizers.clip import config_for
from megatron_t2i.tokenizers.pixels import crop_square
from megatron_t2i.tokenizers.text import TextTokenizer
from megatron_t2i.tokenizers.train_clip import train_clip

PROG = "python -m megatron_t2i.cli.train_clip"


def load_pairs(input_path: str, text: TextTokenizer, image_size: int, max_text_tokens: int,
               progress: bool = True):
    """-> (uint8 [N, 3, S, S], [[text ids]], skipped count) of every usable input."""
    if os.path.isfile(os.path.join(input_path, "data.mdb")):  # a token data set
        source = TokenDataset(input_path).meta.get("report", {}).get("input")
        if not source or not os.path.exists(source):
            raise ValueError(f"--input {input_path}: a token data set whose source images "
                             f"({source}) are not here; give the images themselves")
        input_path = source
    pixels, captions, skipped = [], [], 0
    for s in progress_bar(all_examples(input_path), desc="loading images", unit="img",
                          disable=not progress):
        try:
            ids = text.encode(read_caption(s), max_text_tokens)
            if not ids:
                raise BadInput("empty caption", "no tokens")
            pixels.append(crop_square(load_rgb(s.image if s.data is None else s.data), image_size))
            captions.append(ids)
        except BadInput:
            skipped += 1
    if len(pixels) < 10:
        raise ValueError(f"--input {input_path}: {len(pixels)} usable images with captions; "
                         f"CLIP needs many more")
    return torch.stack(pixels), captions, skipped


def main(argv=None) -> int:
    args = parse_args(argv, groups=("data", "tokenizers", "training", "distributed"),
                      prog=PROG, outputs=("clip",),
                      description="Train the CLIP on images with captions.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out, rank = args.clip, int(os.environ.get("RANK", "0"))
    try:
        if not out or not args.text_tokenizer:
            raise ValueError("--clip OUT.pt and --text-tokenizer FILE.model are required")
        if os.path.isfile(out) and not os.path.isfile(f"{out}.state"):
            print(f"{out} exists (a trained CLIP); remove it to train again")
            return 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(args.distributed_backend or
                                    ("nccl" if torch.cuda.is_available() else "gloo"),
                                    timeout=timedelta(minutes=30))
        device = resolve_device()
        text = TextTokenizer(args.text_tokenizer)
        pixels, captions, skipped = load_pairs(args.input or args.synthetic_dir, text,
                                               args.image_size, args.max_text_tokens, rank == 0)
        config = config_for(text, args.image_size, args.max_text_tokens,
                            embed_dim=args.clip_width, vision_width=args.clip_width,
                            text_width=args.clip_width, vision_layers=args.clip_layers,
                            text_layers=args.clip_layers, patch_size=args.clip_patch_size)
        figures = train_clip(pixels, captions, out, config, text, steps=args.clip_steps,
                             batch_size=args.clip_batch_size, lr=args.clip_lr, seed=args.seed,
                             tensorboard_dir=args.tensorboard_dir, device=device,
                             progress=rank == 0)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {out}: {figures['train_pairs']} training pairs ({skipped} inputs skipped), "
              f"{figures['steps']} steps in {figures['seconds']:.0f} s; held-out "
              f"{figures['pairs']} pairs: text->image R@1 {figures['text_to_image_r1_all']:.3f}"
              + (f" (among 100: {figures['text_to_image_r1_among_100']:.3f})"
                 if "text_to_image_r1_among_100" in figures else "")
              + f", image->text R@1 {figures['image_to_text_r1_all']:.3f}, cosine gap "
                f"{figures['cosine_gap']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
