"""What does TLD's mask channel add to inpainting? A trained caption denoiser is fine-tuned for the
same iterations twice through pretrain.py, plainly and with --inpaint-masks; both (and the
denoiser as it was) then repaint the centre of held-out pictures from their captions
(`--task completion --mask-box`'s code path, the kept patches held at their latents), and the
repainted patches are compared with the picture's own latents.

    python bench/inpainting.py --load runs/masked_diffusion/paired-captions   # README figures

Reported per model: the mean squared error of the repainted patches' latents against the
picture's (scaled latent space, the training loss's units; lower is better), and the root mean
squared error of the decoded pixels there (0-1 scale) against the picture's own codes decoded,
over the held-out records x samples. The kept
patches are the picture's by construction (tested), so they are not scored. Outputs
(--output-dir): inpainting.json and inpainting.md; the fine-tunes resume if interrupted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.common import print_json  # noqa: E402
from megatron_t2i.io_utils import write_json_atomic, write_text_atomic  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a trained caption denoiser (--tasks diffusion)")
    p.add_argument("--data-path", default=os.path.join(ROOT, "data", "tokens-clip.lmdb"),
                   help="the LMDB it was trained on (its held-out records are repainted)")
    p.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "inpainting"))
    p.add_argument("--model-size", default="demo", help="the trained denoiser's")
    p.add_argument("--iters", type=int, default=300, help="fine-tune iterations of each")
    p.add_argument("--inpaint-masks", type=float, default=0.75)
    p.add_argument("--lr", type=float, default=3e-4,
                   help="of the fine-tunes (a fresh optimiser at the first run's 1e-3 undoes "
                        "much of the training in its first steps)")
    p.add_argument("--box", default="0.33,0.33,0.67,0.67", help="the box repainted")
    p.add_argument("--records", type=int, default=64, help="held-out pictures repainted")
    p.add_argument("--samples", type=int, default=4, help="samples per picture")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--text-tokenizer", help="when the checkpoint holds none")
    p.add_argument("--image-tokenizer", help="when the checkpoint holds none")
    return p.parse_args(argv)


def finetune(args, name: str, extra: list[str]) -> str:
    """pretrain.py from --load for --iters more iterations (resumes a run cut short)."""
    save = os.path.join(args.output_dir, name)
    env = {**os.environ, "DATA_PATH": args.data_path, "TASKS": "diffusion:1", "SAVE": save,
           "TRAIN_ITERS": str(args.iters), "MICRO_BATCH_SIZE": "16", "LR": str(args.lr),
           "CHOOSE_GUIDANCE": "0", "MODEL_SIZE": args.model_size}
    from megatron_t2i.training.convert import read_info
    base = read_info(args.load)[1]  # the same model: its decoder and convolution too
    resume = os.path.isfile(os.path.join(save, "latest"))
    flags = ([] if resume else ["--load", args.load, "--finetune"]) + \
        (["--decoder-layers", str(base.decoder_layers)] if base.decoder_layers else []) + \
        (["--mlp-conv"] if base.mlp_conv else [])
    subprocess.run([os.path.join(ROOT, "scripts", "pretrain_single_node.sh"), *flags,
                    "--ema-decay", "0.999", "--eval-interval", "100000", *extra],
                   env=env, check=True)
    return save


def score(args, checkpoint: str) -> dict:
    """Repaint args.box of held-out records -> the latent error and code agreement there."""
    import numpy as np
    import torch

    from generate_samples import parse
    from megatron_t2i.arguments import generation_config, load_config
    from megatron_t2i.data.latents import box_known_mask
    from megatron_t2i.data.lmdb_store import TokenDataset
    from megatron_t2i.data.loader import split_indices
    from megatron_t2i.generation.loading import build_context
    from megatron_t2i.generation.strategies.diffusion import codes_to_latents
    from megatron_t2i.generation.tasks.text2image import complete
    from megatron_t2i.progress import progress_bar

    argv = ["--load", checkpoint, "--task", "completion", "--batch-size", str(args.samples),
            "--cfg-scale", str(args.cfg_scale), "--mask-box", args.box]
    for flag in ("text_tokenizer", "image_tokenizer"):
        if getattr(args, flag):
            argv += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    parsed = parse(argv)
    config = generation_config(parsed)
    with torch.no_grad():
        ctx = build_context(load_config(parsed))
        dataset = TokenDataset(args.data_path)
        held = split_indices(len(dataset), 0.02, 1234)[1][:args.records]
        if not len(held):
            raise SystemExit(f"bench/inpainting.py: {args.data_path} has no held-out records")
        grid = ctx.layout.image_grid
        repaint = ~torch.from_numpy(box_known_mask(grid, tuple(map(float, args.box.split(",")))))
        errors, pixels = [], []
        for i, index in enumerate(progress_bar(held, desc=f"repainting ({checkpoint})",
                                               unit="picture")):
            record = dataset[int(index)]
            text = ctx.text_tokenizer.decode(record.text_ids.tolist())
            codes = torch.as_tensor(record.image_codes, dtype=torch.long).view(-1)
            out = complete(ctx, config, text, codes.tolist(), i, 0)             # [samples, N]
            errors.append(float((codes_to_latents(ctx, out[:, repaint])
                                 - codes_to_latents(ctx, codes[repaint])).pow(2).mean()))
            decoded = [np.asarray(im, dtype=np.float64) / 255 for im in
                       ctx.image_tokenizer.decode_codes(torch.cat([codes[None], out]))]
            side = decoded[0].shape[0] // grid
            region = np.kron(repaint.view(grid, grid).numpy(), np.ones((side, side))) > 0
            pixels.append(float(np.mean([np.sqrt(((d - decoded[0])[region] ** 2).mean())
                                         for d in decoded[1:]])))
    return {"latent_mse": float(np.mean(errors)), "pixel_rmse": float(np.mean(pixels)),
            "records": len(held), "samples": args.samples,
            "repainted_patches": int(repaint.sum())}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    models = {"as trained (no fine-tune)": args.load,
              f"fine-tuned {args.iters} iterations, no channel": finetune(args, "plain", []),
              f"fine-tuned {args.iters} iterations with --inpaint-masks {args.inpaint_masks}":
                  finetune(args, "channel", ["--inpaint-masks", str(args.inpaint_masks)])}
    results = {name: score(args, path) for name, path in models.items()}
    report = {"base": args.load, "box": args.box, "cfg_scale": args.cfg_scale,
              "results": results}
    write_json_atomic(os.path.join(args.output_dir, "inpainting.json"), report)
    lines = ["| denoiser | repainted latents' MSE | repainted pixels' RMSE |", "| --- | --- | --- |"]
    lines += [f"| {name} | {r['latent_mse']:.4f} | {r['pixel_rmse']:.4f} |"
              for name, r in results.items()]
    write_text_atomic(os.path.join(args.output_dir, "inpainting.md"), "\n".join(lines) + "\n")
    print_json(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
