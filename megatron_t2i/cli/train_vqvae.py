"""Train the VQ-VAE image tokenizer (megatron_t2i/tokenizers/train_vqvae.py).

    python -m megatron_t2i.cli.train_vqvae --help
"""
from __future__ import annotations

import sys

import torch

from megatron_t2i.arguments import parse_args
from megatron_t2i.data.synthetic import write_dataset
from megatron_t2i.device import resolve_device
from megatron_t2i.tokenizers.train_vqvae import train_vqvae
from megatron_t2i.tokenizers.vqvae import VQVAEConfig


def main(argv=None) -> int:
    prog = "python -m megatron_t2i.cli.train_vqvae"
    args = parse_args(argv, groups=("data", "tokenizers"), outputs=("image_tokenizer",),
                      prog=prog, description="Train the VQ-VAE image tokenizer.")
    try:
        if not args.input:  # the embedded default: the synthetic data set, written if missing
            args.input = write_dataset(args.synthetic_dir, args.synthetic_count, args.seed,
                                       args.image_size, args.chinese_fraction,
                                       args.caption_order)
        if not args.image_tokenizer:
            raise ValueError("--image-tokenizer: give the output checkpoint path (.pt)")
        config = VQVAEConfig(hidden_channels=args.vqvae_channels, embed_dim=args.vqvae_embed_dim,
                             codebook_size=args.vqvae_codebook_size, downsample=args.vqvae_downsample,
                             num_res_blocks=args.vqvae_res_blocks, image_size=args.image_size,
                             encoder=args.vqvae_encoder)
        device = resolve_device()
        if device.type == "cpu" and args.vqvae_batch_size <= 8:
            # convs on a few small images gain little from a second thread (~15% alone), but the
            # threads' barriers collapse when other processes share the cores (measured 5x slower)
            torch.set_num_threads(1)
        m = train_vqvae(args.input, args.image_tokenizer, config, steps=args.vqvae_steps,
                        batch_size=args.vqvae_batch_size, lr=args.vqvae_lr, seed=args.seed,
                        tensorboard_dir=args.tensorboard_dir, device=device)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {m['path']} (sha256 {m['sha256'][:16]}...)")
    print(f"held-out: PSNR {m['psnr']:.2f} dB, code usage {m['usage']:.1%}, "
          f"perplexity {m['perplexity']:.1f}; train PSNR {m['train_psnr']:.2f} dB; "
          f"{m['steps']} steps in {m['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
