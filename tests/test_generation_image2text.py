"""image2text and post-selection: caption likelihood against a plain forward; a briefly trained
caption model ranks matching images first and captions them right; beam search (beam 1 is
greedy, never worse than greedy, cached equals recomputed); the CLI tasks end to end (captions
file never overwritten, per-sample seeds, scores file, --top copies, CLIP scores from local
weights); the scripts' --help."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import generate_samples
from generation_toy import make_checkpoint
from megatron_t2i.config import model_config
from megatron_t2i.generation.loading import GenerationContext, load_model, load_tokenizers
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.generation.scoring import (caption_log_likelihood, image_log_likelihood,
                                             score_captions)
from megatron_t2i.generation.state import Decoding, Prompt
from megatron_t2i.generation.strategies.beam import beam_search
from megatron_t2i.generation.strategies.raster import generate
from megatron_t2i.generation.tasks.image2text import caption_text_ids
from megatron_t2i.generation.vocab import caption_vocab_mask
from megatron_t2i.model.gpt import GPT
from megatron_t2i.tokenizers.layout import TokenLayout

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = TokenLayout(num_image_codes=32, num_text_tokens=40, image_grid=8, max_text_tokens=6)
CONFIG = model_config("tiny", LAYOUT, hidden_dropout=0.0, attention_dropout=0.0, hidden_size=32,
                      num_attention_heads=2, pb_relax=False)
PAD = LAYOUT["[PAD]"]
ALLOWED = caption_vocab_mask(LAYOUT, CONFIG.vocab_size)
LIMIT = LAYOUT.max_text_tokens + 1  # caption tokens + end


def toy_example(rng):
    """A caption [a, b] or [a, b, c] (text ids) and an image whose code rows spell it out, with
    10% noise codes: the caption is readable from the image and nothing else."""
    a, b = int(rng.integers(0, 8)), int(rng.integers(8, 16))
    c = int(rng.integers(16, 24)) if rng.random() < 0.5 else None
    codes = np.empty(LAYOUT.image_tokens, dtype=np.int64)
    codes[:24], codes[24:48], codes[48:] = a, b, 31 if c is None else c
    noise = rng.random(codes.size) < 0.1
    codes[noise] = rng.integers(24, 31, noise.sum())
    return torch.from_numpy(codes), [a, b] + ([c] if c is not None else [])


@pytest.fixture(scope="module")
def trained():
    """A tiny caption model trained in-process (caption targets only) on toy_example."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = GPT(CONFIG)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(160):
        seqs = [LAYOUT.image_to_text(*toy_example(rng)) for _ in range(16)]
        tokens = torch.stack([s.tokens for s in seqs])
        positions = torch.stack([s.position_ids for s in seqs])
        weights = torch.stack([s.loss_mask for s in seqs])[:, 1:]
        weights[:, :LAYOUT.image_tokens + 3] = 0  # targets: the caption and its end token
        logits = model(tokens[:, :-1], positions[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:],
                                                 reduction="none")
        loss = (loss * weights).sum() / weights.sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(1)
    return GPT(CONFIG).eval()


def held_out(n=24, seed=1):
    rng = np.random.default_rng(seed)
    examples = [toy_example(rng) for _ in range(n)]
    return torch.stack([c for c, _ in examples]), [t for _, t in examples]


def prompt(codes):
    return Prompt.of(LAYOUT.image_to_text(codes), 1, "cpu")


DECODING = Decoding(vocab_size=LAYOUT.vocab_size)


# ---- caption likelihood ------------------------------------------------------------------------

def test_caption_likelihood_equals_a_plain_forward(untrained):
    assert LAYOUT.image_positions == "fixed"
    codes, _ = held_out(4)
    texts = [[], [1, 2, 3], [5] * LAYOUT.max_text_tokens, [7, 9]]  # empty, short, at the limit
    got = caption_log_likelihood(untrained, LAYOUT, codes, texts, batch_size=3)
    for c, text, value in zip(codes, texts, got):
        # reference: one forward over image, [ROI1] and caption; each distribution renormalised
        # over text ids + [PAD]; targets the caption and its end (none at the length limit)
        ids = [LAYOUT.text_offset + t for t in text]
        ended = len(text) < LAYOUT.max_text_tokens
        tokens = torch.tensor([LAYOUT.size_token, LAYOUT["[BOI1]"], *c.tolist(), LAYOUT["[EOI1]"],
                               LAYOUT["[ROI1]"], *ids] + ([PAD] if ended else []))
        with torch.no_grad():
            # fixed image positions: [size] [BOI1] codes start at their text->image ids
            positions = torch.arange(len(tokens) - 1) + LAYOUT.max_text_tokens + 1
            logits = untrained(tokens[None, :-1], positions[None])[0].float()
        logp = logits.masked_fill(~ALLOWED, float("-inf")).log_softmax(-1)
        first = LAYOUT.image_tokens + 4  # index of the first caption token (or its end)
        want = sum(logp[i - 1, tokens[i]] for i in range(first, len(tokens)))
        assert value.item() == pytest.approx(float(want), abs=1e-4)


def test_image_likelihood_equals_a_plain_forward(untrained):
    """The other direction (evaluation's swap test): log p(image | caption), only the codes
    scored, each renormalised over the image codes; captions of different lengths in a batch."""
    codes, _ = held_out(4)
    texts = [[], [1, 2, 3], [5] * LAYOUT.max_text_tokens, [7, 9]]
    got = image_log_likelihood(untrained, LAYOUT, codes, texts, batch_size=3)
    image_ids = torch.arange(CONFIG.vocab_size) < LAYOUT.num_image_codes
    for c, text, value in zip(codes, texts, got):
        tokens = torch.tensor([LAYOUT["[ROI1]"], *[LAYOUT.text_offset + t for t in text],
                               LAYOUT.size_token, LAYOUT["[BOI1]"], *c.tolist()])
        # fixed image positions: [size] sits at max_text_tokens + 1 whatever the caption's length
        positions = torch.cat([torch.arange(len(text) + 1),
                               torch.arange(2 + c.numel()) + LAYOUT.max_text_tokens + 1])
        with torch.no_grad():
            logits = untrained(tokens[None, :-1], positions[None, :-1])[0].float()
        logp = logits.masked_fill(~image_ids, float("-inf")).log_softmax(-1)
        first = len(text) + 3  # index of the first code
        want = sum(logp[i - 1, tokens[i]] for i in range(first, len(tokens)))
        assert value.item() == pytest.approx(float(want), abs=1e-4)


def test_post_selection_ranks_the_matching_image_first(trained):
    codes, texts = held_out(24)
    # scores[i, j] = log p(text_i | image_j)
    scores = torch.stack([caption_log_likelihood(trained, LAYOUT, codes, [t] * len(texts), 8)
                          for t in texts])
    pairs = [(i, j) for i in range(len(texts)) for j in range(len(texts)) if texts[i] != texts[j]]
    wins = sum(bool(scores[i, i] > scores[i, j]) for i, j in pairs)
    assert wins / len(pairs) >= 0.9, f"matching image ranked first in {wins}/{len(pairs)} pairs"


# ---- beam search -------------------------------------------------------------------------------

def test_greedy_captions_read_the_image(trained):
    codes, texts = held_out(24)
    right = 0
    for c, text in zip(codes, texts):
        (tokens, _), *_ = beam_search(trained, prompt(c), LIMIT, 1, ALLOWED, PAD, DECODING)
        right += caption_text_ids(tokens, LAYOUT) == text
    assert right / len(texts) >= 0.75, f"{right}/{len(texts)} captions right"


@pytest.mark.parametrize("which", ["trained", "untrained"])
def test_beam_one_is_greedy(which, request):
    model = request.getfixturevalue(which)
    codes, _ = held_out(6, seed=2)
    end_only = torch.zeros_like(ALLOWED)
    end_only[PAD] = True
    for c in codes:
        (beam, _), = beam_search(model, prompt(c), LIMIT, 1, ALLOWED, PAD, DECODING)
        # reference: raster decoding with top-k 1 (argmax), ending forced at the limit
        greedy = generate(model, prompt(c), LIMIT,
                          Decoding(SamplingConfig(top_k=1), vocab_size=LAYOUT.vocab_size),
                          lambda step: ALLOWED if step < LIMIT - 1 else end_only)[0]
        n = len(caption_text_ids(greedy, LAYOUT))
        assert beam.tolist() == greedy[:n].tolist() + [PAD]


@pytest.mark.parametrize("which", ["trained", "untrained"])
def test_beam_finds_at_least_greedys_score_and_reports_true_scores(which, request):
    model = request.getfixturevalue(which)
    codes, _ = held_out(8, seed=3)
    better = 0
    for c in codes:
        (greedy, greedy_ll), = beam_search(model, prompt(c), LIMIT, 1, ALLOWED, PAD, DECODING)
        beams = beam_search(model, prompt(c), LIMIT, 4, ALLOWED, PAD, DECODING)
        assert len(beams) >= 4
        normalised = [ll / len(t) for t, ll in beams]
        assert normalised == sorted(normalised, reverse=True)
        assert normalised[0] >= greedy_ll / len(greedy) - 1e-5
        better += normalised[0] > greedy_ll / len(greedy) + 1e-5
        # every reported score is the likelihood of its caption, computed independently
        texts = [caption_text_ids(t, LAYOUT) for t, _ in beams]
        truth = caption_log_likelihood(model, LAYOUT, c[None].expand(len(texts), -1), texts)
        torch.testing.assert_close(torch.tensor([ll for _, ll in beams]), truth, atol=1e-4, rtol=0)
    if which == "untrained":  # flat distributions: the search must beat greedy somewhere
        assert better > 0


def test_cached_beam_search_equals_recomputation(untrained):
    codes, _ = held_out(3, seed=4)
    for c in codes:
        cached = beam_search(untrained, prompt(c), LIMIT, 3, ALLOWED, PAD, DECODING)
        full = beam_search(untrained, prompt(c), LIMIT, 3, ALLOWED, PAD,
                           Decoding(use_cache=False, vocab_size=LAYOUT.vocab_size))
        assert [t.tolist() for t, _ in cached] == [t.tolist() for t, _ in full]
        torch.testing.assert_close(torch.tensor([s for _, s in cached]),
                                   torch.tensor([s for _, s in full]), atol=1e-4, rtol=0)


# ---- the CLI tasks -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_tokenizers):
    """A random tiny checkpoint with its tokenizers, and four images."""
    root = tmp_path_factory.mktemp("i2t")
    tokenizers = toy_tokenizers
    checkpoint = make_checkpoint(str(root / "ckpt"), tokenizers)
    rng = np.random.default_rng(0)
    images = []
    for i in range(4):
        path = str(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        images.append(path)
    model, config, layout, stored = load_model(checkpoint)
    text, image = load_tokenizers(layout, None, None, stored=stored)
    ctx = GenerationContext(model, config, layout, text, image, torch.device("cpu"), True)
    return {"root": root, "ckpt": checkpoint, "images": images, "ctx": ctx}


def run(toy, tmp_path, task, lines, *flags):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "input.txt"
    source.write_text("".join(line + "\n" for line in lines))
    argv = ["--task", task, "--load", toy["ckpt"], "--input-source", str(source),
            "--output-path", str(tmp_path / "out"), "--device", "cpu", *flags]
    assert generate_samples.main(argv) == 0
    return tmp_path / "out"


def read_tsv(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return rows[0], rows[1:]


def test_image2text_cli_beam_writes_a_new_captions_file_each_run(toy, tmp_path, capsys):
    ctx = toy["ctx"]
    out = run(toy, tmp_path, "image2text", toy["images"][:3], "--beam-size", "2")
    header, rows = read_tsv(out / "captions.tsv")
    assert header == ["path", "caption"] and [r[0] for r in rows] == toy["images"][:3]
    layout = ctx.layout
    for path, caption in rows:
        codes = ctx.image_tokenizer.encode_images([Image.open(path)])[0]
        seq = layout.image_to_text(codes)
        (best, _), *_ = beam_search(ctx.model, Prompt.of(seq, 1, "cpu"),
                                    layout.max_text_tokens + 1, 2,
                                    caption_vocab_mask(layout, ctx.config.vocab_size),
                                    layout["[PAD]"], Decoding(vocab_size=layout.vocab_size))
        assert caption == " ".join(ctx.text_tokenizer.decode(caption_text_ids(best, layout)).split())
    assert "log-likelihood" in capsys.readouterr().out
    first = (out / "captions.tsv").read_text()
    run(toy, tmp_path, "image2text", toy["images"][:1], "--beam-size", "2")
    assert (out / "captions.tsv").read_text() == first          # never overwritten
    assert len(read_tsv(out / "captions-1.tsv")[1]) == 1


def test_image2text_cli_samples_depend_only_on_their_seed(toy, tmp_path):
    runs = []
    for batch in ("1", "3"):
        out = run(toy, tmp_path / batch, "image2text", toy["images"][:2], "--batch-size", "3",
                  "--max-inference-batch-size", batch, "--top-k", "50")
        runs.append(read_tsv(out / "captions.tsv")[1])
    assert len(runs[0]) == 6 and runs[0] == runs[1]


def test_post_selection_cli_scores_ranks_and_copies(toy, tmp_path, capsys):
    ctx = toy["ctx"]
    text = "a small red circle"
    lines = [text + "\t" + "\t".join(toy["images"][:3]),
             "no images on this line",
             "a big star\t" + str(tmp_path / "missing.png")]
    out = run(toy, tmp_path, "post-selection", lines, "--top", "2")
    err = capsys.readouterr().err
    assert "skipped line 2" in err and "skipped line 3" in err and "missing.png" in err
    header, rows = read_tsv(out / "post_selection.tsv")
    assert header == ["text", "image", "caption_score", "rank"] and len(rows) == 3
    codes = ctx.image_tokenizer.encode_images([Image.open(p) for p in toy["images"][:3]])
    want = score_captions(ctx, text, codes)
    got = torch.tensor([float(r[2]) for r in rows])
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    ranks = [int(r[3]) for r in rows]
    assert sorted(ranks) == [1, 2, 3] and ranks[int(want.argmax())] == 1
    folder = out / "a_small_red_circle"
    copied = sorted(os.listdir(folder))
    assert len(copied) == 2
    for name in copied:
        rank, _, base = name.partition("-")
        source = next(p for p, r in zip(toy["images"], ranks) if r == int(rank))
        assert base == os.path.basename(source)
        assert (folder / name).read_bytes() == open(source, "rb").read()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny randomly initialised open_clip model: its config .json, weights and the model."""
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                             "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                           "layers": 1}}
    config_path = root / "tiny-clip-test.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(5)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-test")
    weights = root / "tiny-clip.pt"
    torch.save(model.state_dict(), weights)
    return {"config": str(config_path), "weights": str(weights), "model": model.eval(),
            "preprocess": preprocess, "tokenizer": open_clip.get_tokenizer("tiny-clip-test")}


def test_post_selection_with_a_local_open_clip_model(toy, tiny_clip, tmp_path):
    text, images = "a blue square", toy["images"]
    torch.manual_seed(123)  # the scorer's own random initialisation differs from the saved one
    out = run(toy, tmp_path, "post-selection", [text + "\t" + "\t".join(images)],
              "--clip-model", tiny_clip["config"], "--clip-checkpoint", tiny_clip["weights"])
    header, rows = read_tsv(out / "post_selection.tsv")
    assert header == ["text", "image", "caption_score", "clip_score", "rank"]
    # reference: cosine similarity of the saved model's embeddings
    model = tiny_clip["model"]
    with torch.no_grad():
        image = model.encode_image(torch.stack([tiny_clip["preprocess"](Image.open(p).convert("RGB"))
                                                for p in images]))
        words = model.encode_text(tiny_clip["tokenizer"]([text]))
    want = torch.nn.functional.cosine_similarity(image, words)
    got = torch.tensor([float(r[3]) for r in rows])
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    ranks = [int(r[4]) for r in rows]  # ranked by the CLIP score
    assert ranks == (torch.argsort(torch.argsort(-want)) + 1).tolist()


def test_clip_flags_need_local_weights(toy, tiny_clip, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_samples.main(["--task", "post-selection", "--load", toy["ckpt"],
                               "--clip-model", "ViT-B-32"])
    assert "--clip-checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"nothing": torch.zeros(1)}, bad)
    source = tmp_path / "q.txt"
    source.write_text("a\t" + toy["images"][0] + "\n")
    for model, weights, message in [(tiny_clip["config"], bad, "--clip-checkpoint"),
                                    ("no-such-arch", tiny_clip["weights"], "--clip-model")]:
        code = generate_samples.main(["--task", "post-selection", "--load", toy["ckpt"],
                                      "--input-source", str(source), "--device", "cpu",
                                      "--output-path", str(tmp_path / "o"),
                                      "--clip-model", model, "--clip-checkpoint", str(weights)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err


def test_rerank_hook_scores_like_post_selection(toy):
    ctx = toy["ctx"]
    codes = ctx.image_tokenizer.encode_images([Image.open(p) for p in toy["images"]])
    text = "a big green star"
    ids = ctx.text_tokenizer.encode(text)
    want = caption_log_likelihood(ctx.model, ctx.layout, codes, [ids] * len(codes))
    torch.testing.assert_close(score_captions(ctx, text, codes, batch_size=3), want)


@pytest.mark.parametrize("script", ["image2text.sh", "post_selection.sh"])
def test_scripts_show_help(script):
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Environment variables" in result.stdout
    assert "generate_samples.py" in result.stdout
