"""Write the embedded default data set (megatron_t2i/data/synthetic.py).

    python -m megatron_t2i.cli.synthetic --help
"""
from __future__ import annotations

import sys

from megatron_t2i.arguments import parse_args
from megatron_t2i.data.synthetic import write_dataset


def main(argv=None) -> None:
    prog = "python -m megatron_t2i.cli.synthetic"
    args = parse_args(argv, groups=("data",), prog=prog,
                      description="Write the embedded default data set (captioned shapes).")
    try:
        path = write_dataset(args.synthetic_dir, args.synthetic_count, args.seed, args.image_size,
                             args.chinese_fraction, args.caption_order)
    except (ValueError, OSError) as e:
        sys.exit(f"{prog}: error: {e}")
    print(f"synthetic data set: {args.synthetic_count} images of {args.image_size}px in {path}")


if __name__ == "__main__":
    main()
