"""Choose the guidance scale a checkpoint samples with by default, on held-out captions, and
record it beside the checkpoint (megatron_t2i/generation/guidance.py).

    python -m megatron_t2i.cli.choose_guidance --load checkpoints/demo --data-path data/tokens.lmdb \
        [--checkpoint best] [--num-prompts 8] [--samples-per-prompt 4] [--guidance-scales 0,1,2,3,5]

The held-out captions are the held-out split of --data-path under the training's --seed and
--holdout-fraction (the records the trainer never trained on).
"""
from __future__ import annotations

import logging
import sys

import torch

from megatron_t2i.arguments import generation_config, load_config, parse_args

PROG = "python -m megatron_t2i.cli.choose_guidance"


def held_out_captions(data_path: list[str], text_tokenizer, layout, fraction: float, seed: int,
                      count: int) -> list[str]:
    from megatron_t2i.data.loader import open_dataset, split_indices

    dataset, data_layout = open_dataset(data_path)
    layout.check_compatible(data_layout, f"--data-path {' '.join(data_path)}")
    held = split_indices(len(dataset), fraction, seed)[1]
    captions = []
    for i in held:  # distinct captions: a data set of class names repeats them
        text = text_tokenizer.decode(dataset[int(i)].text_ids.tolist())
        if text not in captions:
            captions.append(text)
        if len(captions) == count:
            break
    return captions


def main(argv=None) -> int:
    args = parse_args(argv, groups=("data", "training", "tokenizers", "distributed",
                                    "generation", "evaluation"), prog=PROG, description=__doc__.split("\n")[0])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_t2i.generation.guidance import choose_guidance, record_guidance
    from megatron_t2i.generation.loading import build_context
    try:
        if not args.data_path:
            raise ValueError("--data-path is required: the token data set the checkpoint was "
                             "trained on (its held-out split gives the captions)")
        with torch.no_grad():
            ctx = build_context(load_config(args))
            captions = held_out_captions(args.data_path, ctx.text_tokenizer, ctx.layout,
                                         args.holdout_fraction, args.seed, args.num_prompts)
            config = generation_config(args, samples=args.samples_per_prompt)
            result = choose_guidance(ctx, config, captions, args.guidance_scales, args.rerank)
        path = record_guidance(ctx.folder, result)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    table = ", ".join(f"{s}: {v:.3f}" for s, v in result["scores"].items())
    print(f"guidance scale {result['cfg_scale']:g} for {ctx.folder} (on {len(captions)} held-out "
          f"captions x {config.samples} samples; {result['score']}: {table}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
