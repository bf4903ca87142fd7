"""super-resolution: the 9 windows cover the 2g x 2g output exactly as designed; decoding around
given tokens (teacher forcing) against generate and a full forward; low-resolution codes and
earlier windows kept; per-sample seeds; the CLI end to end; and its training data (record
format, preprocess --sr-low-res, SequenceBuilder task sr, a clear error without low codes)."""
import os
import struct
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import generate_samples
from distributed import run_distributed
from generation_toy import VQ, make_checkpoint
from megatron_t2i import mpu
from megatron_t2i.arguments import parse_args
from megatron_t2i.config import model_config
from megatron_t2i.data import preprocess as prep
from megatron_t2i.data.lmdb_store import TokenDataset, decode_record, encode_record, write_token_dataset
from megatron_t2i.data.loader import SequenceBuilder, collate
from megatron_t2i.generation.batching import sample_seed
from megatron_t2i.generation.loading import load_model, load_tokenizers
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.generation.state import Decoding, Prompt
from megatron_t2i.generation.strategies.fill import fill
from megatron_t2i.generation.strategies.raster import generate
from megatron_t2i.generation.tasks import super_resolution as sr
from megatron_t2i.generation.vocab import image_vocab_mask
from megatron_t2i.model.gpt import GPT
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.tokenizers.vqvae import ImageTokenizer

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = TokenLayout(num_image_codes=32, num_text_tokens=40, image_grid=8, max_text_tokens=6)
CONFIG = model_config("tiny", LAYOUT, tasks=["super-resolution"], hidden_dropout=0.0,
                      attention_dropout=0.0)
IMAGE = image_vocab_mask(LAYOUT, CONFIG.vocab_size)
SAMPLING = SamplingConfig(temperature=1.02, top_k=10)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---- windows -----------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [8, 16, 32])
def test_windows_cover_every_output_code_once_as_designed(grid):
    windows = sr.windows(grid)
    assert len(windows) == 9
    h, q = grid // 2, grid // 4
    done = np.zeros((2 * grid, 2 * grid), dtype=int)  # times each output code was sampled
    # which part of each window is new: all, right half x2, bottom half, quarter x2, ... (raster)
    new_part = ["all", "right", "right", "bottom", "quarter", "quarter", "bottom", "quarter",
                "quarter"]
    for n, w in enumerate(windows):
        i, j = divmod(n, 3)
        assert (w.low[0].start, w.low[0].stop, w.low[1].start, w.low[1].stop) == \
            (i * q, i * q + h, j * q, j * q + h)                       # (g/2)^2 input codes
        assert (w.high[0].start, w.high[0].stop, w.high[1].start, w.high[1].stop) == \
            (2 * i * q, 2 * i * q + grid, 2 * j * q, 2 * j * q + grid)  # the same area, twice the side
        fresh = done[w.high] == 0  # not sampled by an earlier window
        expected = np.zeros((grid, grid), dtype=bool)
        rows, cols = {"all": (slice(None), slice(None)), "right": (slice(None), slice(h, None)),
                      "bottom": (slice(h, None), slice(None)),
                      "quarter": (slice(h, None), slice(h, None))}[new_part[n]]
        expected[rows, cols] = True
        assert np.array_equal(fresh, expected), (grid, n)
        done[w.high] += fresh
    assert (done == 1).all()  # every output code sampled exactly once
    with pytest.raises(ValueError, match="divisible by 4"):
        sr.windows(6)


# ---- decoding around given tokens --------------------------------------------------------------

def sr_prompt(low_window, text=(1, 2, 3), batch=2):
    return Prompt.of(LAYOUT.super_resolution(list(text), low_window), batch, "cpu")


def test_fill_with_nothing_given_equals_generate(model):
    prompt = sr_prompt(torch.arange(16) % 32)
    n = LAYOUT.image_tokens
    for cache in (True, False):
        decoding = Decoding(SAMPLING, use_cache=cache, vocab_size=LAYOUT.vocab_size)
        got = fill(model, prompt, torch.full((2, n), -1), decoding, IMAGE, gens([4, 5]))
        want = generate(model, prompt, n, decoding, IMAGE, gens([4, 5]))
        assert torch.equal(got, want)


def test_fill_keeps_given_tokens_and_feeds_them_to_the_model(model):
    p = sr_prompt(torch.arange(16) % 32)
    prompt, pos = p.tokens, p.positions
    n = LAYOUT.image_tokens
    given = torch.full((2, n), -1)
    known = torch.zeros(n, dtype=torch.bool)
    known[:20] = True
    known[30:34] = True
    known[50:60] = True
    given[:, known] = torch.randint(0, 32, (2, int(known.sum())))
    greedy = Decoding(SamplingConfig(top_k=1), vocab_size=LAYOUT.vocab_size)
    out = fill(model, p, given, greedy, IMAGE, gens([1, 2]))
    assert torch.equal(out[:, known], given[:, known]) and (out >= 0).all() and (out < 32).all()
    assert torch.equal(out, fill(model, p, given, Decoding(SamplingConfig(top_k=1), use_cache=False,
                                                        vocab_size=LAYOUT.vocab_size),
                                 IMAGE, gens([1, 2])))
    # reference: one teacher-forced forward over prompt + output; every sampled token is the
    # argmax of the image logits that predicted it
    full = torch.cat([prompt, out], 1)
    positions = torch.cat([pos, pos[:, -1:] + torch.arange(1, n + 1)], 1)
    with torch.no_grad():
        logits = model(full[:, :-1], positions[:, :-1]).float()[:, prompt.shape[1] - 1:]
    best = logits[..., :LAYOUT.vocab_size].masked_fill(~IMAGE[:LAYOUT.vocab_size], -1e30).argmax(-1)
    assert torch.equal(out[:, ~known], best[:, ~known])
    with pytest.raises(ValueError, match="same in every row"):
        given[1, 0] = -1
        fill(model, p, given)


def test_super_resolution_keeps_low_codes_and_earlier_windows(model, monkeypatch):
    calls = []
    original = sr.fill

    def recording_fill(model, prompt, given, *args):
        out = original(model, prompt, given, *args)
        calls.append((prompt.tokens.clone(), given.clone(), out.clone()))
        return out

    monkeypatch.setattr(sr, "fill", recording_fill)
    g = LAYOUT.image_grid
    low = torch.randint(0, 32, (g * g,), generator=torch.Generator().manual_seed(3))
    high = sr.super_resolve(model, LAYOUT, [4, 5], low, Decoding(SAMPLING), gens([7, 8, 9]))
    assert high.shape == (3, 4 * g * g) and high.min() >= 0 and high.max() < 32
    grid = high.view(3, 2 * g, 2 * g)
    done = torch.zeros(2 * g, 2 * g, dtype=torch.bool)
    assert len(calls) == 9
    for w, (prompt, given, out) in zip(sr.windows(g), calls):
        template = LAYOUT.super_resolution([4, 5], low.view(g, g)[w.low])
        assert torch.equal(prompt, template.tokens.expand(3, -1))     # the input's codes, as given
        assert torch.equal(given >= 0, done[w.high].reshape(-1).expand(3, -1))
        assert torch.equal(out, grid[:, w.high[0], w.high[1]].reshape(3, -1))  # kept until the end
        done[w.high] = True
    # a sample depends only on its own seed, not on the batch it ran in
    alone = sr.super_resolve(model, LAYOUT, [4, 5], low, Decoding(SAMPLING), gens([8]))
    assert torch.equal(alone[0], high[1])


def test_a_model_without_the_positions_is_refused():
    small = GPT(model_config("tiny", LAYOUT, max_position_embeddings=40, hidden_dropout=0.0,
                             attention_dropout=0.0)).eval()
    with pytest.raises(ValueError, match="fine-tuned with pretrain.py --tasks super-resolution"):
        sr.super_resolve(small, LAYOUT, [1], torch.zeros(64, dtype=torch.long))


# ---- the CLI -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_tokenizers):
    root = tmp_path_factory.mktemp("sr")
    tokenizers = toy_tokenizers
    checkpoint = make_checkpoint(str(root / "ckpt"), tokenizers)
    image = str(root / "in.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    return {"root": root, "ckpt": checkpoint, "image": image, "tokenizers": tokenizers}


def test_cli_writes_images_of_twice_the_side(toy, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text(f"a small red circle\t{toy['image']}\nno image here\n")
    out = tmp_path / "out"
    argv = ["--task", "super-resolution", "--load", toy["ckpt"], "--input-source", str(source),
            "--output-path", str(out), "--device", "cpu", "--batch-size", "2",
            "--max-inference-batch-size", "1"]
    assert generate_samples.main(argv) == 0
    assert "skipped line 2" in capsys.readouterr().err
    files = sorted(os.listdir(out / "a_small_red_circle"))
    assert files == ["000.png", "001.png"]
    # reference: super_resolve with the same per-sample seeds and temperature 1.02, decoded
    model, _, layout, stored = load_model(toy["ckpt"])
    text, image = load_tokenizers(layout, None, None, stored=stored)
    codes = image.encode_images([Image.open(toy["image"])])[0]
    for k, name in enumerate(files):
        png = np.array(Image.open(out / "a_small_red_circle" / name))
        assert png.shape == (64, 64, 3)
        want = sr.super_resolve(model, layout, text.encode("a small red circle"), codes,
                                Decoding(SamplingConfig(1.02, 200)),
                                gens([sample_seed(1234, 0, k)]))
        assert np.array_equal(png, np.array(sr.decode_grid(image, want)[0]))
    argv[argv.index("--batch-size") + 1] = "1"
    assert generate_samples.main(argv + ["--debug"]) == 0  # one grid: input upscaled + sample
    grids = [f for f in os.listdir(out) if f.endswith(".png")]
    assert len(grids) == 1 and Image.open(out / grids[0]).size == (2 * 64 + 6, 64 + 4)


def test_temperature_defaults_to_1_02_for_super_resolution():
    assert parse_args(["--task", "super-resolution"], groups=("generation",)).temperature == 1.02
    assert parse_args(["--task", "text2image"], groups=("generation",)).temperature == 1.0
    assert parse_args(["--task", "super-resolution", "--temperature", "0.9"],
                      groups=("generation",)).temperature == 0.9


def test_script_shows_help():
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "super_resolution.sh"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--sr-low-res" in result.stdout and "--tasks" in result.stdout


# ---- training data -----------------------------------------------------------------------------

def test_records_with_low_codes_round_trip_and_old_records_are_unchanged(tmp_path):
    text, codes, low = [3, 1, 4], np.arange(64) % 32, np.arange(16) * 2
    plain = encode_record(text, codes, "a.png", 32)
    # version 1 bytes, written by hand: header, int32 text, uint16 codes, key
    assert plain == struct.pack("<BBHI", 1, 2, 3, 64) + np.array(text, "<i4").tobytes() \
        + codes.astype("<u2").tobytes() + b"a.png"
    assert decode_record(plain).low_codes is None
    rec = decode_record(encode_record(text, codes, "a.png", 32, low))
    assert rec.text_ids.tolist() == text and rec.image_codes.tolist() == codes.tolist()
    assert rec.low_codes.tolist() == low.tolist() and rec.key == "a.png"
    with pytest.raises(ValueError, match="low-resolution code out of range"):
        encode_record(text, codes, "a.png", 32, [40])
    write_token_dataset(str(tmp_path / "ds"), [(text, codes, "a", low), (text, codes, "b")],
                        LAYOUT, low_res_grid=4)
    ds = TokenDataset(str(tmp_path / "ds"))
    assert ds.meta["low_res_grid"] == 4
    assert ds[0].low_codes.tolist() == low.tolist() and ds[1].low_codes is None


def test_preprocess_stores_the_codes_of_the_half_resolution_image(toy, tmp_path):
    text_path, image_path, _ = toy["tokenizers"]
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a big blue star {i}")
    report = prep.preprocess(str(folder), str(tmp_path / "ds"), text_path, image_path,
                             max_text_tokens=8, workers=0, progress=False, sr_low_res=True)
    assert report["written"] == 3
    ds = TokenDataset(str(tmp_path / "ds"))
    assert ds.meta["low_res_grid"] == 4
    tokenizer = ImageTokenizer.load(image_path)
    for rec in (ds[i] for i in range(len(ds))):
        # reference: the cropped image, resized to half its side with PIL, encoded
        pixels = tokenizer.crop_uint8(Image.open(folder / rec.key))
        half = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize(
            (VQ.image_size // 2,) * 2, Image.Resampling.BICUBIC, reducing_gap=3.0)
        want = tokenizer.model.encode(tokenizer.normalize(
            torch.from_numpy(np.array(half)).permute(2, 0, 1)[None])).flatten()
        assert rec.low_codes.tolist() == want.tolist()
        full = tokenizer.encode_images([Image.open(folder / rec.key)])[0]
        assert rec.image_codes.tolist() == full.tolist()


def test_sr_training_sequences_and_a_forward_over_them(tmp_path):
    text, codes, low = np.array([3, 1, 4]), np.arange(64) % 32, np.arange(16) % 32
    build = SequenceBuilder(LAYOUT, {"super-resolution": 1.0})
    seq = build(text, codes, sample_seed=5, low_codes=low)
    want = LAYOUT.super_resolution(text, low, codes)
    assert seq.tokens.numel() == LAYOUT.seq_length("super_resolution")
    assert torch.equal(seq.tokens, want.tokens) and torch.equal(seq.loss_mask, want.loss_mask)
    # positions restart at 0 at [ROI2]; the sequence is longer than the position table
    roi2 = int((seq.tokens == LAYOUT["[ROI2]"]).nonzero())
    assert seq.position_ids[roi2] == 0 and seq.position_ids.max() < CONFIG.max_position_embeddings
    assert seq.tokens.numel() > CONFIG.max_position_embeddings
    batch = collate([seq, build(text, codes, 6, low)])
    torch.manual_seed(0)
    logits = GPT(CONFIG)(batch["tokens"], batch["position_ids"])
    assert torch.isfinite(logits[..., :LAYOUT.vocab_size]).all()  # (padding rows may be -inf)
    with pytest.raises(ValueError, match="--tasks super-resolution needs low-resolution codes.*--sr-low-res"):
        build(text, codes, sample_seed=5)
    mixed = SequenceBuilder(LAYOUT, {"text2image": 1.0, "super-resolution": 1.0})
    assert mixed.length == LAYOUT.seq_length("super_resolution")
    assert parse_args(["--tasks", "t2i:1,super-resolution:1"], groups=("training",)).tasks == \
        {"text2image": 1.0, "super-resolution": 1.0}  # the short names of earlier runs too



def _tensor_parallel_super_resolution(rank, world_size, folder, codes, seeds):
    mpu.initialize_model_parallel(world_size, 1)
    model, _, layout, _ = load_model(folder)
    return sr.super_resolve(model, layout, [5, 6, 7], codes, Decoding(SAMPLING), gens(seeds)).numpy()


@pytest.mark.slow
def test_tensor_parallel_equals_one_process(toy, tmp_path):
    model, _, layout, _ = load_model(toy["ckpt"])
    tp2 = make_checkpoint(str(tmp_path / "tp2"), toy["tokenizers"], tp=2, state=model.state_dict())
    codes = torch.randint(0, layout.num_image_codes, (layout.image_tokens,),
                          generator=torch.Generator().manual_seed(0))
    want = sr.super_resolve(model, layout, [5, 6, 7], codes, Decoding(SAMPLING), gens([1, 2]))
    for got in run_distributed(_tensor_parallel_super_resolution, 2, tp2, codes, [1, 2]):
        assert np.array_equal(got, want.numpy())
