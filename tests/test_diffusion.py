"""The denoiser on the trunk (TLD): samplers given the true x0 return it and read the training
path's states, guidance 0 is the conditional model, the training sequence hides the codes, the x0
loss is the hand-computed MSE, TP=2 = TP=1 (outputs, losses, gradients), samples do not depend on
their batch, and pretrain.py --tasks diffusion --ema-decay killed and resumed = uninterrupted."""
import dataclasses
import os

import numpy as np
import pytest
import torch

from PIL import Image

import generate_samples
from distributed import run_distributed
from generation_toy import make_checkpoint
from megatron_t2i.config import model_config
from megatron_t2i.data.latents import latent_scale
from megatron_t2i.data.loader import SequenceBuilder, collate
from megatron_t2i.generation.strategies.diffusion import denoise, make_sampler, sequence_inputs
from megatron_t2i.model.attention import block_causal_mask
from megatron_t2i.model.diffusion import grid_positions, noised
from megatron_t2i.model.gpt import GPT
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.tokenizers.vqvae import EMACodebook, VQVAEConfig
from megatron_t2i.training import convert
from megatron_t2i.training.ema import EMA
from megatron_t2i.training.objectives import X0MeanSquaredError
from test_training import BASE, kill_at, metrics, resumed_equals_uninterrupted, run, weights
from toy_data import write_toy_dataset

torch.set_num_threads(1)
LAYOUT = TokenLayout(num_image_codes=32, num_text_tokens=40, image_grid=4, max_text_tokens=6)
D = 6


def denoiser_config(layout=LAYOUT, tp=1, d=D):
    return model_config("tiny", layout, tp, hidden_dropout=0.0, attention_dropout=0.0,
                        head="denoise", latent_channels=d, latent_scale=1.0,
                        latent_token=layout["[ENC]"], noise_token=layout["[BOI1]"])


def oracle(x0, noise):
    """A stand-in denoiser returning the true x0 (any states it is given); it checks that every
    state it reads is x0's training-path state at that sigma, x_t = (1 - sigma) x0 + sigma e (to
    0.1 %: the samplers start from the noise itself, at sigma 0.999)."""
    seen = []

    def predict(model, tokens, positions, mask, x, sigma):
        rows = len(x) // len(x0)
        torch.testing.assert_close(x, noised(x0, noise, sigma).repeat(rows, 1, 1), rtol=0,
                                   atol=1e-2)
        seen.append(sigma)
        return x0.repeat(rows, 1, 1)
    return predict, seen


@pytest.mark.parametrize("name", ["dpm-solver++", "ddim"])
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_a_sampler_given_the_true_x0_returns_it_along_the_training_path(name, scale):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, D, generator=g), torch.randn(3, 16, D, generator=g)
    predict, seen = oracle(x0, noise)
    seq = LAYOUT.text_to_latents([1, 2])
    inputs = tuple(t[None] if t.dim() == 1 else t for t in sequence_inputs(LAYOUT, seq))
    out = denoise(None, inputs, inputs if scale else None, make_sampler(name, 15), noise, scale,
                  denoiser=predict)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    assert len(seen) == 15 and seen[0] > 0.99 and all(a > b for a, b in zip(seen, seen[1:]))


def test_the_training_sequence_hides_the_codes_and_noises_on_the_path():
    table = np.random.default_rng(0).standard_normal((32, D)).astype("float32")
    builder = SequenceBuilder(LAYOUT, {"diffusion": 1.0}, latent_table=table)
    codes = np.arange(16) * 2
    seq = builder([3, 4, 5], codes, sample_seed=11)
    again = builder([3, 4, 5], codes, sample_seed=11)
    s = seq.image_start
    assert (seq.tokens[s:s + 16] == LAYOUT["[ENC]"]).all() and (seq.tokens < 32).sum() == 0
    assert seq.tokens[s - 1] == LAYOUT["[BOI1]"] and (seq.block_ids[:s + 17] == 0).all()
    torch.testing.assert_close(seq.x0, torch.from_numpy(table[codes]))
    rng = np.random.default_rng(11)  # the builder's draws for this sample: task, dropout, sigma, e
    rng.random(), rng.random()
    sigma = rng.beta(0.75, 0.75)
    expected = (1 - sigma) * table[codes] + sigma * rng.standard_normal((16, D))
    assert seq.noise_level == pytest.approx(sigma)
    torch.testing.assert_close(seq.noisy_latents, torch.from_numpy(expected).float())
    assert torch.equal(seq.noisy_latents, again.noisy_latents)  # the sample seed decides


def test_the_x0_loss_is_the_mean_squared_error_at_the_latent_patches():
    torch.manual_seed(0)
    model = GPT(denoiser_config())
    torch.nn.init.normal_(model.head.proj.weight)
    table = np.random.default_rng(0).standard_normal((32, D)).astype("float32")
    builder = SequenceBuilder(LAYOUT, {"diffusion": 1.0}, latent_table=table)
    batch = collate([builder([1, 2, 3][:n], np.arange(16) + n, n) for n in (1, 3)])
    objective = X0MeanSquaredError(LAYOUT)
    batch = objective.prepare(batch)
    out = model(batch["tokens"], batch["position_ids"], block_causal_mask(batch["block_ids"]),
                noisy_latents=batch["noisy_latents"], noise_level=batch["noise_level"])
    total, sums = objective.loss(out, batch)
    where = batch["tokens"] == LAYOUT["[ENC]"]
    manual = ((out[where].view(2, 16, D) - batch["x0"]) ** 2).mean()
    torch.testing.assert_close(total / objective.weight(batch), manual)
    assert objective.summary(sums)["loss"] == pytest.approx(manual.item(), rel=1e-6)
    # nothing but the noisy patches reaches the output: other codes, the same prediction
    other = collate([builder([1, 2, 3][:n], np.arange(16) + n + 7, n) for n in (1, 3)])
    other = {**other, "noisy_latents": batch["noisy_latents"]}
    again = model(other["tokens"], other["position_ids"], block_causal_mask(other["block_ids"]),
                  noisy_latents=other["noisy_latents"], noise_level=batch["noise_level"])
    assert torch.equal(again, out)


def test_guidance_scale_zero_is_the_conditional_model():
    torch.manual_seed(0)
    model = GPT(denoiser_config()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cond = tuple(t[None].expand(2, *t.shape) if t.dim() == 1 else t
                 for t in sequence_inputs(LAYOUT, LAYOUT.text_to_latents([1, 2, 3])))
    uncond = tuple(t[None].expand(2, *t.shape) if t.dim() == 1 else t
                   for t in sequence_inputs(LAYOUT, LAYOUT.text_to_latents([])))
    noise = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(3))
    plain = denoise(model, cond, None, make_sampler("dpm-solver++", 5), noise)
    zero = denoise(model, cond, uncond, make_sampler("dpm-solver++", 5), noise, 0.0)
    guided = denoise(model, cond, uncond, make_sampler("dpm-solver++", 5), noise, 2.0)
    assert torch.equal(zero, plain)
    assert (guided - plain).abs().max() > 1e-3  # the unconditional branch is read when s != 0
    # a row alone is denoised as in its batch (guided: both branches in one forward)
    alone = denoise(model, tuple(t[:1] for t in cond), tuple(t[:1] for t in uncond),
                    make_sampler("dpm-solver++", 5), noise[1:], 2.0)
    torch.testing.assert_close(alone, guided[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [{}, {"inpaint_channel": True}, {"mlp_conv": True},
                                   {"decoder_layers": 1}])
def test_the_parameter_count_of_a_denoiser(extra):
    config = dataclasses.replace(denoiser_config(), **extra)
    assert config.num_parameters() == sum(p.numel() for p in GPT(config).parameters())


def test_latent_scale_and_nearest_codes():
    table = np.random.default_rng(0).standard_normal((32, D)).astype("float32")
    # record c holds code c (c % 3 + 1) times: the scale weighs each code by how often it occurs
    records = [type("R", (), {"image_codes": np.full(c % 3 + 1, c)})() for c in range(32)]
    scale = latent_scale(table, records, range(32))
    patches = np.concatenate([table[r.image_codes] for r in records]).astype(np.float64)
    assert scale == pytest.approx(1 / np.sqrt((patches ** 2).mean()), rel=1e-6)
    codes = torch.randint(0, 32, (10,))
    latents = torch.from_numpy(table)[codes] + 1e-3
    quantize = EMACodebook(dataclasses.replace(VQVAEConfig(), embed_dim=D, codebook_size=32))
    quantize.embed.copy_(torch.from_numpy(table).t())
    assert torch.equal(quantize.nearest(latents), codes)  # what sampling snaps with


def test_grid_positions_tell_rows_and_columns_apart():
    side, h = 5, 16
    e = grid_positions(side * side, h).view(side, side, h)
    rows, cols = e[..., :h // 2], e[..., h // 2:]
    assert torch.equal(rows[2, 0], rows[2, 4]) and not torch.equal(rows[1, 0], rows[2, 0])
    assert torch.equal(cols[0, 3], cols[4, 3]) and not torch.equal(cols[0, 1], cols[0, 3])
    assert e.pow(2).mean().sqrt() == pytest.approx(0.5 ** 0.5, rel=1e-5)  # unit amplitude
    with pytest.raises(ValueError, match="not a square grid"):
        grid_positions(10, h)


def test_the_ema_follows_its_formula():
    layer = torch.nn.Linear(3, 2)
    ema = EMA(layer, 0.9)
    start = layer.weight.detach().clone()
    for n in range(3):
        with torch.no_grad():
            layer.weight.add_(1.0)
        before = ema.shadow["weight"].clone()
        ema.update()
        rate = 1 - min(0.9, (1 + n) / (10 + n))
        torch.testing.assert_close(ema.shadow["weight"], before + rate * (layer.weight - before))
    assert not torch.equal(ema.shadow["weight"], start)


# ---- tensor parallelism ------------------------------------------------------------------------
def _tp_step(rank, world):
    from megatron_t2i import mpu
    mpu.initialize_model_parallel(world, 1)
    torch.manual_seed(0)  # the same full weights whatever the TP size
    model = GPT(denoiser_config(tp=2))
    torch.nn.init.normal_(model.head.proj.weight, std=0.1)
    table = np.random.default_rng(0).standard_normal((32, D)).astype("float32")
    builder = SequenceBuilder(LAYOUT, {"diffusion": 1.0}, 0.5, latent_table=table)
    objective = X0MeanSquaredError(LAYOUT)
    batch = objective.prepare(collate([builder([1, 2, 3, 4][:n], np.arange(16) * n % 32, n)
                                       for n in (1, 2, 4)]))
    out = model(batch["tokens"], batch["position_ids"], block_causal_mask(batch["block_ids"]),
                noisy_latents=batch["noisy_latents"], noise_level=batch["noise_level"])
    total, _ = objective.loss(out, batch)
    total.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()
             if n.startswith(("latent_inputs", "head", "transformer.position"))}
    return out.detach().numpy(), total.item(), grads


@pytest.mark.slow
def test_the_denoiser_at_tp2_equals_tp1():
    one = run_distributed(_tp_step, 1)[0]
    two = run_distributed(_tp_step, 2)
    for rank in range(2):
        torch.testing.assert_close(torch.from_numpy(two[rank][0]), torch.from_numpy(one[0]),
                                   rtol=1e-5, atol=1e-5)
        assert two[rank][1] == pytest.approx(one[1], rel=1e-5)
        for name, grad in one[2].items():  # replicated: every rank holds the full gradient
            torch.testing.assert_close(torch.from_numpy(two[rank][2][name]),
                                       torch.from_numpy(grad), rtol=1e-4,
                                       atol=1e-6 * float(np.abs(grad).max()), msg=name)


# ---- through the product -----------------------------------------------------------------------
def random_denoiser(layout, seed=0):
    """A tiny denoiser with random weights (the head too: a fresh one is zero), so that its
    samples differ with their noise."""
    torch.manual_seed(seed)
    config = denoiser_config(layout, d=8)  # the toy tokenizer's code dimension
    model = GPT(config)
    torch.nn.init.normal_(model.head.proj.weight, std=0.5)
    return config, model.state_dict()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, toy_tokenizers):
    root = tmp_path_factory.mktemp("denoisers")
    config, state = random_denoiser(toy_tokenizers[2])
    return {tp: make_checkpoint(str(root / f"tp{tp}"), toy_tokenizers, tp, state=state,
                                config=config) for tp in (1, 2)}


def read_images(folder):
    return [np.asarray(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))]


def test_samples_do_not_depend_on_their_batch(checkpoints, tmp_path, capsys):
    source = tmp_path / "q.txt"
    source.write_text("a red circle\n", encoding="utf-8")
    runs = {}
    for name, flags in {"auto": [], "rounds": ["--max-inference-batch-size", "1"],
                        "ddim": ["--sampler", "ddim"]}.items():
        argv = ["--load", checkpoints[1], "--input-source", str(source), "--batch-size", "3",
                "--cfg-scale", "1.0", "--diffusion-steps", "4", "--output-path",
                str(tmp_path / name), *flags]
        assert generate_samples.main(argv) == 0
        runs[name] = read_images(tmp_path / name / "a_red_circle")
    assert len(runs["auto"]) == 3 and not np.array_equal(runs["auto"][0], runs["auto"][1])
    assert all(np.array_equal(a, b) for a, b in zip(runs["rounds"], runs["auto"]))
    assert not all(np.array_equal(a, b) for a, b in zip(runs["ddim"], runs["auto"]))
    assert generate_samples.main(["--load", checkpoints[1], "--input-source", str(source),
                                  "--method", "autoregressive", "--output-path",
                                  str(tmp_path / "x")]) != 0
    assert "--method autoregressive: this checkpoint is a denoiser" in capsys.readouterr().err
    assert generate_samples.main(["--load", checkpoints[1], "--input-source", str(source),
                                  "--task", "image2text", "--output-path", str(tmp_path / "y")]) != 0
    assert "--task image2text needs an autoregressive model" in capsys.readouterr().err


def test_slerp_stays_on_the_sphere_between_its_ends():
    from megatron_t2i.generation.tasks.interpolation import slerp
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 12, generator=g).double()
    a, b = a / a.norm(), b / b.norm()
    path = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=1), torch.ones(5, dtype=torch.float64))
    angles = torch.arccos((path[:-1] * path[1:]).sum(1).clamp(-1, 1))
    torch.testing.assert_close(angles, angles[:1].expand(4))  # equal steps along the arc


def test_an_interpolation_starts_at_prompt_a_and_moves_to_b(checkpoints, tmp_path, capsys,
                                                           toy_tokenizers):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a red circle\ta blue square\n", encoding="utf-8")
    flags = ["--load", checkpoints[1], "--batch-size", "4", "--cfg-scale", "1.0",
             "--diffusion-steps", "4"]
    assert generate_samples.main(flags + ["--task", "interpolation", "--input-source",
                                          str(pairs), "--output-path", str(tmp_path / "i")]) == 0
    folder = tmp_path / "i" / "a_red_circle_to_a_blue_square"
    frames = read_images(folder)
    assert len(frames) == 5 and "strip.png" in os.listdir(folder)  # 4 frames and the strip
    assert not np.array_equal(frames[0], frames[3])
    single = tmp_path / "a.txt"
    single.write_text("a red circle\n", encoding="utf-8")
    assert generate_samples.main(flags + ["--input-source", str(single), "--output-path",
                                          str(tmp_path / "t")]) == 0
    first = np.asarray(Image.open(tmp_path / "t" / "a_red_circle" / "000.png"))
    assert np.array_equal(frames[0], first)  # frame 0: text2image's first image of A
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n", encoding="utf-8")
    capsys.readouterr()
    generate_samples.main(flags + ["--task", "interpolation", "--input-source", str(bad),
                                   "--output-path", str(tmp_path / "b")])
    said = capsys.readouterr()
    assert "expected prompt A<TAB>prompt B" in said.err + said.out
    autoregressive = make_checkpoint(str(tmp_path / "ar"), toy_tokenizers)
    assert generate_samples.main(["--load", autoregressive, "--task", "interpolation",
                                  "--input-source", str(pairs), "--output-path",
                                  str(tmp_path / "ar-out")]) == 2
    assert "--task interpolation needs a denoiser" in capsys.readouterr().err


@pytest.mark.slow
def test_sampling_at_tp2_equals_tp1(checkpoints, tmp_path):
    import subprocess

    from test_training import ROOT, command, environment
    source = tmp_path / "q.txt"
    source.write_text("a blue star\n", encoding="utf-8")
    out = {}
    for tp in (1, 2):
        argv = command(["--load", checkpoints[tp], "--input-source", str(source),
                        "--batch-size", "2", "--cfg-scale", "1.5", "--diffusion-steps", "3",
                        "--output-path", str(tmp_path / str(tp))], nproc=tp,
                       program="generate_samples.py")
        done = subprocess.run(argv, cwd=ROOT, env=environment(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        out[tp] = read_images(tmp_path / str(tp) / "a_blue_star")
    assert len(out[1]) == 2 and all(np.array_equal(a, b) for a, b in zip(out[1], out[2]))


@pytest.mark.slow
def test_diffusion_training_at_tp2_resumes_bitwise_with_its_ema(tmp_path, toy_tokenizers):
    """pretrain.py --tasks diffusion at TP=2 with an EMA, killed and resumed: the same losses,
    weights and moving average; the converters and generation read the moving average."""
    text, image, layout = toy_tokenizers
    data = write_toy_dataset(str(tmp_path / "toy.lmdb"), count=48, layout=layout,
                             image_tokenizer=image)
    flags = BASE + ["--data-path", data, "--train-iters", "8", "--save-interval", "4",
                    "--tasks", "diffusion", "--text-dropout", "0.3", "--ema-decay", "0.9",
                    "--tensor-model-parallel-size", "2"]
    full = resumed_equals_uninterrupted(flags, tmp_path)
    assert metrics(full)[8]["train/x0_loss"] > 0
    interrupted = str(tmp_path / "interrupted")
    assert ema_state(full)["updates"] == 8
    for name, t in ema_state(full)["shadow"].items():
        assert torch.equal(t, ema_state(interrupted)["shadow"][name]), name
    averaged = convert.load_full_state_dict(full)[0]
    trained = convert.load_full_state_dict(full, ema=False)[0]
    bias = "head.proj.bias"  # replicated: the same on both ranks
    assert torch.equal(averaged[bias], ema_state(full)["shadow"][bias])
    assert torch.equal(trained[bias], weights(full)[bias])
    assert not torch.equal(averaged[bias], trained[bias])


@pytest.mark.slow
def test_a_language_free_denoiser_in_two_pipeline_stages_trains_and_resumes_like_one_process(
        tmp_path, toy_tokenizers):
    """pretrain.py --tasks clip-diffusion with an inpainting channel (ConditionPipe and LatentPipe
    on the first stage, the denoising head on the last) at PP=2 gives one process's losses,
    weights and moving average;
    killed and resumed, it ends where the uninterrupted run does, EMA included."""
    text, image, layout = toy_tokenizers
    data = write_toy_dataset(str(tmp_path / "toy.lmdb"), count=48, layout=layout, clip_dim=12,
                             image_tokenizer=image)
    flags = BASE + ["--data-path", data, "--train-iters", "6", "--save-interval", "3",
                    "--tasks", "clip-diffusion", "--text-dropout", "0.3", "--ema-decay", "0.9",
                    "--zero-stage", "1", "--gradient-accumulation-steps", "2",
                    "--hidden-dropout", "0", "--attention-dropout", "0", "--inpaint-masks", "0.5"]
    one, two, resumed = (str(tmp_path / name) for name in ("one", "two", "resumed"))
    run(flags + ["--save", one], nproc=1)
    pipelined = flags + ["--pipeline-model-parallel-size", "2"]
    run(pipelined + ["--save", two])
    # equal up to rounding, which Adam amplifies where gradients are tiny (the zero-initialised
    # head passes none to the trunk in the first step; a few embedding rows move by up to the
    # learning rate per step on noise-sized gradients), so the weights within a few steps' worth
    assert metrics(two)[1]["train/loss"] == pytest.approx(metrics(one)[1]["train/loss"], rel=1e-6)
    for it in range(2, 7):
        assert metrics(two)[it]["train/loss"] == pytest.approx(metrics(one)[it]["train/loss"],
                                                               rel=2e-3), it
    for ema in (True, False):
        reference = convert.load_full_state_dict(one, ema=ema)[0]
        for key, value in convert.load_full_state_dict(two, ema=ema)[0].items():
            torch.testing.assert_close(value, reference[key], atol=3e-3, rtol=1e-2,
                                       msg=lambda m, key=key: f"{key}: {m}")
    averaged, trained = (convert.load_full_state_dict(two, ema=e)[0]["head.proj.weight"]
                         for e in (True, False))
    assert not torch.equal(averaged, trained)  # the EMA of the last stage is read
    # a caption denoiser in two stages samples from its layer files and its stages' EMA
    captions = str(tmp_path / "captions")
    run(BASE + ["--data-path", data, "--train-iters", "2", "--tasks", "diffusion",
                "--ema-decay", "0.9", "--zero-stage", "1", "--pipeline-model-parallel-size", "2",
                "--save", captions])
    prompt = tmp_path / "q.txt"
    prompt.write_text("a red circle\n", encoding="utf-8")
    assert generate_samples.main(["--load", captions, "--text-tokenizer", text,
                                  "--image-tokenizer", image, "--input-source", str(prompt),
                                  "--batch-size", "2", "--diffusion-steps", "3",
                                  "--output-path", str(tmp_path / "samples")]) == 0
    assert len(read_images(tmp_path / "samples" / "a_red_circle")) == 2
    kill_at(pipelined + ["--save", resumed], "iteration 5/6")
    assert "at iteration 3" in run(pipelined + ["--save", resumed]).stdout
    for ema in (True, False):
        full = convert.load_full_state_dict(two, ema=ema)[0]
        for key, value in convert.load_full_state_dict(resumed, ema=ema)[0].items():
            assert torch.equal(value, full[key]), (key, ema)
    masked = run(pipelined + ["--save", str(tmp_path / "masked"), "--mask-ratio", "0.5",
                              "--decoder-layers", "1"], check=False)
    assert masked.returncode != 0 and "--decoder-layers: a denoiser's mask decoder (MaskDiT) " \
        "trains without pipeline parallelism" in masked.stdout + masked.stderr


def ema_state(save_dir):
    tag = open(os.path.join(save_dir, "latest")).read().strip()
    return torch.load(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"),
                      weights_only=True)["ema"]


@pytest.mark.slow
def test_a_denoiser_starts_its_trunk_from_an_autoregressive_checkpoint(tmp_path, toy_tokenizers):
    """--init-trunk: a TP=2 denoiser's word and position embeddings, layers and final LayerNorm
    start as a TP=1 autoregressive model's (its vocabulary padded to TP=2's), its patch inputs and
    head from scratch; another trunk shape, or with --load, is one line."""
    text, image, layout = toy_tokenizers
    data = write_toy_dataset(str(tmp_path / "toy.lmdb"), count=48, layout=layout,
                             image_tokenizer=image)
    ar = str(tmp_path / "ar")
    run(BASE + ["--data-path", data, "--train-iters", "2", "--tasks", "text2image",
                "--save", ar], nproc=1)
    trunk = convert.load_full_state_dict(ar)[0]
    denoiser = str(tmp_path / "denoiser")
    flags = BASE + ["--data-path", data, "--tasks", "diffusion", "--train-iters", "1",
                    "--lr", "1e-9", "--init-trunk", ar]
    out = run(flags + ["--save", denoiser, "--tensor-model-parallel-size", "2"])
    assert "trunk initialised from" in out.stdout
    started = convert.load_full_state_dict(denoiser)[0]
    for key, value in trunk.items():
        rows = value.shape[0]  # the word embeddings: TP=2 pads the vocabulary further
        torch.testing.assert_close(started[key][:rows], value, atol=1e-6, rtol=0, msg=key)
    assert started["word_embeddings.weight"].shape[0] >= trunk["word_embeddings.weight"].shape[0]
    assert "head.proj.weight" not in trunk and "latent_inputs.patch_in.weight" in started
    staged = str(tmp_path / "staged")  # a pipeline's stages map the trunk's keys to their own
    run(flags + ["--save", staged, "--pipeline-model-parallel-size", "2", "--zero-stage", "1"])
    for key, value in convert.load_full_state_dict(staged)[0].items():
        if key in trunk:
            torch.testing.assert_close(value, trunk[key], atol=1e-6, rtol=0, msg=key)
    missing = run(flags + ["--save", str(tmp_path / "none"), "--init-trunk",
                           str(tmp_path / "nothing")], nproc=1, check=False)
    assert missing.returncode != 0 and f"--init-trunk: {tmp_path / 'nothing'}: no such folder" \
        in missing.stdout + missing.stderr
    deeper = run(flags + ["--save", str(tmp_path / "deeper"), "--num-layers", "3"], nproc=1,
                 check=False)
    assert deeper.returncode != 0 and "its model num_layers is 2, this run's is 3" in \
        deeper.stdout + deeper.stderr
    both = run(flags + ["--save", str(tmp_path / "both"), "--load", ar, "--finetune"], nproc=1,
               check=False)
    assert both.returncode != 0 and "--init-trunk and --load" in both.stdout + both.stderr


@pytest.mark.slow
def test_a_language_free_denoiser_takes_the_condition_projector_of_a_language_free_trunk(
        tmp_path, toy_tokenizers):
    """--init-trunk from a clip2image GPT into a clip-diffusion denoiser: the condition projector
    and null embedding come with the trunk where both read the same slots, not otherwise."""
    text, image, layout = toy_tokenizers
    data = write_toy_dataset(str(tmp_path / "toy.lmdb"), count=48, layout=layout, clip_dim=12,
                             image_tokenizer=image)
    ar = str(tmp_path / "ar")
    run(BASE + ["--data-path", data, "--train-iters", "2", "--tasks", "clip2image",
                "--save", ar], nproc=1)
    trunk = convert.load_full_state_dict(ar)[0]
    flags = BASE + ["--data-path", data, "--tasks", "clip-diffusion", "--train-iters", "1",
                    "--lr", "1e-9", "--init-trunk", ar]
    out = run(flags + ["--save", str(tmp_path / "same")], nproc=1)
    assert "the condition projector too" in out.stdout
    started = convert.load_full_state_dict(str(tmp_path / "same"))[0]
    for key in ("conditioning.proj.weight", "conditioning.proj.bias", "conditioning.null",
                "transformer.layers.0.attention.query_key_value.weight"):
        torch.testing.assert_close(started[key], trunk[key], atol=1e-6, rtol=0, msg=key)
    out = run(flags + ["--save", str(tmp_path / "other"), "--condition-slots", "2"], nproc=1)
    assert "trunk initialised from" in out.stdout and "projector" not in out.stdout
    other = convert.load_full_state_dict(str(tmp_path / "other"))[0]
    assert other["conditioning.null"].shape[0] == 2
    torch.testing.assert_close(other["transformer.final_layernorm.weight"],
                               trunk["transformer.final_layernorm.weight"], atol=1e-6, rtol=0)
