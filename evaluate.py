"""How good are a checkpoint and its image tokenizer? Figures that need no pretrained network.

    python evaluate.py --load checkpoints/demo --data-path data/tokens.lmdb --rerank-top 1
    python evaluate.py --images data/synthetic --output-path runs/eval_truth   # check the reader

With --load: held-out captions of the embedded default data set (the held-out records of
--data-path, found by their file names in --synthetic-dir/attributes.jsonl, else fresh examples of
a seed no data set uses) are drawn --samples-per-prompt times each with text2image; an attribute
reader (a small CNN trained once on synthetic images, cached under --reader-cache) reads every
sample, and the report gives

  - caption alignment: the share of named colours, kinds, sizes, positions, counts and
    backgrounds found, per attribute and overall; beside it the same for the captions' own
    pictures (clean and through the tokenizer: how far the reader can be trusted) and for samples
    paired with other prompts' captions (chance level);
  - binding: the swap test of megatron_t2i/evaluation/binding.py on the held-out two-shape
    pictures (does the model prefer the true caption to the one with the two shapes' colours or
    kinds swapped, in both directions, split by the order the caption names the shapes);
  - with --rerank-top K, the same for the best K samples of each prompt by caption score
    (text2image's --rerank-top; the grid then shows each prompt's samples best first);
  - diversity of the samples of one prompt;
  - FID and KID of the samples against the held-out pictures, and of the held-out pictures
    through the image tokenizer (the floor), in the feature space of the reader and of the
    checkpoint's CLIP if it has one (megatron_t2i/evaluation/fid.py);
  - the image tokenizer's PSNR, SSIM, code usage and perplexity on held-out images;
  - with --data-path, the held-out token loss split into image and text targets (the split
    pretrain.py uses: pass the same --seed and --holdout-fraction).

With --images DIR (attributes.jsonl as the synthetic data set writes it): the images are read and
scored against their captions; on the ground-truth data set this checks the reader itself.

Writes {--output-path}/report.json, report.md and grid.png.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from megatron_t2i.arguments import generation_config, load_config, parse_args
from megatron_t2i.data.synthetic import make_example, read_meta, render
from megatron_t2i.evaluation.binding import swap_test
from megatron_t2i.evaluation.metrics import (alignment, alignment_by_caption, diversity,
                                             heldout_losses, tokenizer_figures, without_per_image)
from megatron_t2i.evaluation.reader import (ReaderConfig, load_or_train, reader_path, reconstruct,
                                            resize, to_tensor)
from megatron_t2i.evaluation.report import write_report
from megatron_t2i.progress import progress_bar

PROG = "evaluate.py"
PROMPT_SEED = 271828      # fresh prompts: a seed no data set is made with by default
HELD_OUT_IMAGES = 256     # held-out pictures for the tokenizer figures and the reader checks
MIN_FID_IMAGES = 20       # fewer on either side: no FID/KID (a covariance of so few is noise)
GRID_ROWS = 16


# ---- inputs --------------------------------------------------------------------------------------
def read_attributes(folder: str) -> list[dict]:
    """{folder}/attributes.jsonl -> [{"file", "caption", "attributes"}], checked line by line."""
    path = os.path.join(folder, "attributes.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a folder written by python -m "
                                f"megatron_t2i.cli.synthetic has one)")
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not (isinstance(entry["file"], str) and isinstance(entry["caption"], str)
                        and isinstance(entry["attributes"]["shapes"], list)
                        and isinstance(entry["attributes"]["background"], str)):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: expected a JSON object with file, caption and "
                                 f"attributes {{background, shapes}}") from None
            entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: no entries")
    return entries


def held_out_prompts(args, dataset, held: np.ndarray | None, count: int):
    """-> (up to `count` [{"caption", "attributes"}], where they come from): the held-out records
    of --data-path matched by file name to --synthetic-dir/attributes.jsonl when all of them are
    there, else fresh examples of a seed that the synthetic data set was not made with."""
    reason = "no --data-path"
    if dataset is not None:
        path = os.path.join(args.synthetic_dir, "attributes.jsonl")
        by_file = {e["file"]: e for e in read_attributes(args.synthetic_dir)} \
            if os.path.isfile(path) else {}
        keys = [getattr(dataset[int(i)], "key", None) for i in held[:count]]
        if not keys:
            reason = "the --data-path split holds nothing out (--holdout-fraction 0?)"
        elif by_file and all(k in by_file for k in keys):
            return ([{"caption": by_file[k]["caption"], "attributes": by_file[k]["attributes"]}
                     for k in keys], f"held-out records of {', '.join(args.data_path)} "
                                     f"(--seed {args.seed}, --holdout-fraction {args.holdout_fraction})")
        else:
            reason = f"the held-out records of --data-path are not listed in {path}"
    meta = read_meta(args.synthetic_dir) or {}
    seed = PROMPT_SEED + (meta.get("seed") == PROMPT_SEED)
    examples = (make_example(i, seed, caption_order=meta.get("caption_order", "reading"))
                for i in range(count))
    return ([{"caption": e.caption, "attributes": e.attributes} for e in examples],
            f"fresh synthetic examples of seed {seed} ({reason})")


def renders(prompts: list[dict], size: int) -> torch.Tensor:
    """The ground-truth pictures of prompts -> [N, 3, size, size] in [0, 1]."""
    return to_tensor([render(p["attributes"], size) for p in prompts])


def reader_for(args, image_size: int, tokenizer, reader):
    """(reader, where it is cached): the given one, else the cached or newly trained one."""
    cache = args.reader_cache or os.path.join(os.path.dirname(os.path.abspath(args.synthetic_dir)),
                                              "attribute_reader")
    if reader is not None:
        return reader, None
    config = ReaderConfig(image_size=image_size)
    return load_or_train(cache, config, tokenizer), reader_path(cache, config, tokenizer)


def other_captions(found: list[dict], wanted: list[dict], shift: int) -> dict | None:
    """Chance level: the readings scored against the captions `shift` places further on (those
    of other prompts); None when there are no other prompts."""
    if len(wanted) <= shift:
        return None
    return without_per_image(alignment(found, wanted[shift:] + wanted[:shift]))


# ---- the two modes -------------------------------------------------------------------------------
def evaluate_checkpoint(args, reader=None) -> dict:
    from megatron_t2i.data.loader import open_dataset, split_indices
    from megatron_t2i.generation.guidance import resolve_guidance
    from megatron_t2i.generation.loading import build_context
    from megatron_t2i.evaluation.clip_metrics import clip_figures
    from megatron_t2i.evaluation.fid import ClipFeatures, ReaderFeatures, fid_kid
    from megatron_t2i.generation.scoring import (caption_log_likelihood, image_log_likelihood,
                                                 reads_captions, rerank, rerank_kind)
    from megatron_t2i.generation.tasks.text2image import text2image

    k = args.samples_per_prompt
    if args.rerank_top > k:
        raise ValueError(f"--rerank-top {args.rerank_top} exceeds --samples-per-prompt {k}")
    config = generation_config(args, samples=k)  # text2image draws `samples` per query
    ctx = build_context(load_config(args))
    config = resolve_guidance(ctx, config)
    conditioned = bool(ctx.config.condition_slots)  # language-free: no caption direction
    denoiser = bool(ctx.config.latent_channels)     # diffusion: no likelihoods either
    ranked_by = rerank_kind(ctx, config.rerank_by)
    tokenizer = ctx.image_tokenizer
    size = tokenizer.image_size
    dataset, held = None, None
    if args.data_path:
        dataset, data_layout = open_dataset(args.data_path)
        ctx.layout.check_compatible(data_layout, f"--data-path {' '.join(args.data_path)}")
        held = split_indices(len(dataset), args.holdout_fraction, args.seed)[1]
    examples, source = held_out_prompts(args, dataset, held, max(args.num_prompts, HELD_OUT_IMAGES))
    prompts = examples[:args.num_prompts]
    truth = renders(examples, size)                                   # [N, 3, S, S]
    truth_wanted = [e["attributes"] for e in examples]
    reader, reader_file = reader_for(args, size, tokenizer, reader)

    samples, seconds = [], {"drawing": 0.0, "reranking": 0.0}
    for q, prompt in enumerate(progress_bar(prompts, desc="sampling held-out captions",
                                            unit="caption")):
        start = time.perf_counter()
        codes = text2image(ctx, config, prompt["caption"], q)        # [K, grid^2]
        drawn = time.perf_counter()
        if args.rerank_top:  # best first by their score, as text2image --rerank-top
            codes = rerank(ctx, prompt["caption"], codes, k, config.rerank_by)[0]
        seconds["drawing"] += drawn - start
        seconds["reranking"] += time.perf_counter() - drawn
        samples.append(tokenizer.decode_to_tensor(codes))            # [K, 3, S, S]
    wanted = [p["attributes"] for p in prompts for _ in range(k)]
    found = reader.read(torch.cat(samples))
    generated = alignment(found, wanted)
    best = [i for i in range(len(found)) if i % k < args.rerank_top]
    shown = best or list(range(len(found)))  # the samples the headline figures are about

    recon = reconstruct(tokenizer, (truth * 255).round().byte(), size).float() / 255
    batch = args.micro_batch_size
    binding = None if conditioned or denoiser else swap_test(  # likelihoods of captions
        examples, tokenizer.encode_images(tokenizer.normalize(truth)),
        lambda text: ctx.text_tokenizer.encode(text, ctx.layout.max_text_tokens),
        lambda codes, texts: image_log_likelihood(ctx.model, ctx.layout, codes, texts, batch),
        (lambda codes, texts: caption_log_likelihood(ctx.model, ctx.layout, codes, texts, batch))
        if reads_captions(ctx) else None)
    captions = [p["caption"] for p in prompts for _ in range(k)]
    clip = None
    if ctx.clip is not None:
        clip = clip_figures(ctx.clip, torch.cat(samples), captions,
                            [e["caption"] for e in examples], truth,
                            [e["caption"] for e in examples], best or None)
        clip["path"] = ctx.clip.path
    fid = None
    if min(len(truth), len(prompts) * k) >= MIN_FID_IMAGES:
        networks = {"reader": ReaderFeatures(reader)}
        if ctx.clip is not None:
            networks["clip"] = ClipFeatures(ctx.clip)
        fid = {name: {"samples": fid_kid(net, truth, torch.cat(samples)),
                      "tokenizer_floor": fid_kid(net, truth, recon)}
               for name, net in networks.items()}
    report = {
        "source": {"checkpoint": os.path.abspath(args.load), "prompts": source,
                   "prompt_count": len(prompts), "samples_per_prompt": k, "image_size": size,
                   "sampling": (f"{args.sampler}, {args.diffusion_steps} steps" if denoiser else
                                f"temperature {args.temperature}, top-k {args.top_k}, top-p "
                                f"{args.top_p}") + f", cfg-scale {config.cfg_scale:g}, seed {args.seed}",
                   "reranked": f"best {args.rerank_top} of {k} by {ranked_by} score"
                               if args.rerank_top else None,
                   "condition": "CLIP text embedding of the caption (language-free model)"
                                if conditioned else "caption tokens",
                   "decoding": "diffusion" if denoiser else ctx.layout.image_order,
                   "reader": reader_file},
        "speed": {"images": len(prompts) * k, "threads": torch.get_num_threads(),
                  "device": str(ctx.device), "drawing_s": seconds["drawing"],
                  "reranking_s": seconds["reranking"],
                  "images_per_s": len(prompts) * k / seconds["drawing"],
                  "images_per_s_with_reranking": len(prompts) * k / sum(seconds.values())},
        "alignment": without_per_image(generated),
        "alignment_reranked": without_per_image(alignment([found[i] for i in best],
                                                          [wanted[i] for i in best]))
        if best else None,
        "alignment_by_caption": alignment_by_caption([found[i] for i in shown],
                                                     [wanted[i] for i in shown]),
        "alignment_other_captions": other_captions(found, wanted, k),
        "binding": binding,
        "clip": clip,
        "fid": fid,
        "reader_check_clean": without_per_image(alignment(reader.read(truth), truth_wanted)),
        "reader_check_reconstructed": without_per_image(alignment(reader.read(recon), truth_wanted)),
        "diversity": diversity(samples),
        "tokenizer": tokenizer_figures(tokenizer, truth),
        "heldout_loss": heldout_losses(
            ctx.model, ctx.layout, dataset, held, args.micro_batch_size, ctx.device,
            task=("clip-diffusion" if conditioned else "diffusion") if denoiser
            else "clip2image" if conditioned else "text2image",
            latent_table=latent_table(ctx) if denoiser else None)
        if dataset is not None and len(held) else None,
    }
    ok = generated["per_image"]
    report["rows"] = [{"caption": p["caption"], "attributes": p["attributes"],
                       "ok": ok[q * k:(q + 1) * k], "found": found[q * k:(q + 1) * k]}
                      for q, p in enumerate(prompts)]
    grid = [{**row, "target": truth[q], "samples": list(samples[q])}
            for q, row in enumerate(report["rows"][:GRID_ROWS])]
    return write_report(args.output_path, report, grid)


def latent_table(ctx):
    """A denoiser's latent of every code [K, d], as training read them (data/latents.py)."""
    from megatron_t2i.data.latents import latent_table
    return latent_table(ctx.image_tokenizer, ctx.config)


def evaluate_images(args, reader=None) -> dict:
    from megatron_t2i.data.images import load_rgb

    entries = read_attributes(args.images)
    images = []
    for e in entries:
        try:
            images.append(load_rgb(os.path.join(args.images, e["file"])))
        except ValueError as err:
            raise ValueError(f"{os.path.join(args.images, e['file'])}: {err}") from None
    size = images[0].size[0]
    x = torch.cat([resize(to_tensor([im]), size) for im in images])   # [N, 3, S, S]
    tokenizer = None
    if args.image_tokenizer:  # a reader that also knows this tokenizer's reconstructions
        from megatron_t2i.tokenizers.vqvae import ImageTokenizer
        tokenizer = ImageTokenizer.load(args.image_tokenizer).check_kind(args.image_tokenizer_kind)
    reader, reader_file = reader_for(args, size, tokenizer, reader)
    wanted = [e["attributes"] for e in entries]
    found = reader.read(x)
    scored = alignment(found, wanted)
    report = {
        "source": {"images": os.path.abspath(args.images), "image_count": len(entries),
                   "image_size": size, "reader": reader_file},
        "alignment": without_per_image(scored),
        "alignment_other_captions": other_captions(found, wanted, 1),
        "rows": [{"caption": e["caption"], "attributes": e["attributes"], "ok": [ok],
                  "found": [f], "file": e["file"]}
                 for e, ok, f in zip(entries, scored["per_image"], found)],
    }
    grid = [{**row, "target": render(row["attributes"], size), "samples": [x[i]]}
            for i, row in enumerate(report["rows"][:min(GRID_ROWS, args.num_prompts)])]
    return write_report(args.output_path, report, grid, grid_label="image")


def main(argv=None, reader=None) -> int:
    """`reader`: an AttributeReader to use instead of the cached one (tests)."""
    args = parse_args(argv, groups=("data", "tokenizers", "training", "generation", "evaluation"),
                      description=__doc__.split("\n")[0], prog=PROG)
    try:
        if bool(args.load) == bool(args.images):
            raise ValueError("give either --load CKPT (generate and evaluate) or --images DIR "
                             "(score existing images)")
        paths = (evaluate_checkpoint if args.load else evaluate_images)(args, reader)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # report files are written whole, after the work
        print(f"{PROG}: interrupted before the report was finished (its files are each "
              f"written whole); the same command starts again", file=sys.stderr, flush=True)
        return 130
    with open(paths["json"], encoding="utf-8") as f:
        report = json.load(f)
    a, chance = report["alignment"], report["alignment_other_captions"]
    print(f"alignment over {a['images']} images: overall {a['overall']:.3f}, colour "
          f"{a['colour']:.3f}, kind {a['kind']:.3f}, exact {a['exact']:.3f}"
          + (f" (other captions: {chance['overall']:.3f})" if chance else "")
          + f" -> {paths['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
