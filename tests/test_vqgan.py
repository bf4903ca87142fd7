"""The VQGAN tokenizer: taming's adaptive weight against its formula, the discriminator's start,
a VQGAN whose discriminator never starts == the VQ-VAE of the same seed, resume after a crash ==
uninterrupted (bitwise, with the perceptual loss), data-parallel over 2 ranks == one process, the
perceptual feature network, and the tokenizer through preprocessing and generation with its kind
checked in one line."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from distributed import run_distributed
from generation_toy import make_checkpoint
from megatron_t2i.tokenizers import train_vqvae as trainer
from megatron_t2i.tokenizers.feature_net import perceptual_distance, train_feature_net
from megatron_t2i.tokenizers.train_vqvae import train_vqvae
from megatron_t2i.tokenizers.vqgan import (GANConfig, PatchDiscriminator, adaptive_weight,
                                           disc_factor, hinge_d_loss)
from megatron_t2i.tokenizers.vqvae import ImageTokenizer, VQVAEConfig
from test_vqvae import shapes_images

torch.set_num_threads(1)
TINY = VQVAEConfig(hidden_channels=8, embed_dim=8, codebook_size=32, downsample=4,
                   num_res_blocks=0, image_size=32, dead_code_steps=3)  # the toy layout's grid
GAN = GANConfig(disc_start=4, disc_channels=8, disc_layers=2)


def states_equal(a: str, b: str) -> bool:
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def train(images, out, gan=GAN, steps=8, **kw):
    return train_vqvae(images, str(out), TINY, steps=steps, batch_size=4, lr=3e-3, seed=3,
                       gan=gan, progress=False, **kw)


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    x = torch.randn(2, 3, 8, 8)
    out = net(x)
    rec, gan = (out - x).pow(2).mean(), -out.sum() * 0.01
    got = adaptive_weight(rec, gan, net[2].weight, 0.8)
    norms = []
    for loss in (rec, gan):  # the reference: each loss's gradient alone, through .backward()
        net.zero_grad()
        loss.backward(retain_graph=True)
        norms.append(net[2].weight.grad.norm())
    assert torch.allclose(got, 0.8 * norms[0] / (norms[1] + 1e-4))
    assert not got.requires_grad
    # clamped at 1e4 when the GAN gradient vanishes
    assert adaptive_weight(100 * rec, 0.0 * out.sum(), net[2].weight, 1.0).item() == 1e4


def test_hinge_losses_and_the_discriminators_patch_map():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert [disc_factor(s, 4) for s in (1, 4, 5)] == [0.0, 0.0, 1.0]
    d = PatchDiscriminator(GANConfig(disc_channels=8, disc_layers=2))
    logits = d(torch.randn(3, 3, 32, 32))
    assert logits.shape[:2] == (3, 1) and logits.shape[-1] > 1  # a map of patches
    # GroupNorm: an image's logits do not depend on the rest of its batch
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(d(x)[:1], d(x[:1]), atol=1e-6)


def test_discriminator_starts_at_its_step(tmp_path, monkeypatch):
    calls, step_calls = [], {}
    forward = PatchDiscriminator.forward
    monkeypatch.setattr(PatchDiscriminator, "forward",
                        lambda self, x: calls.append(1) or forward(self, x))
    step = trainer._Trainer.step

    def counted(self, tokenizer, batch, s):
        before = len(calls)
        out = step(self, tokenizer, batch, s)
        step_calls[s] = len(calls) - before
        return out
    monkeypatch.setattr(trainer._Trainer, "step", counted)
    train(shapes_images(12, 32), tmp_path / "g.pt", steps=7)
    # none before the start; from it: D(x') for the generator, D(x) and D(x') for itself
    assert step_calls == {1: 0, 2: 0, 3: 0, 4: 0, 5: 3, 6: 3, 7: 3}


def test_a_vqgan_whose_discriminator_never_starts_is_the_vqvae(tmp_path):
    images = shapes_images(12, 32)
    vqvae = train(images, tmp_path / "vqvae.pt", gan=None)
    never = train(images, tmp_path / "never.pt", gan=GANConfig(disc_start=8, disc_channels=8,
                                                               disc_layers=2))
    started = train(images, tmp_path / "started.pt")
    assert vqvae["kind"] == "vqvae" and never["kind"] == started["kind"] == "vqgan"
    assert states_equal(tmp_path / "vqvae.pt", tmp_path / "never.pt")
    assert not states_equal(tmp_path / "vqvae.pt", tmp_path / "started.pt")
    saved = torch.load(tmp_path / "started.pt", weights_only=True)
    assert saved["config"]["kind"] == "vqgan" and saved["training"]["gan"]["disc_start"] == 4
    assert ImageTokenizer.load(str(tmp_path / "started.pt")).kind == "vqgan"


def test_resume_after_a_crash_is_bitwise(tmp_path, monkeypatch):
    images = shapes_images(12, 32)
    gan = GANConfig(disc_start=3, disc_channels=8, disc_layers=2, perceptual_weight=0.5,
                    feature_steps=5)
    train(images, tmp_path / "whole.pt", gan=gan, steps=10, save_every=4)
    step = trainer._Trainer.step

    def crash_at_7(self, tokenizer, batch, s):
        if s == 7:
            raise KeyboardInterrupt
        return step(self, tokenizer, batch, s)
    monkeypatch.setattr(trainer._Trainer, "step", crash_at_7)
    out = tmp_path / "resumed.pt"
    with pytest.raises(KeyboardInterrupt):
        train(images, out, gan=gan, steps=10, save_every=4)
    assert os.path.isfile(f"{out}.resume.pt") and not os.path.exists(out)
    monkeypatch.setattr(trainer._Trainer, "step", step)
    with pytest.raises(ValueError, match=r"resume.pt: the interrupted run had other settings \(lr\)"):
        train_vqvae(images, str(out), TINY, steps=10, batch_size=4, lr=1e-3, seed=3, gan=gan,
                    progress=False, save_every=4)
    m = train(images, out, gan=gan, steps=10, save_every=4)
    assert m["resumed_from"] == 4 and not os.path.exists(f"{out}.resume.pt")
    assert states_equal(tmp_path / "whole.pt", out)


def _train_on_ranks(rank, world_size, out, images):
    train(images, out, steps=8)
    return rank


def test_two_data_parallel_ranks_train_like_one_process(tmp_path):
    images = shapes_images(12, 32)
    train(images, tmp_path / "one.pt", steps=8)
    run_distributed(_train_on_ranks, 2, str(tmp_path / "two.pt"), images)
    a, b = (torch.load(tmp_path / p, weights_only=True)["state_dict"] for p in ("one.pt", "two.pt"))
    for key in a:  # the same global batches; only the order of float sums differs
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_perceptual_feature_network_learns_rotations_and_measures_blur():
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1)
                          for im in shapes_images(64, 32, seed=1)])
    net, accuracy = train_feature_net(images, steps=150, batch_size=16, seed=0, progress=False)
    # chance: 0.25 (a rectangle or an ellipse turned by 180 degrees looks the same)
    assert accuracy > 0.35
    x = images[:8].float() / 255
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert perceptual_distance(net, x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert perceptual_distance(net, x, blurred) < perceptual_distance(net, x, x.flip(-1).flip(-2))


# ---- through preprocessing and generation ----------------------------------------------------------
def test_vqgan_through_preprocessing_and_generation(tmp_path, toy_tokenizers, capsys):
    import generate_samples
    from megatron_t2i.cli.preprocess import main as preprocess_main
    from megatron_t2i.data.lmdb_store import TokenDataset

    text_path, vqvae_path, layout = toy_tokenizers
    images = shapes_images(12, 32)
    vqgan_path = str(tmp_path / "vqgan.pt")
    train(images, vqgan_path)
    vqgan = ImageTokenizer.load(vqgan_path)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, im in enumerate(images[:3]):
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle", encoding="utf-8")
    base = ["--input", str(folder), "--text-tokenizer", text_path, "--image-tokenizer", vqgan_path,
            "--image-size", "32", "--workers", "1", "--max-text-tokens", "8"]
    with pytest.raises(SystemExit, match=r"vqgan.pt: a vqgan image tokenizer, but "
                                         r"--image-tokenizer-kind asks for vqvae"):
        preprocess_main(base + ["--output", str(tmp_path / "no"), "--image-tokenizer-kind", "vqvae"])
    preprocess_main(base + ["--output", str(tmp_path / "tokens"), "--image-tokenizer-kind", "vqgan"])
    ds = TokenDataset(str(tmp_path / "tokens"))
    for i in range(len(ds)):
        want = vqgan.encode_images([images[int(ds[i].key.split(".")[0])]])[0]
        assert ds[i].image_codes.tolist() == want.tolist()

    # a model trained on its codes samples with it, and refuses a tokenizer of the other kind
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), (text_path, vqgan_path, layout))
    queries = tmp_path / "q.txt"
    queries.write_text("a red circle\n", encoding="utf-8")
    common = ["--load", ckpt, "--input-source", str(queries), "--batch-size", "2", "--top-k", "10"]
    assert generate_samples.main(common + ["--output-path", str(tmp_path / "out"),
                                           "--image-tokenizer-kind", "vqgan"]) == 0
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2
    for flags, message in (
            (["--image-tokenizer-kind", "vqvae"], "a vqgan image tokenizer, but "
                                                  "--image-tokenizer-kind asks for vqvae"),
            (["--image-tokenizer", vqvae_path], "a vqvae image tokenizer, the checkpoint was "
                                                "trained on the codes of a vqgan")):
        capsys.readouterr()
        assert generate_samples.main(common + ["--output-path", str(tmp_path / "no")] + flags) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_the_comparison_tool_scores_every_tokenizer_on_held_out_photos(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import compare_tokenizers as tool
    train = tool.photo_crops(6, 64, held_out=False, seed=0)
    held = tool.photo_crops(6, 64, held_out=True, seed=0)
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in train + held)
    train_pixels = {tool.as_uint8([im]).numpy().tobytes() for im in train}
    assert not any(tool.as_uint8([im]).numpy().tobytes() in train_pixels for im in held)
    out = tmp_path / "cmp"
    assert tool.main(["--data", "photos", "--out", str(out), "--steps", "3", "--train-crops", "16",
                      "--eval-crops", "8", "--batch-size", "4", "--feature-steps", "2"]) == 0
    report = __import__("json").loads((out / "report.json").read_text())
    assert sorted(report["tokenizers"]) == ["vqgan-f16", "vqgan-f8", "vqvae-f16", "vqvae-f8"]
    for figures in report["tokenizers"].values():
        assert 0 < figures["psnr"] < 60 and figures["fid"] >= 0 and figures["images"] == 8
    assert ImageTokenizer.load(str(out / "vqgan-f16.pt")).kind == "vqgan"
    from PIL import Image
    with Image.open(out / "reconstructions.png") as grid:  # originals + 4 rows, 2x larger
        assert grid.size == (8 * 64 * 2, 5 * 64 * 2)


def test_cli_flags_of_the_wrong_kind_are_one_line(tmp_path, capsys):
    from megatron_t2i.cli.train_vqvae import main
    folder = tmp_path / "in"
    folder.mkdir()
    for i, im in enumerate(shapes_images(4, 32)):
        im.save(folder / f"{i}.png")
    base = ["--input", str(folder), "--image-tokenizer", str(tmp_path / "t.pt"), "--image-size",
            "32", "--vqvae-steps", "2"]
    assert main(base + ["--vqgan-perceptual-weight", "1"]) == 1
    err = capsys.readouterr().err
    assert "--vqgan-perceptual-weight: settings of a VQGAN; add --image-tokenizer-kind vqgan" in err
    assert main(base + ["--image-tokenizer-kind", "vqgan", "--vqgan-disc-start", "-1"]) == 1
    assert "--vqgan-disc-start must be >= 0" in capsys.readouterr().err
    assert main(base + ["--image-tokenizer-kind", "vqgan", "--vqgan-disc-channels", "8",
                        "--vqgan-disc-layers", "1"]) == 0
    assert ImageTokenizer.load(str(tmp_path / "t.pt")).kind == "vqgan"


def test_an_edited_kind_in_a_tokenizer_file_names_the_file(tmp_path):
    path = tmp_path / "t.pt"
    train(shapes_images(12, 32), path, steps=2)
    raw = torch.load(path, weights_only=True)
    raw["config"]["kind"] = "dalle"
    torch.save(raw, path)
    with pytest.raises(ValueError, match=r"t.pt config: vqvae config: kind must be one of vqvae, "
                                         r"vqgan, got 'dalle'"):
        ImageTokenizer.load(str(path))
