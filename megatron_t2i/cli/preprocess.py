"""Tokenize images with captions into an LMDB token data set (megatron_t2i/data/preprocess.py).

    python -m megatron_t2i.cli.preprocess --help
    torchrun --nproc-per-node N -m megatron_t2i.cli.preprocess ...   (every process takes a share)
"""
from __future__ import annotations

import logging
import sys

from megatron_t2i.arguments import parse_args
from megatron_t2i.data.preprocess import ImagePolicy, load_image_tokenizer, preprocess
from megatron_t2i.device import resolve_device
from megatron_t2i.tokenizers.clip import Clip
from megatron_t2i.tokenizers.text import TextTokenizer


def main(argv=None) -> None:
    args = parse_args(argv, groups=("data", "tokenizers", "distributed"),
                      prog="python -m megatron_t2i.cli.preprocess",
                      description="Tokenize images with captions into an LMDB token data set.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for flag in ("input", "output", "text_tokenizer", "image_tokenizer"):
        if not getattr(args, flag):
            sys.exit(f"preprocess: error: --{flag.replace('_', '-')} is required")
    device = resolve_device()  # under torchrun: this rank's GPU (LOCAL_RANK), else the CPU
    try:
        text = TextTokenizer(args.text_tokenizer)
        clip = Clip.load(args.clip, text, device) if args.clip else None
        preprocess(args.input, args.output, text,
                   load_image_tokenizer(args.image_tokenizer, device).check_kind(
                       args.image_tokenizer_kind), args.max_text_tokens,
                   args.image_size, args.workers, args.encode_batch_size,
                   sr_low_res=args.sr_low_res, image_positions=args.image_positions, clip=clip,
                   image_order=args.image_order,
                   policy=ImagePolicy(args.image_fit, args.max_image_pixels, args.min_image_side))
    except (ValueError, OSError) as e:
        sys.exit(f"preprocess: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"preprocess: interrupted; run the same command again to resume "
                 f"({args.output}.partial)")


if __name__ == "__main__":
    main()
