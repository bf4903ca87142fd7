"""Masked-patch training (MaskDiT, model/masked.py) and the language-free denoiser: with every
patch visible the model and objective are exactly the unmasked ones; the kept/hidden split covers
every patch once and a hidden patch's input reaches no output; the loss is the hand-computed
MaskDiT loss; TP=2 = TP=1 with masking; pretrain.py masked then unmasked at the end, killed and
resumed = uninterrupted; a CLIP-conditioned denoiser reads its condition, not a caption."""
import numpy as np
import pytest
import torch

from distributed import run_distributed
from megatron_t2i.data.loader import SequenceBuilder, collate
from megatron_t2i.model.attention import block_causal_mask
from megatron_t2i.model.gpt import GPT
from megatron_t2i.model.masked import kept_positions
from megatron_t2i.training.flops import model_flops
from megatron_t2i.training.loop import step_flops
from megatron_t2i.training.objectives import X0MeanSquaredError
from test_diffusion import LAYOUT, D, denoiser_config
from test_training import BASE, metrics, resumed_equals_uninterrupted, run
from toy_data import write_toy_dataset

torch.set_num_threads(1)
TABLE = np.random.default_rng(0).standard_normal((32, D)).astype("float32")
N = LAYOUT.image_tokens


def masked_model(tp=1, seed=0, decoder_layers=1, mlp_conv=False):
    """A masked denoiser; with mlp_conv, its grid convolutions drawn at random (the full
    weight from one seed, this rank's channels of it: the same model at every TP size)."""
    from dataclasses import replace

    from megatron_t2i import mpu
    torch.manual_seed(seed)
    model = GPT(replace(denoiser_config(tp=tp), decoder_layers=decoder_layers,
                        mlp_conv=mlp_conv))
    torch.nn.init.normal_(model.head.proj.weight, std=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "grid_conv" in name:
            full = torch.randn(p.shape[0] * mpu.get_tensor_model_parallel_world_size(),
                               *p.shape[1:], generator=g) * 0.3
            with torch.no_grad():
                p.copy_(full.chunk(mpu.get_tensor_model_parallel_world_size())[
                    mpu.get_tensor_model_parallel_rank()])
    return model


def batch_of(mask_ratio, tasks=None, arrays=None, slots=0, dropout=0.0):
    builder = SequenceBuilder(LAYOUT, tasks or {"diffusion": 1.0}, dropout, slots,
                              latent_table=TABLE, mask_ratio=mask_ratio)
    return collate([builder([1, 2, 3, 4][:n], np.arange(N) * n % 32, n, arrays=arrays)
                    for n in (1, 2, 4)])


def forward(model, batch, **extra):
    return model(batch["tokens"], batch["position_ids"], block_causal_mask(batch["block_ids"]),
                 noisy_latents=batch["noisy_latents"], noise_level=batch["noise_level"],
                 **{k: batch[k] for k in ("visible_patches", "condition", "condition_mask")
                    if k in batch}, **extra)


def test_ratio_zero_is_the_unmasked_objective_exactly():
    model = masked_model()
    objective = X0MeanSquaredError(LAYOUT)
    plain = batch_of(0.0)
    assert "visible_patches" not in plain
    for key, value in batch_of(0.0).items():  # the same draws as a builder without masking
        assert torch.equal(value, plain[key]), key
    plain = objective.prepare(plain)
    everything = objective.prepare({**plain, "visible_patches": torch.ones(3, N, dtype=torch.bool)})
    losses, grads = [], []
    for batch in (plain, everything):
        model.zero_grad()
        total, sums = objective.loss(forward(model, batch), batch)
        (total / objective.weight(batch)).backward()
        losses.append((total, objective.summary(sums)))
        grads.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                      for n, p in model.named_parameters()})  # the unused mask token: none
    assert torch.equal(losses[0][0], losses[1][0])
    assert losses[0][1] == losses[1][1] and "hidden_patch_loss" not in losses[1][1]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("mlp_conv", [False, True])
def test_the_split_covers_every_patch_once_and_hidden_inputs_reach_nothing(mlp_conv):
    batch = batch_of(0.5)
    visible = batch["visible_patches"]
    assert visible.shape == (3, N) and (visible.sum(1) == N - 8).all()
    assert not torch.equal(visible[0], visible[1])  # each sample draws its own
    index, hidden = kept_positions(batch["tokens"], LAYOUT["[ENC]"], visible)
    where = batch["tokens"] == LAYOUT["[ENC]"]
    kept = torch.zeros_like(where).scatter(1, index, True)
    assert not (kept & hidden).any() and torch.equal(kept | hidden, torch.ones_like(where))
    assert torch.equal(hidden[where].view(3, N), ~visible)  # hidden = the unseen patches, in order
    assert (index.diff(dim=1) > 0).all()                   # the trunk reads them in order
    model = masked_model(mlp_conv=mlp_conv).eval()
    out = forward(model, batch)
    changed = batch["noisy_latents"].clone()
    changed[~visible] += 5.0
    assert torch.equal(forward(model, {**batch, "noisy_latents": changed}), out)
    changed[visible] += 5.0  # a visible patch does reach the output
    assert not torch.equal(forward(model, {**batch, "noisy_latents": changed}), out)


def test_the_masked_loss_is_maskdits():
    model = masked_model()
    objective = X0MeanSquaredError(LAYOUT, mask_loss_weight=0.3)
    batch = objective.prepare(batch_of(0.5))
    out = forward(model, batch)
    total, sums = objective.loss(out, batch)
    visible = batch["visible_patches"]
    pred = out[batch["tokens"] == LAYOUT["[ENC]"]].view(3, N, D)
    x0_error = ((pred - batch["x0"]) ** 2).mean(-1)
    input_error = ((pred - batch["noisy_latents"]) ** 2).mean(-1)
    expected = x0_error[visible].sum() + 0.3 * input_error[~visible].sum()
    torch.testing.assert_close(total, expected)
    assert objective.weight(batch) == visible.sum()
    summary = objective.summary(sums)
    assert summary["x0_loss"] == pytest.approx(x0_error[visible].mean().item(), rel=1e-6)
    assert summary["hidden_patch_loss"] == pytest.approx(input_error[~visible].mean().item(),
                                                         rel=1e-6)


def test_the_trunk_flops_count_the_visible_patches_only():
    from dataclasses import replace
    config = replace(denoiser_config(), decoder_layers=1)
    batch = batch_of(0.5)
    b, s = batch["tokens"].shape
    assert step_flops(config, batch) == model_flops(config, b, s, s - 8)
    assert step_flops(config, batch) < step_flops(config, batch_of(0.0)) == model_flops(config, b, s)
    trunk_only = replace(config, decoder_layers=0)
    assert model_flops(config, b, s) > model_flops(trunk_only, b, s)


def _tp_step(rank, world):
    from megatron_t2i import mpu
    mpu.initialize_model_parallel(world, 1)
    model = masked_model(tp=2, mlp_conv=True)
    objective = X0MeanSquaredError(LAYOUT)
    batch = objective.prepare(batch_of(0.5, dropout=0.5))
    out = forward(model, batch)
    total, _ = objective.loss(out, batch)
    total.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()
             if n.startswith(("latent_inputs", "head", "transformer.position", "mask_decoder."
                              "mask_token", "mask_decoder.final"))}
    # the grid convolutions are tensor-parallel: each rank holds its channels' gradient
    conv = {n: p.grad.numpy() for n, p in model.named_parameters() if "grid_conv" in n}
    return out.detach().numpy(), total.item(), grads, conv


@pytest.mark.slow
def test_masked_training_at_tp2_equals_tp1():
    one = run_distributed(_tp_step, 1)[0]
    two = run_distributed(_tp_step, 2)
    assert "mask_decoder.mask_token" in one[2]
    assert "transformer.layers.0.mlp.grid_conv.weight" in one[3]
    for rank in range(2):
        torch.testing.assert_close(torch.from_numpy(two[rank][0]), torch.from_numpy(one[0]),
                                   rtol=1e-5, atol=1e-5)
        assert two[rank][1] == pytest.approx(one[1], rel=1e-5)
        for name, grad in one[2].items():
            torch.testing.assert_close(torch.from_numpy(two[rank][2][name]),
                                       torch.from_numpy(grad), rtol=1e-4,
                                       atol=1e-6 * float(np.abs(grad).max()), msg=name)
    for name, grad in one[3].items():
        merged = np.concatenate([two[0][3][name], two[1][3][name]])
        torch.testing.assert_close(torch.from_numpy(merged), torch.from_numpy(grad), rtol=1e-4,
                                   atol=1e-6 * float(np.abs(grad).max()), msg=name)


def test_the_grid_convolution_mixes_each_patch_with_its_neighbours():
    """GridConv against a loop over the cells: patches anywhere in the sequence, some absent."""
    from megatron_t2i.model.layer import GridConv
    g = torch.Generator().manual_seed(0)
    conv = GridConv(5)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(5, 1, 3, 3, generator=g))
        conv.bias.copy_(torch.randn(5, generator=g))
    u = torch.randn(2, 14, 5, generator=g)
    grid = torch.stack([torch.randperm(14, generator=g)[:9] for _ in range(2)])  # 3 x 3 cells
    grid[1, 4] = -1                                                   # row 1: its centre is gone
    out = conv(u, grid)
    expected = u.clone()
    for b in range(2):
        for cell in range(9):
            if grid[b, cell] < 0:
                continue
            r, c = divmod(cell, 3)
            total = conv.bias.detach().clone()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < 3 and 0 <= cc < 3 and grid[b, rr * 3 + cc] >= 0:
                        total += conv.weight[:, 0, dr + 1, dc + 1].detach() * \
                            u[b, grid[b, rr * 3 + cc]]
            expected[b, grid[b, cell]] += total
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_zero_grid_convolution_is_the_model_without_one():
    plain = masked_model()
    with_conv = masked_model(mlp_conv=True)
    with torch.no_grad():
        for name, p in with_conv.named_parameters():
            if "grid_conv" in name:
                p.zero_()
    missing = with_conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("grid_conv" in k for k in missing)
    for ratio in (0.0, 0.5):
        batch = batch_of(ratio)
        assert torch.equal(forward(with_conv, batch), forward(plain, batch))


@pytest.mark.slow
def test_masked_training_then_unmasked_resumes_bitwise(tmp_path, toy_tokenizers):
    """--mask-ratio 0.5 with the last 3 of 8 iterations unmasked, at TP=2, killed at iteration
    6 (in the unmasked fine-tune) and resumed: the same losses and weights."""
    text, image, layout = toy_tokenizers
    data = write_toy_dataset(str(tmp_path / "toy.lmdb"), count=48, layout=layout,
                             image_tokenizer=image)
    flags = BASE + ["--data-path", data, "--train-iters", "8", "--save-interval", "4",
                    "--tasks", "diffusion", "--mask-ratio", "0.5", "--decoder-layers", "1",
                    "--unmask-finetune-iters", "3", "--tensor-model-parallel-size", "2"]
    logged = metrics(resumed_equals_uninterrupted(flags, tmp_path))
    assert all("train/hidden_patch_loss" in logged[i] for i in range(1, 6))
    assert not any("train/hidden_patch_loss" in logged[i] for i in range(6, 9))
    bad = run(BASE + ["--data-path", data, "--save", str(tmp_path / "x"), "--train-iters", "1",
                      "--tasks", "diffusion", "--mask-ratio", "0.5"], check=False)
    assert bad.returncode != 0 and "add --decoder-layers N" in bad.stdout + bad.stderr


def test_a_language_free_denoiser_reads_its_condition():
    from dataclasses import replace
    f = np.random.default_rng(1).standard_normal(12)
    arrays = {"clip_image": f / np.linalg.norm(f)}
    batch = batch_of(0.0, {"clip-diffusion": 1.0}, arrays, slots=2)
    assert batch["condition"].shape == (3, 12) and batch["condition_mask"].all()
    slots = (batch["tokens"] == LAYOUT["[MASK]"]).sum(1)
    assert (slots == 2).all() and ((batch["tokens"] == LAYOUT["[ENC]"]).sum(1) == N).all()
    assert not (batch["tokens"] < LAYOUT.text_offset + LAYOUT.num_text_tokens).logical_and(
        batch["tokens"] >= LAYOUT.text_offset).any()  # no caption token anywhere
    torch.manual_seed(0)
    config = replace(denoiser_config(), condition_dim=12, condition_slots=2,
                     slot_token=LAYOUT["[MASK]"])
    model = GPT(config).eval()
    torch.nn.init.normal_(model.head.proj.weight, std=0.1)
    out = forward(model, batch)
    other = {**batch, "condition": -batch["condition"]}
    assert not torch.equal(forward(model, other), out)
    dropped = {**batch, "condition_mask": torch.zeros(3, dtype=torch.bool)}
    assert torch.equal(forward(model, dropped), forward(model, {**dropped, **{
        "condition": torch.zeros_like(batch["condition"])}}))  # the null embedding


def test_denoiser_options_elsewhere_are_one_line_errors():
    from megatron_t2i.config import model_config
    with pytest.raises(ValueError, match="--decoder-layers"):
        model_config("tiny", LAYOUT, decoder_layers=1)
    with pytest.raises(ValueError, match="--mlp-conv"):
        model_config("tiny", LAYOUT, mlp_conv=True)
    with pytest.raises(ValueError, match=r"--mask-ratio 1.0: must be in \[0, 1\)"):
        SequenceBuilder(LAYOUT, {"diffusion": 1.0}, latent_table=TABLE, mask_ratio=1.0)
