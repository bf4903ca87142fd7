"""Train the image tokenizer, a VQ-VAE or a VQGAN (megatron_t2i/tokenizers/train_vqvae.py).

    python -m megatron_t2i.cli.train_vqvae --help
    torchrun --nproc-per-node 8 -m megatron_t2i.cli.train_vqvae ...   # data-parallel
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_t2i.arguments import parse_args
from megatron_t2i.data.synthetic import write_dataset
from megatron_t2i.device import resolve_device
from megatron_t2i.tokenizers.train_vqvae import train_vqvae
from megatron_t2i.tokenizers.vqgan import GANConfig
from megatron_t2i.tokenizers.vqvae import VQVAEConfig


def main(argv=None) -> int:
    prog = "python -m megatron_t2i.cli.train_vqvae"
    args = parse_args(argv, groups=("data", "tokenizers", "distributed"), outputs=("image_tokenizer",),
                      prog=prog, description="Train the image tokenizer (VQ-VAE or VQGAN).")
    rank = int(os.environ.get("RANK", "0"))
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(args.distributed_backend or
                                    ("nccl" if torch.cuda.is_available() else "gloo"),
                                    timeout=timedelta(minutes=30))
        if args.image_tokenizer_kind is None:
            args.image_tokenizer_kind = "vqvae"
        if not args.input:  # the embedded default: the synthetic data set, written if missing
            args.input = write_dataset(args.synthetic_dir, args.synthetic_count, args.seed,
                                       args.image_size, args.chinese_fraction,
                                       args.caption_order)
        if not args.image_tokenizer:
            raise ValueError("--image-tokenizer: give the output checkpoint path (.pt)")
        config = VQVAEConfig(hidden_channels=args.vqvae_channels, embed_dim=args.vqvae_embed_dim,
                             codebook_size=args.vqvae_codebook_size, downsample=args.vqvae_downsample,
                             num_res_blocks=args.vqvae_res_blocks, image_size=args.image_size,
                             encoder=args.vqvae_encoder, upsample=args.vqvae_upsample,
                             l2_codes=args.vqvae_l2_codes)
        gan = None
        gan_flags = [f"--{name.replace('_', '-')}" for name in ("vqgan_disc_start", "vqgan_disc_lr")
                     if getattr(args, name) is not None]
        d = GANConfig()
        gan_flags += [f"--vqgan-{name.replace('_', '-')}" for name in (
            "disc_weight", "disc_channels", "disc_layers", "perceptual_weight")
            if getattr(args, f"vqgan_{name}") != getattr(d, name)]
        if gan_flags and args.image_tokenizer_kind != "vqgan":
            raise ValueError(f"{', '.join(gan_flags)}: settings of a VQGAN; add "
                             f"--image-tokenizer-kind vqgan, or leave them out for a VQ-VAE")
        if args.image_tokenizer_kind == "vqgan":
            start = args.vqgan_disc_start
            gan = GANConfig(disc_start=args.vqvae_steps // 3 if start is None else start,
                            disc_weight=args.vqgan_disc_weight, disc_channels=args.vqgan_disc_channels,
                            disc_layers=args.vqgan_disc_layers, disc_lr=args.vqgan_disc_lr,
                            perceptual_weight=args.vqgan_perceptual_weight)
        device = resolve_device()
        if device.type == "cpu" and args.vqvae_batch_size <= 8:
            # convs on a few small images gain little from a second thread (~15% alone), but the
            # threads' barriers collapse when other processes share the cores (measured 5x slower)
            torch.set_num_threads(1)
        m = train_vqvae(args.input, args.image_tokenizer, config, steps=args.vqvae_steps,
                        batch_size=args.vqvae_batch_size, lr=args.vqvae_lr, seed=args.seed,
                        tensorboard_dir=args.tensorboard_dir, device=device, gan=gan,
                        save_every=args.vqvae_save_every)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = f"{args.image_tokenizer}.resume.pt"
        where = (f"it goes on from {saved}" if os.path.isfile(saved)
                 else f"nothing was saved yet (every --vqvae-save-every {args.vqvae_save_every} steps)")
        print(f"{prog}: interrupted; run the same command again: {where}", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0
    print(f"wrote {m['path']} (sha256 {m['sha256'][:16]}...)")
    print(f"{m['kind']} held-out: PSNR {m['psnr']:.2f} dB, code usage {m['usage']:.1%}, "
          f"perplexity {m['perplexity']:.1f}; train PSNR {m['train_psnr']:.2f} dB; "
          f"{m['steps']} steps in {m['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
