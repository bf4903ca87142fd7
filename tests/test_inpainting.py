"""In/outpainting with a denoiser (TLD's mask channel): a fresh channel changes nothing and reads
only the known patches; training masks are never all or nothing; completion keeps the given
codes exactly and the sampler lands on the given latents; through generate_samples; fine-tuning
a trained denoiser adds the channel, starting from its very losses."""
import dataclasses
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import generate_samples
from generation_toy import make_checkpoint
from megatron_t2i.data.latents import box_known_mask, random_known_mask
from megatron_t2i.generation.config import GenerationConfig
from megatron_t2i.generation.strategies.diffusion import (branch, denoise, keeping, make_sampler,
                                                          sample_latent_codes)
from megatron_t2i.model.gpt import GPT
from megatron_t2i.tokenizers.vqvae import ImageTokenizer
from test_diffusion import LAYOUT, denoiser_config, random_denoiser, read_images
from test_training import BASE, ROOT, environment, metrics, run
from toy_data import write_toy_dataset

torch.set_num_threads(1)


def inputs(config, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = LAYOUT.text_to_latents([3, 4, 5])
    tokens, positions, mask, _ = branch(LAYOUT, seq, rows, "cpu")
    n, d = LAYOUT.image_tokens, config.latent_channels
    return (tokens, positions, mask, torch.randn(rows, n, d, generator=g),
            torch.rand(rows, generator=g), torch.randn(rows, n, d, generator=g))


def test_a_fresh_channel_changes_nothing_and_reads_only_the_known_patches():
    base = denoiser_config()
    torch.manual_seed(0)
    plain = GPT(base).eval()
    torch.nn.init.normal_(plain.head.proj.weight, std=0.5)
    channel = GPT(dataclasses.replace(base, inpaint_channel=True)).eval()
    missing = channel.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["latent_inputs.known_in.weight", "latent_inputs.known_in.bias"]
    tokens, positions, mask, noisy, sigma, given = inputs(base)
    known = torch.from_numpy(box_known_mask(LAYOUT.image_grid, (0.5, 0.0, 1.0, 1.0)))
    with torch.no_grad():
        reference = plain(tokens, positions, mask, noisy_latents=noisy, noise_level=sigma)
        fresh = channel(tokens, positions, mask, noisy_latents=noisy, noise_level=sigma,
                        known_latents=given, known_mask=known.expand(2, -1))
        assert torch.equal(fresh, reference)  # zero-initialised: the model fine-tuning starts from
        torch.nn.init.normal_(channel.latent_inputs.known_in.weight, std=0.5)

        def out(latents):
            return channel(tokens, positions, mask, noisy_latents=noisy, noise_level=sigma,
                           known_latents=latents, known_mask=known.expand(2, -1))
        elsewhere = given.clone()
        elsewhere[:, ~known] += 1.0
        assert torch.equal(out(elsewhere), out(given))  # unknown patches' latents are not read
        changed = given.clone()
        changed[:, known] += 1.0
        assert not torch.allclose(out(changed), out(given))
    with pytest.raises(ValueError, match="without an inpainting channel"):
        plain(tokens, positions, mask, noisy_latents=noisy, noise_level=sigma,
              known_latents=given, known_mask=known.expand(2, -1))


def test_training_masks_are_boxes_never_all_or_nothing_and_follow_the_seed():
    grid, kinds = 4, set()
    for seed in range(200):
        known = random_known_mask(grid, np.random.default_rng(seed))
        assert 0 < known.sum() < grid * grid
        assert np.array_equal(known, random_known_mask(grid, np.random.default_rng(seed)))
        box = ~known if known[0] and known[-1] else known  # the rectangle, either way round
        rows, cols = np.nonzero(box.reshape(grid, grid))
        if box.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1):
            kinds.add("inpaint" if box is not known else "outpaint")
    assert kinds == {"inpaint", "outpaint"}
    kept = box_known_mask(4, (0.25, 0.25, 0.75, 0.75)).reshape(4, 4)
    assert kept.sum() == 12 and not kept[1:3, 1:3].any()
    assert np.array_equal(box_known_mask(4, (0.25, 0.25, 0.75, 0.75), outside=True), ~kept.reshape(-1))


def denoiser_ctx(toy_tokenizers, channel: bool):
    """What sample_latent_codes reads of a generation context: a random toy denoiser (with a
    random inpainting channel, or none) and the toy VQ-VAE."""
    layout = toy_tokenizers[2]
    config, state = random_denoiser(layout)
    config = dataclasses.replace(config, inpaint_channel=channel)
    model = GPT(config).eval()
    model.load_state_dict(state, strict=False)
    if channel:
        torch.nn.init.normal_(model.latent_inputs.known_in.weight, std=0.02)
    return types.SimpleNamespace(layout=layout, model=model, device="cpu",
                                 image_tokenizer=ImageTokenizer.load(toy_tokenizers[1]))


@pytest.mark.parametrize("channel", [False, True])
def test_completion_keeps_the_given_codes_and_lands_on_their_latents(toy_tokenizers, channel):
    ctx = denoiser_ctx(toy_tokenizers, channel)
    layout, config = ctx.layout, ctx.model.config
    n = layout.image_tokens
    codes = torch.randint(0, layout.num_image_codes, (n,),
                          generator=torch.Generator().manual_seed(1))
    known = torch.from_numpy(box_known_mask(layout.image_grid, (0.5, 0.0, 1.0, 1.0)))
    prompt, uncond = layout.text_to_latents([3, 4]), layout.text_to_latents([])
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    cfg = GenerationConfig(cfg_scale=1.5, diffusion_steps=4)
    with torch.no_grad():
        out = sample_latent_codes(ctx, cfg, prompt, uncond, gens, known=(codes, known))
    assert torch.equal(out[:, known], codes[known].expand(3, -1))
    assert not torch.equal(out[0, ~known], out[1, ~known])  # the rest is drawn, per sample
    # the sampler's path itself ends on the given latents (before any snapping to codes)
    quantize = ctx.image_tokenizer.model.quantize_t
    given = quantize.embed.t()[codes] * config.latent_scale
    extra = {"known_latents": given.expand(3, -1, -1), "known_mask": known.expand(3, -1)} \
        if channel else {}
    noise = torch.randn(3, n, config.latent_channels, generator=torch.Generator().manual_seed(2))
    x0 = denoise(ctx.model, branch(layout, prompt, 3, "cpu", extra=extra), None,
                 make_sampler("dpm-solver++", 4), noise, denoiser=keeping(given, known))
    torch.testing.assert_close(x0[:, known], given[known].expand(3, -1, -1), atol=1e-5,
                               rtol=1e-5)


# ---- through the product -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def denoiser_checkpoint(tmp_path_factory, toy_tokenizers):
    config, state = random_denoiser(toy_tokenizers[2])
    return make_checkpoint(str(tmp_path_factory.mktemp("inpaint") / "ckpt"), toy_tokenizers,
                           state=state, config=config)


def test_completion_by_a_denoiser_through_generate_samples(denoiser_checkpoint, toy_tokenizers,
                                                           tmp_path, capsys):
    picture = tmp_path / "picture.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(picture)
    source = tmp_path / "q.tsv"
    source.write_text(f"a red circle\t{picture}\n", encoding="utf-8")
    flags = ["--load", denoiser_checkpoint, "--task", "completion", "--input-source",
             str(source), "--batch-size", "2", "--diffusion-steps", "3", "--cfg-scale", "1.0"]
    for name, extra in {"inpaint": ["--mask-box", "0.25,0.25,0.75,0.75"],
                        "outpaint": ["--mask-box", "0.25,0.25,0.75,0.75", "--mask-outside"],
                        "rows": ["--keep-rows", "1"]}.items():
        assert generate_samples.main(flags + ["--output-path", str(tmp_path / name),
                                              *extra]) == 0, name
        assert len(read_images(tmp_path / name / "a_red_circle")) == 2
    for extra, said in {("--mask-outside",): "give the box to keep with --mask-box",
                        ("--mask-box", "0.0,0.0,0.05,0.05"): "nothing would be repainted",
                        ("--mask-box", "0,0,1,1"): "nothing would be kept",
                        ("--mask-box", "0,0,0.05,0.05", "--mask-outside"): "nothing would be kept"
                        }.items():
        capsys.readouterr()
        assert generate_samples.main(flags + ["--output-path", str(tmp_path / "x"),
                                              *extra]) == 2, extra
        assert said in capsys.readouterr().err
    autoregressive = make_checkpoint(str(tmp_path / "ar"), toy_tokenizers)
    assert generate_samples.main(["--load", autoregressive, "--task", "completion",
                                  "--input-source", str(source), "--mask-box", "0,0,0.5,0.5",
                                  "--output-path", str(tmp_path / "y")]) == 2
    assert "in/outpainting is a denoiser's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_samples.main(flags + ["--mask-box", "0.5,0,0.25,1"])
    assert "X0 < X1" in capsys.readouterr().err


@pytest.mark.slow
def test_finetuning_a_denoiser_adds_the_channel_from_its_very_losses(tmp_path, toy_tokenizers):
    """pretrain.py --finetune --inpaint-masks from a denoiser without the channel: its first loss
    is the plain fine-tune's to the bit (the new weights start at zero), the channel then learns,
    and the checkpoint resumed without --inpaint-masks is refused in one line."""
    text, image, layout = toy_tokenizers
    data = write_toy_dataset(str(tmp_path / "toy.lmdb"), count=100, layout=layout,
                             image_tokenizer=image)
    # no dropout: building the new weights draws from the generator dropout reads afterwards
    common = BASE + ["--data-path", data, "--tasks", "diffusion", "--ema-decay", "0.9",
                     "--hidden-dropout", "0", "--attention-dropout", "0"]
    base = str(tmp_path / "base")
    run(common + ["--train-iters", "3", "--save", base], nproc=1)
    tune = common + ["--train-iters", "3", "--load", base, "--finetune"]
    plain, channel = str(tmp_path / "plain"), str(tmp_path / "channel")
    run(tune + ["--save", plain], nproc=1)
    run(tune + ["--save", channel, "--inpaint-masks", "0.75"], nproc=1)
    assert metrics(channel)[1]["train/loss"] == metrics(plain)[1]["train/loss"]
    from megatron_t2i.training import convert
    weights, config = convert.load_full_state_dict(channel, ema=False)[:2]
    assert config.inpaint_channel and weights["latent_inputs.known_in.weight"].abs().sum() > 0
    again = run(common + ["--train-iters", "4", "--save", channel], nproc=1, check=False)
    assert again.returncode != 0 and "model inpaint_channel is True, this run's is False" in \
        again.stdout + again.stderr
    # the bench through the same code paths, a smoke run
    bench = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "inpainting.py"),
                            "--load", base, "--data-path", data, "--model-size", "tiny",
                            "--iters", "2", "--records", "2", "--samples", "2",
                            "--text-tokenizer", text, "--image-tokenizer", image,
                            "--output-dir", str(tmp_path / "bench")], cwd=ROOT,
                           env=environment(), capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr[-2000:]
    table = (tmp_path / "bench" / "inpainting.md").read_text()
    assert table.count("\n") == 5 and "with --inpaint-masks 0.75" in table
