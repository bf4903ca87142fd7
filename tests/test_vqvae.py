"""The image tokenizer: shapes, EMA codebook, training, checkpoints and the CogView import."""
import hashlib
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from megatron_t2i.cli.train_vqvae import main as train_main
from megatron_t2i.tokenizers.train_vqvae import train_vqvae
from megatron_t2i.tokenizers.vqvae import VQVAE, EMACodebook, ImageTokenizer, VQVAEConfig

torch.set_num_threads(1)  # tiny models: a second thread only adds contention

# a fast EMA (decay 0.9) suits runs of a few hundred steps
TINY = dict(hidden_channels=16, embed_dim=8, codebook_size=128, downsample=4, num_res_blocks=1,
            image_size=16, decay=0.9, dead_code_steps=10)
COGVIEW_MEAN = (0.79093, 0.76271, 0.75340)
COGVIEW_STD = (0.30379, 0.32279, 0.32800)


def shapes_images(n, size, seed=0):
    """Flat-coloured rectangles and circles on plain backgrounds, drawn independently of the
    project's synthetic data."""
    rng = random.Random(seed)
    colours = [(230, 25, 25), (20, 170, 40), (30, 60, 230), (250, 220, 20), (0, 0, 0), (255, 255, 255)]
    images = []
    for _ in range(n):
        bg, fg = rng.sample(colours, 2)
        im = Image.new("RGB", (size, size), bg)
        x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
        box = (x0, y0, x0 + rng.randint(size // 4, size // 2), y0 + rng.randint(size // 4, size // 2))
        (ImageDraw.Draw(im).rectangle if rng.random() < 0.5 else ImageDraw.Draw(im).ellipse)(box, fill=fg)
        images.append(im)
    return images


def mse_through(tokenizer, images):
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
    recon = tokenizer.decode_to_tensor(tokenizer.encode_images(images))
    return (recon - pixels).pow(2).mean().item()


# ---- model shapes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("downsample,upsample", [(4, "transposed"), (8, "transposed"),
                                                 (16, "transposed"), (16, "nearest")])
def test_shapes_and_round_trip(downsample, upsample):
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**{**TINY, "downsample": downsample, "image_size": 32,
                                 "upsample": upsample})).eval()
    x = torch.randn(2, 3, 32, 32)
    g = 32 // downsample
    assert model.grid_size(32) == g
    codes = model.encode(x)
    assert codes.shape == (2, g, g) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 128
    recon, losses, fwd_codes = model(x)
    assert recon.shape == x.shape and torch.equal(fwd_codes, codes)
    assert set(losses) >= {"loss", "recon", "commitment", "usage", "perplexity"}
    out = model.decode(codes)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, model.decode(codes.flatten(1)))  # [B, h*w] is the same grid
    assert torch.allclose(out, recon, atol=1e-5)  # straight-through: forward value is the code's
    with pytest.raises(ValueError, match="out of range"):
        model.decode(torch.full((1, g, g), 128))
    with pytest.raises(ValueError, match="multiple of"):
        model.grid_size(30)


@pytest.mark.parametrize("encoder", ["patch", "conv"])
def test_patch_encoder_codes_depend_on_their_own_patch_only(encoder):
    """encoder="patch": changing pixels outside a patch never changes its code (a plain
    background patch is one code wherever the shapes are); the conv encoder sees its
    neighbours, so the same change reaches the codes beside it."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**{**TINY, "image_size": 32, "encoder": encoder})).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        z = model.enc_b(x)                                    # [1, D, 8, 8]
        y = x.clone()
        y[:, :, 12:16, 12:16] += 3.0                           # one patch: code (3, 3)
        changed = (model.enc_b(y) - z).abs().amax(dim=1)[0] > 0  # [8, 8]
    if encoder == "patch":
        assert changed.nonzero().tolist() == [[3, 3]]
    else:
        assert changed[3, 3] and changed.sum() > 1


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="encoder must be conv or patch"):
        VQVAEConfig(encoder="resnet")
    with pytest.raises(ValueError, match="downsample must be a power of two"):
        VQVAEConfig(downsample=6)
    with pytest.raises(ValueError, match="mean needs 3 values"):
        VQVAEConfig(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="upsample must be transposed or nearest"):
        VQVAEConfig(upsample="bilinear")
    with pytest.raises(ValueError, match="kind must be one of vqvae, vqgan"):
        VQVAEConfig(kind="dalle")


# ---- EMA codebook --------------------------------------------------------------------------------
def test_ema_update_matches_hand_computation():
    c = VQVAEConfig(embed_dim=2, codebook_size=3, decay=0.9, eps=1e-5, dead_code_steps=0)
    book = EMACodebook(c).train()
    book.embed.copy_(torch.tensor([[0.0, 10.0, -10.0], [0.0, 0.0, 0.0]]))
    book.embed_avg.copy_(book.embed)
    book.cluster_size.copy_(torch.tensor([1.0, 1.0, 0.0]))
    z = torch.tensor([[[[1.0, 1.0], [9.0, -1.0], [0.0, -1.0]]]])  # [1, 1, 3, 2]: codes 0, 1, 0
    zq, commitment, codes = book(z)
    assert codes.tolist() == [[[0, 1, 0]]]
    old = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 0.0]])  # looked up before the update
    assert torch.allclose(zq, old[[0, 1, 0]].view(1, 1, 3, 2))
    assert math.isclose(commitment.item(), (1 + 1 + 1 + 1 + 0 + 1) / 6, rel_tol=1e-6)
    size = 0.9 * torch.tensor([1.0, 1.0, 0.0]) + 0.1 * torch.tensor([2.0, 1.0, 0.0])
    avg = 0.9 * torch.tensor([[0.0, 10.0, -10.0], [0.0, 0.0, 0.0]]) \
        + 0.1 * torch.tensor([[1.0, 9.0, 0.0], [0.0, -1.0, 0.0]])
    n = size.sum()
    smoothed = (size + 1e-5) / (n + 3e-5) * n
    assert torch.allclose(book.cluster_size, size)
    assert torch.allclose(book.embed_avg, avg)
    assert torch.allclose(book.embed, avg / smoothed)


def test_dead_codes_are_reseeded_from_the_batch():
    torch.manual_seed(0)
    c = VQVAEConfig(embed_dim=4, codebook_size=16, dead_code_steps=3)
    book = EMACodebook(c).train()
    book.embed.copy_(torch.randn(4, 16) + 100)  # all codes far away but code 0, which wins everything
    book.embed[:, 0] = 0
    book.embed_avg.copy_(book.embed)
    book.idle_steps.zero_()  # as if trained: all codes alive (a fresh codebook starts all dead)
    z = torch.randn(1, 8, 8, 4)
    flat = z.reshape(-1, 4)
    for _ in range(2):
        _, _, codes = book(z)
    restarted = list(range(1, 16))
    assert (codes == 0).all() and (book.embed[:, restarted] > 50).all()  # none restarted yet
    _, _, codes = book(z)  # third idle step: the 15 losers restart
    for k in restarted:  # each restarted code is exactly one of this batch's encoder outputs
        assert ((flat - book.embed[:, k]).abs().sum(1) < 1e-6).any()
        assert book.cluster_size[k] == 1.0 and book.idle_steps[k] == 0
    assert book.nearest(flat).unique().numel() > 8  # the batch now spreads over the codebook


def test_restart_raises_code_usage_in_training():
    images = shapes_images(32, 16)
    usage = {}
    for steps in (0, 5):
        cfg = VQVAEConfig(**{**TINY, "codebook_size": 64, "dead_code_steps": steps})
        torch.manual_seed(0)  # same initial weights for both runs
        tok = ImageTokenizer(VQVAE(cfg))
        tok.model.quantize_t.embed.mul_(5)  # a codebook far from the encoder's outputs
        tok.model.quantize_t.embed_avg.copy_(tok.model.quantize_t.embed)
        opt = torch.optim.AdamW(tok.model.parameters(), lr=2e-3)
        x = torch.stack([tok.prepare(im) for im in images])
        tok.model.train()
        for _ in range(30):
            _, losses, _ = tok.model(x)
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
        codes = tok.encode_images(x)
        usage[steps] = codes.unique().numel()
    assert usage[5] >= 3 * usage[0], usage


# ---- training, checkpoints -----------------------------------------------------------------------
def test_training_lowers_error_and_checkpoint_round_trip(tmp_path):
    images = shapes_images(10, 16)  # 9 to train on, 1 held out
    cfg = VQVAEConfig(**TINY)
    torch.manual_seed(5)
    initial = ImageTokenizer(VQVAE(cfg))  # the weights train_vqvae starts from (same seed)
    out = str(tmp_path / "vq.pt")
    tb = str(tmp_path / "tb")
    m = train_vqvae(images, out, cfg, steps=150, batch_size=16, lr=1e-2, seed=5,
                    tensorboard_dir=tb, progress=False, log_every=20)
    tok = ImageTokenizer.load(out)
    before, after = mse_through(initial, images), mse_through(tok, images)
    assert after < before / 4, (before, after)  # more than 6 dB better
    assert m["train_psnr"] > 10 * math.log10(1 / before) + 5
    assert 0 < m["usage"] <= 1 and 1 <= m["perplexity"] <= 128 and m["steps"] == 150
    assert m["sha256"] == tok.sha256 == hashlib.sha256(open(out, "rb").read()).hexdigest()

    # the file is a plain dict readable by weights_only; no temporary file is left behind
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == "megatron_t2i.vqvae/1" and raw["config"]["codebook_size"] == 128
    assert sorted(os.listdir(tmp_path)) == ["tb", "vq.pt"]
    codes = tok.encode_images(images)
    again = ImageTokenizer.load(out)
    assert torch.equal(again.encode_images(images), codes)
    assert torch.equal(again.decode_to_tensor(codes), tok.decode_to_tensor(codes))
    copy = str(tmp_path / "copy.pt")
    tok.save(copy)
    assert torch.equal(ImageTokenizer.load(copy).encode_images(images), codes)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(tb)
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"vqvae/recon_loss", "vqvae/psnr", "vqvae/code_usage", "vqvae/codebook_perplexity"} <= tags


def test_training_is_deterministic_given_the_seed(tmp_path):
    images = shapes_images(12, 16)
    for name in ("a.pt", "b.pt"):
        train_vqvae(images, str(tmp_path / name), VQVAEConfig(**TINY), steps=4, batch_size=4,
                    seed=3, progress=False)
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_decode_codes_and_prepare():
    tok = ImageTokenizer(VQVAE(VQVAEConfig(**{**TINY, "image_size": 32, "mean": (0.2, 0.4, 0.6),
                                                 "std": (0.5, 0.25, 0.125)})))
    # 128x64 RGBA, left half red, right half blue: short side 64 -> 32, so 64x32, crop x in [16, 48)
    im = Image.new("RGBA", (128, 64), (0, 0, 255, 255))
    ImageDraw.Draw(im).rectangle((0, 0, 63, 63), fill=(255, 0, 0, 255))
    x = tok.prepare(im)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor([0.2, 0.4, 0.6])) / torch.tensor([0.5, 0.25, 0.125])
    blue = (torch.tensor([0, 0, 1.0]) - torch.tensor([0.2, 0.4, 0.6])) / torch.tensor([0.5, 0.25, 0.125])
    assert torch.allclose(x[:, 10, 2], red, atol=1e-4) and torch.allclose(x[:, 10, 29], blue, atol=1e-4)
    codes = tok.encode_images([im, im.convert("L")], batch_size=1)
    assert codes.shape == (2, 64)
    pics = tok.decode_codes(codes)
    assert [p.size for p in pics] == [(32, 32)] * 2 and pics[0].mode == "RGB"
    t = tok.decode_to_tensor(codes)
    assert t.min() >= 0 and t.max() <= 1
    assert np.array_equal(np.array(pics[0]), (t[0] * 255).round().byte().permute(1, 2, 0).numpy())


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageTokenizer.load(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: not a readable torch file"):
        ImageTokenizer.load(str(bad))
    torch.save({"enc_b.blocks.0.weight": torch.zeros(1)}, tmp_path / "raw.pt")
    with pytest.raises(ValueError, match="from_cogview"):
        ImageTokenizer.load(str(tmp_path / "raw.pt"))


def test_cli(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(shapes_images(6, 24)):  # resized to 16 by the CLI
        im.save(folder / f"{i}.png")
    out = tmp_path / "tok.pt"
    rc = train_main(["--input", str(folder), "--image-tokenizer", str(out), "--image-size", "16",
                     "--vqvae-steps", "3", "--vqvae-batch-size", "4", "--vqvae-channels", "8",
                     "--vqvae-embed-dim", "4", "--vqvae-codebook-size", "16",
                     "--vqvae-res-blocks", "0", "--vqvae-downsample", "4"])
    assert rc == 0 and out.exists()
    assert "PSNR" in capsys.readouterr().out
    tok = ImageTokenizer.load(str(out))
    assert (tok.image_size, tok.grid, tok.codebook_size) == (16, 4, 16)
    rc = train_main(["--input", str(tmp_path / "nope"), "--image-tokenizer", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "nope" in err and len(err.splitlines()) == 1


# ---- CogView's released tokenizer ------------------------------------------------------------------
def cogview_state_dict():
    """Random weights in exactly the released file's keys and shapes."""
    g = torch.Generator().manual_seed(0)

    def w(*shape, fan_in):
        return torch.randn(*shape, generator=g) * math.sqrt(2 / fan_in)

    sd = {}
    for i, (cin, cout) in enumerate([(3, 512), (512, 512), (512, 512)]):
        sd[f"enc_b.blocks.{2 * i}.weight"] = w(cout, cin, 4, 4, fan_in=cin * 16)
        sd[f"enc_b.blocks.{2 * i}.bias"] = w(cout, fan_in=100)
    sd["enc_b.blocks.6.weight"] = w(256, 512, 1, 1, fan_in=512)
    sd["enc_b.blocks.6.bias"] = w(256, fan_in=100)
    embed = w(256, 8192, fan_in=256)  # on the scale of the encoder's outputs: many codes in play
    sd.update({"quantize_t.embed": embed, "quantize_t.cluster_size": torch.rand(8192, generator=g),
               "quantize_t.embed_avg": embed.clone()})
    for i, (cin, cout) in enumerate([(256, 512), (512, 512), (512, 512)]):
        sd[f"dec.blocks.{2 * i}.weight"] = w(cin, cout, 4, 4, fan_in=cin * 4)  # transposed: [in, out]
        sd[f"dec.blocks.{2 * i}.bias"] = w(cout, fan_in=100)
    sd["dec.blocks.6.weight"] = w(3, 512, 1, 1, fan_in=512)
    sd["dec.blocks.6.bias"] = w(3, fan_in=100)
    return sd


def test_cogview_import(tmp_path):
    sd = cogview_state_dict()
    plain, wrapped = str(tmp_path / "plain.pt"), str(tmp_path / "wrapped.pt")
    torch.save(sd, plain)  # raw state dict, no prefix
    torch.save({"module": {"module." + k: v.half() for k, v in sd.items()}}, wrapped)  # DataParallel, fp16

    tok = ImageTokenizer.from_cogview(plain)
    assert (tok.image_size, tok.grid, tok.codebook_size) == (256, 32, 8192)
    assert tok.config.mean == COGVIEW_MEAN and tok.config.std == COGVIEW_STD
    assert tok.sha256 == hashlib.sha256(open(plain, "rb").read()).hexdigest()

    # a 320x256 picture: resized to 256 short side (no-op), centre crop removes 32 px each side
    rng = np.random.default_rng(0)
    arr = (rng.random((256, 320, 3)) * 255).astype(np.uint8)
    arr[64:192, 100:220] = (200, 30, 40)
    codes = tok.encode_images([Image.fromarray(arr)])
    assert codes.shape == (1, 1024)

    # reference: the same convs written out by hand
    x = torch.from_numpy(arr[:, 32:288]).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor(COGVIEW_MEAN).view(1, 3, 1, 1)) / torch.tensor(COGVIEW_STD).view(1, 3, 1, 1)
    h = x
    for i in (0, 2, 4):
        h = F.relu(F.conv2d(h, sd[f"enc_b.blocks.{i}.weight"], sd[f"enc_b.blocks.{i}.bias"], stride=2, padding=1))
    z = F.conv2d(h, sd["enc_b.blocks.6.weight"], sd["enc_b.blocks.6.bias"])  # [1, 256, 32, 32]
    assert z.shape == (1, 256, 32, 32)
    flat = z[0].permute(1, 2, 0).reshape(-1, 256).double()
    dist = torch.cdist(flat, sd["quantize_t.embed"].t().double())  # [1024, 8192]
    ref = dist.argmin(1)
    assert ref.unique().numel() > 50  # the check below is not satisfied by a constant code
    same = codes[0] == ref
    # any disagreement must be a floating-point tie between two equally near codes
    gap = dist[torch.arange(1024), codes[0]] - dist[torch.arange(1024), ref]
    assert same.float().mean() > 0.99 and (gap[~same] < 1e-4 * dist.min(1).values[~same]).all()

    # decoder on a 4x4 grid, against transposed convs written out by hand
    small = ref[:16].view(1, 4, 4)
    h = sd["quantize_t.embed"].t()[small].permute(0, 3, 1, 2)
    for i in (0, 2, 4):
        h = F.relu(F.conv_transpose2d(h, sd[f"dec.blocks.{i}.weight"], sd[f"dec.blocks.{i}.bias"],
                                      stride=2, padding=1))
    want = F.conv2d(h, sd["dec.blocks.6.weight"], sd["dec.blocks.6.bias"])
    got = tok.model.decode(small)
    assert got.shape == (1, 3, 32, 32) and torch.allclose(got, want, atol=1e-4, rtol=1e-4)

    # the wrapped, prefixed fp16 file holds the same (rounded) weights
    tok16 = ImageTokenizer.from_cogview(wrapped)
    loaded = tok16.model.state_dict()
    assert all(torch.equal(loaded[k], v.half().float()) for k, v in sd.items())


def test_cogview_import_errors(tmp_path):
    good = torch.zeros(512, 3, 4, 4)
    full = {f"module.{k}": v for k, v in VQVAE(VQVAEConfig.cogview()).state_dict().items()}
    cases = [({**full, "module.enc_b.blocks.0.weight": torch.zeros(512, 3, 3, 3)},
              r"enc_b.blocks.0.weight has shape \[512, 3, 3, 3\], expected \[512, 3, 4, 4\]"),
             ({"state_dict": {"enc_b.blocks.0.weight": good}}, "missing key enc_b.blocks.0.bias"),
             ({"encoder.conv.weight": good}, "missing key enc_b.blocks.0.weight"),
             ([1, 2], "expected a state dict")]
    for i, (content, message) in enumerate(cases):
        path = str(tmp_path / f"case{i}.pt")
        torch.save(content, path)
        with pytest.raises(ValueError, match=message):
            ImageTokenizer.from_cogview(path)
    # every expected key present plus one more
    sd = {k: v.half() for k, v in VQVAE(VQVAEConfig.cogview()).state_dict().items()}
    sd["enc_b.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected key enc_b.extra"):
        ImageTokenizer.from_cogview(str(tmp_path / "extra.pt"))


def test_l2_codes_live_on_the_unit_sphere_and_pick_the_most_similar_direction(tmp_path):
    cfg = VQVAEConfig(**{**TINY, "embed_dim": 4, "l2_codes": True})
    images = shapes_images(12, 16)
    m = train_vqvae(images, str(tmp_path / "l2.pt"), cfg, steps=30, batch_size=4, lr=1e-2, seed=1,
                    progress=False)
    tok = ImageTokenizer.load(str(tmp_path / "l2.pt"))
    embed = tok.model.quantize_t.embed                                     # [D, K]
    torch.testing.assert_close(embed.norm(dim=0), torch.ones(embed.shape[1]))
    x = torch.stack([tok.prepare(im) for im in images])
    with torch.no_grad():
        z = F.normalize(tok.model.enc_b(x).permute(0, 2, 3, 1), dim=-1)   # [B, h, w, D]
    assert torch.equal(tok.model.encode(x), (z @ embed).argmax(-1))       # max cosine
    assert m["usage"] > 0 and tok.config.l2_codes
