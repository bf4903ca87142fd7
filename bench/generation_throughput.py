"""Text-to-image sampling throughput with and without the KV cache, printed as JSON.

For each model size and batch size: image tokens/s and images/s of `generate` (the decoding loop
of text2image, VQ-VAE decoding excluded) on random weights, beside a matmul rate measured in the
same run, so the figures compare across machines (useful MFU = one forward per generated token /
matmul FLOP/s; the uncached path spends more FLOPs than that, recomputing its prefix).

A case runs all the image's tokens when that fits in --max-seconds (method "all steps"). Otherwise
it times the prompt pass plus the first --steps tokens, and scales each later step by the FLOP
model of megatron_t2i.training.flops (a cached step attends to more keys as the image grows; an
uncached step recomputes the whole, longer sequence): method "first K steps, extrapolated".

    python bench/generation_throughput.py --quick          # ~2 minutes on 2 CPU cores
    python bench/generation_throughput.py --dtype bf16     # a GPU
    python bench/generation_throughput.py --lshape         # L-shape against raster, ~3 minutes

--lshape: Lformer's block-parallel decoding (strategies/lshape.py, grid-side steps) against raster
KV-cached decoding on the same model, batch and grid, for each grid side of --grids (the demo
data's 9 and 32), both timed over the whole image in the same run; `lshape_speedup` is raster
seconds / L-shape seconds. --diffusion adds a denoiser of the same trunk (strategies/diffusion.py:
--diffusion-steps of DPM-Solver++, 32-channel latents) to the same comparison, timed in the same
run: `diffusion_speedup` is raster seconds / diffusion seconds. Guidance is off in every case.

    python bench/generation_throughput.py --lshape --diffusion    # the three families, ~4 min
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import DTYPES  # noqa: E402
from megatron_t2i.config import model_config  # noqa: E402
from megatron_t2i.device import resolve_device, synchronize  # noqa: E402
from megatron_t2i.generation.sampling import SamplingConfig  # noqa: E402
from megatron_t2i.generation.state import Decoding, Prompt  # noqa: E402
from megatron_t2i.generation.strategies.lshape import generate_lshape  # noqa: E402
from megatron_t2i.generation.strategies.raster import generate  # noqa: E402
from megatron_t2i.generation.vocab import image_vocab_mask  # noqa: E402
from megatron_t2i.model.gpt import GPT  # noqa: E402
from megatron_t2i.tokenizers.layout import TokenLayout  # noqa: E402
from megatron_t2i.training.flops import MatmulReference, model_flops_per_token  # noqa: E402

# the layouts these sizes are used with: the demo data (preprocess.sh defaults: 64 px images,
# 16x16 codes of 512, 1000 text ids) and CogView's vocabulary and 32x32 grid for the tutorial size
LAYOUTS = {"demo": TokenLayout(num_image_codes=512, num_text_tokens=1000, image_grid=16,
                               max_text_tokens=28, name="demo"),
           "cogview-tutorial": TokenLayout.cogview()}


def timed_generate(model, layout, batch, num_tokens, use_cache, device):
    """One `generate` call (a full-length caption prompt, `num_tokens` image codes) -> (seconds
    in all, seconds of the prompt pass, mean seconds of each later step). The steps are timed
    inside the call (a hook stamps the end of every model call), not as a difference of runs."""
    seq = layout.text_to_image(torch.arange(layout.max_text_tokens) % layout.num_text_tokens)
    prompt = seq.tokens.to(device).expand(batch, -1)
    positions = seq.position_ids.to(device).expand(batch, -1)
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    mask = image_vocab_mask(layout, model.config.vocab_size).to(device)
    stamps = []

    def stamp(*_):
        synchronize(device)
        stamps.append(time.perf_counter())

    hook = model.register_forward_hook(stamp)
    synchronize(device)
    start = time.perf_counter()
    try:
        generate(model, Prompt(prompt, positions), num_tokens,
                 Decoding(SamplingConfig(top_k=200), use_cache=use_cache,
                          vocab_size=layout.vocab_size), mask, generators)
        synchronize(device)
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return seconds, stamps[0] - start, per_step


def timed_lshape(model, layout, batch, device) -> float:
    """Seconds of one `generate_lshape` call over the whole grid (the prompt of timed_generate)."""
    seq = layout.text_to_image(torch.arange(layout.max_text_tokens) % layout.num_text_tokens)
    prompt = Prompt(seq.tokens.to(device).expand(batch, -1),
                    seq.position_ids.to(device).expand(batch, -1))
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    mask = image_vocab_mask(layout, model.config.vocab_size).to(device)
    synchronize(device)
    start = time.perf_counter()
    generate_lshape(model, prompt, layout.image_grid, layout["[PAD]"],
                    Decoding(SamplingConfig(top_k=200), vocab_size=layout.vocab_size), mask,
                    generators)
    synchronize(device)
    return time.perf_counter() - start


def timed_diffusion(model, layout, batch, steps: int, device) -> float:
    """Seconds of one denoising (a full-length caption, `steps` DPM-Solver++ steps, no guidance)
    of `batch` rows, snapping to codes excluded (it needs a tokenizer; a nearest-neighbour search
    over the codebook, small beside the steps)."""
    from megatron_t2i.generation.strategies.diffusion import denoise, make_sampler, sequence_inputs
    seq = layout.text_to_latents(torch.arange(layout.max_text_tokens) % layout.num_text_tokens)
    tokens, positions, mask = sequence_inputs(layout, seq)
    cond = (tokens.to(device).expand(batch, -1), positions.to(device).expand(batch, -1),
            mask.to(device))
    noise = torch.randn(batch, layout.image_tokens, model.config.latent_channels, device=device)
    synchronize(device)
    start = time.perf_counter()
    denoise(model, cond, None, make_sampler("dpm-solver++", steps), noise.to(
        model.word_embeddings.weight.dtype))
    synchronize(device)
    return time.perf_counter() - start


def compare_lshape(size, grid, batch, args, device, dtype) -> dict:
    """L-shape and raster (KV-cached, every step run) on one model of `size` at a grid side;
    with args.diffusion, a denoiser of the same trunk too."""
    layout = dataclasses.replace(LAYOUTS[size], image_grid=grid, image_order="lshape")
    config = model_config(size, layout, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config, device=device, params_dtype=dtype).eval()
    timed_lshape(model, layout, batch, device)  # warm-up
    lshape = timed_lshape(model, layout, batch, device)
    timed_generate(model, layout, batch, 2, True, device)
    raster = timed_generate(model, layout, batch, layout.image_tokens, True, device)[0]
    out = {"model_size": size, "grid": grid, "batch": batch, "raster_steps": layout.image_tokens,
           "lshape_steps": grid, "raster_images_per_s": round(batch / raster, 3),
           "lshape_images_per_s": round(batch / lshape, 3),
           "lshape_speedup": round(raster / lshape, 2)}
    if args.diffusion:
        plain = dataclasses.replace(layout, image_order="raster")
        denoiser = GPT(model_config(size, plain, hidden_dropout=0.0, attention_dropout=0.0,
                                    head="denoise", latent_channels=32,
                                    latent_token=plain["[ENC]"], noise_token=plain["[BOI1]"]),
                       device=device, params_dtype=dtype).eval()
        timed_diffusion(denoiser, plain, batch, 2, device)  # warm-up
        seconds = timed_diffusion(denoiser, plain, batch, args.diffusion_steps, device)
        out.update(diffusion_steps=args.diffusion_steps,
                   diffusion_images_per_s=round(batch / seconds, 3),
                   diffusion_speedup=round(raster / seconds, 2))
    return out


def step_cost(config, prompt_len: int, step: int, use_cache: bool) -> float:
    """Relative FLOPs of decoding step `step` (0 = the token after the prompt; its prefill aside)."""
    length = prompt_len + step
    per_token = model_flops_per_token(config, length, training=False)
    return per_token * (length if not use_cache else 1)


def measure(size, model, batch, use_cache, args, device, layout=None) -> dict:
    """One case; layout: the model's token layout (default: the size's of LAYOUTS)."""
    layout, config = layout or LAYOUTS[size], model.config
    n = layout.image_tokens
    prompt_len = layout.max_text_tokens + 3
    timed_generate(model, layout, batch, 2, use_cache, device)  # warm-up
    k = min(args.steps, n - 1)
    _, prompt_pass, per_step = timed_generate(model, layout, batch, 1 + k, use_cache, device)
    # the timed steps 1..k stand for steps 1..n-1 in proportion to their FLOPs
    timed = sum(step_cost(config, prompt_len, s, use_cache) for s in range(1, k + 1)) / k
    rest = sum(step_cost(config, prompt_len, s, use_cache) for s in range(1, n))
    seconds = prompt_pass + per_step * rest / timed
    method = f"first {k} steps, extrapolated"
    if seconds <= args.max_seconds:
        seconds, method = timed_generate(model, layout, batch, n, use_cache, device)[0], "all steps"
    tokens_per_s = batch * n / seconds
    useful = model_flops_per_token(config, prompt_len + n, training=False) * tokens_per_s
    return {"model_size": size, "parameters": config.num_parameters(), "image_tokens": n,
            "batch": batch, "kv_cache": use_cache, "method": method,
            "seconds_per_batch": round(seconds, 3), "image_tokens_per_s": round(tokens_per_s, 1),
            "images_per_s": round(batch / seconds, 4), "useful_mfu": round(args.reference.mfu(useful), 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", choices=list(LAYOUTS),
                   help="default: all; with --lshape, demo")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=8, help="timed steps of an extrapolated case")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="run every step of a case whose estimate is at most this")
    p.add_argument("--quick", action="store_true", help="3 timed steps, no full runs over 5 s")
    p.add_argument("--lshape", action="store_true",
                   help="L-shape against raster decoding at each of --grids (sizes default: demo)")
    p.add_argument("--grids", nargs="+", type=int, default=[9, 32])
    p.add_argument("--diffusion", action="store_true",
                   help="with --lshape: a denoiser of the same trunk in the same comparison")
    p.add_argument("--diffusion-steps", type=int, default=15)
    args = p.parse_args()
    if args.diffusion and not args.lshape:
        p.error("--diffusion joins the --lshape comparison: pass both")
    if args.quick:
        args.steps, args.max_seconds = 3, 5.0
    device = resolve_device()
    dtype = DTYPES[args.dtype]
    args.reference = MatmulReference(dtype, device)
    if args.lshape:
        with torch.no_grad():
            cases = [compare_lshape(size, grid, batch, args, device, dtype)
                     for size in args.sizes or ["demo"] for grid in args.grids
                     for batch in args.batches]
        name = "generation_throughput --lshape" + (" --diffusion" if args.diffusion else "")
        print(json.dumps({"benchmark": name, "device": str(device),
                          "dtype": args.dtype, "threads": torch.get_num_threads(),
                          "matmul_gflops_per_s": round(args.reference.rate / 1e9, 1),
                          "results": cases}, indent=2))
        return
    cases = []
    with torch.no_grad():
        for size in args.sizes or list(LAYOUTS):
            config = model_config(size, LAYOUTS[size], hidden_dropout=0.0, attention_dropout=0.0)
            torch.manual_seed(0)
            model = GPT(config, device=device, params_dtype=dtype).eval()
            cases += [measure(size, model, batch, cache, args, device)
                      for batch in args.batches for cache in (True, False)]
    speedup = {f"{c['model_size']} batch {c['batch']}": round(u["seconds_per_batch"] /
                                                               c["seconds_per_batch"], 2)
               for c, u in zip(cases[::2], cases[1::2])}
    print(json.dumps({"benchmark": "generation_throughput", "device": str(device),
                      "dtype": args.dtype, "threads": torch.get_num_threads(),
                      "matmul_gflops_per_s": round(args.reference.rate / 1e9, 1),
                      "kv_cache_speedup": speedup, "results": cases}, indent=2))


if __name__ == "__main__":
    main()
