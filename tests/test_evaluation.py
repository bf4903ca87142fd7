"""Evaluation: the attribute reader on held-out ground truth and on shuffled captions, alignment
and diversity on hand-made cases, PSNR/SSIM against formulas and a direct window loop, tokenizer
figures, held-out losses against a plain cross entropy, and evaluate.py end to end."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
from generation_toy import make_checkpoint
from megatron_t2i.data.lmdb_store import write_token_dataset
from megatron_t2i.data.loader import split_indices
from megatron_t2i.data.synthetic import make_example, write_dataset
from megatron_t2i.evaluation import reader as reader_mod
from megatron_t2i.evaluation.binding import swap_test, swapped_caption
from megatron_t2i.evaluation.metrics import (alignment, alignment_by_caption, diversity,
                                             heldout_losses, psnr, ssim, tokenizer_figures)
from megatron_t2i.evaluation.reader import (READER_SEED, ReaderConfig, load_or_train, load_reader,
                                            reader_path, save_reader, to_tensor, train_reader)
from megatron_t2i.generation.loading import load_model, load_tokenizers

torch.set_num_threads(1)
# a quick reader: clean images only, a few hundred steps (the default adds augmentation and runs
# longer, for the blur of decoded samples)
QUICK = ReaderConfig(steps=150, pool_size=1200, augment=False)


@pytest.fixture(scope="module")
def reader():
    return train_reader(QUICK, progress=False)


@pytest.fixture(scope="module")
def held_out():
    """200 examples of a seed neither the reader nor any data set here uses."""
    assert READER_SEED != 4242
    examples = [make_example(i, 4242) for i in range(200)]
    return to_tensor([e.image for e in examples]), [e.attributes for e in examples]


# ---- the reader ----------------------------------------------------------------------------------
def test_reader_finds_what_ground_truth_captions_name(reader, held_out):
    images, wanted = held_out
    scores = alignment(reader.read(images), wanted)
    for name in ("colour", "kind", "size", "position", "count", "background"):
        assert scores[name] >= 0.95, (name, scores)
    assert scores["exact"] >= 0.9 and scores["images"] == 200


def test_images_with_other_captions_score_near_chance(reader, held_out):
    images, wanted = held_out
    found = reader.read(images)
    shuffled = [wanted[(i + 37) % len(wanted)] for i in range(len(wanted))]
    scores = alignment(found, shuffled)
    # a named shape's cell holds a shape in about 1.5 of 9 cells, of the named colour 1 time in 8
    assert scores["colour"] < 0.1 and scores["kind"] < 0.15 and scores["position"] < 0.4
    assert scores["background"] < 0.45 and scores["exact"] < 0.02


def test_reader_output_is_attributes_of_the_synthetic_format(reader, held_out):
    images, wanted = held_out
    found = reader.read([Image.fromarray((images[0] * 255).round().byte().permute(1, 2, 0).numpy())])
    assert found[0]["background"] == wanted[0]["background"]
    assert {(s["row"], s["col"], s["colour"], s["position"]) for s in found[0]["shapes"]} == \
        {(s["row"], s["col"], s["colour"], s["position"]) for s in wanted[0]["shapes"]}


def test_reader_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    tiny = ReaderConfig(steps=3, pool_size=40, batch_size=8)
    a, b = train_reader(tiny, progress=False), train_reader(tiny, progress=False)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    other = train_reader(ReaderConfig(steps=3, pool_size=40, batch_size=8, seed=7), progress=False)
    assert not torch.equal(other.head.weight, a.head.weight)

    cache = str(tmp_path / "cache")
    first = load_or_train(cache, tiny, progress=False)
    path = reader_path(cache, tiny)
    assert os.path.isfile(path) and os.listdir(cache) == [os.path.basename(path)]  # no temp left
    assert torch.load(path, weights_only=True)["config"]["steps"] == 3

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cached reader")

    monkeypatch.setattr(reader_mod, "train_reader", no_training)
    again = load_or_train(cache, tiny, progress=False)
    assert torch.equal(again.head.weight, first.head.weight)
    assert reader_path(cache, ReaderConfig(steps=4)) != path  # another config, another file


def test_broken_reader_file_is_one_clear_error(tmp_path, reader):
    path = str(tmp_path / "reader.pt")
    save_reader(reader, path)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"reader.pt: not a readable torch file"):
        load_reader(path)
    with pytest.raises(FileNotFoundError, match="attribute reader not found"):
        load_reader(str(tmp_path / "missing.pt"))


# ---- alignment and diversity on hand-made cases --------------------------------------------------
def _shape(colour, kind, size, row, col):
    return {"colour": colour, "kind": kind, "size": size, "row": row, "col": col,
            "position": "any"}


def test_alignment_counts_each_named_attribute():
    wanted = [{"background": "gray", "shapes": [_shape("red", "circle", "small", 0, 0),
                                                _shape("blue", "star", "large", 1, 1)]},
              {"background": "pink", "shapes": [_shape("green", "cross", "large", 2, 2)]}]
    found = [{"background": "gray", "shapes": [_shape("red", "square", "small", 0, 0),   # kind wrong
                                               _shape("blue", "star", "small", 1, 1)]},  # size wrong
             {"background": "cyan", "shapes": [_shape("green", "cross", "large", 2, 1),  # moved
                                               _shape("white", "star", "large", 0, 0)]}]
    a = alignment(found, wanted)
    # named shapes: 3; position found for 2 of them, colour 2, kind 1, size 1
    assert (a["position"], a["colour"], a["kind"], a["size"]) == (2 / 3, 2 / 3, 1 / 3, 1 / 3)
    assert (a["count"], a["background"]) == (1 / 2, 1 / 2)
    assert a["overall"] == (2 + 2 + 1 + 1 + 1 + 1) / (4 * 3 + 2 + 2)
    assert a["per_image"] == [False, False] and a["exact"] == 0
    assert alignment(wanted, wanted)["exact"] == 1.0
    with pytest.raises(ValueError, match="2 readings for 1 captions"):
        alignment(found, wanted[:1])


def test_alignment_by_caption_splits_by_language_and_shape_count():
    one = {"background": "gray", "language": "en", "shapes": [_shape("red", "circle", "small", 0, 0)]}
    two = {"background": "gray", "language": "zh", "shapes": [_shape("red", "circle", "small", 0, 0),
                                                              _shape("blue", "star", "large", 1, 1)]}
    wrong = {"background": "gray", "shapes": [_shape("blue", "circle", "small", 0, 0)]}
    groups = alignment_by_caption([one, wrong, wrong], [one, one, two])
    assert list(groups) == ["en, 1 shape", "zh, 2 shapes"]
    assert groups["en, 1 shape"]["colour"] == 0.5 and groups["en, 1 shape"]["images"] == 2
    assert groups["zh, 2 shapes"]["position"] == 0.5 and groups["zh, 2 shapes"]["colour"] == 0
    assert "per_image" not in groups["en, 1 shape"]
    assert list(alignment_by_caption([wrong], [wrong])) == ["1 shape"]  # no language named


def test_diversity_of_identical_samples_is_zero():
    same = torch.rand(1, 3, 8, 8).expand(4, -1, -1, -1)
    d = diversity([same, same])
    assert d["pairwise_distance"] == 0 and d["distinct_pairs"] == 0
    # samples 0, 0, 1 (all pixels): pair distances 0, 1, 1
    z, o = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    d = diversity([torch.stack([z, z, o])], threshold=0.5)
    assert math.isclose(d["pairwise_distance"], 2 / 3) and math.isclose(d["distinct_pairs"], 2 / 3)


# ---- PSNR and SSIM -------------------------------------------------------------------------------
def test_psnr_of_known_differences():
    a = torch.full((2, 3, 16, 16), 0.5)
    assert torch.allclose(psnr(a + 0.1, a), torch.tensor(20.0, dtype=torch.float64))  # MSE 0.01
    assert torch.equal(psnr(a, a), torch.full((a.shape[0],), 100.0, dtype=torch.float64))


def test_ssim_identical_images_is_one_and_constant_images_follow_the_formula():
    x = torch.rand(2, 3, 20, 24)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # constant images: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.25, 0.75, 0.01 ** 2  # exact in float32
    got = ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b))
    assert math.isclose(got.item(), (2 * a * b + c1) / (a * a + b * b + c1), rel_tol=1e-9)


def test_ssim_matches_a_direct_loop_over_windows():
    """Wang et al.'s formula evaluated window by window with numpy, Gaussian weights sigma 1.5."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 13, 15, generator=gen)
    y = (x + 0.2 * torch.rand(1, 2, 13, 15, generator=gen)).clamp(0, 1)
    t = np.arange(11) - 5
    w = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for ch in range(2):
        a, b = x[0, ch].double().numpy(), y[0, ch].double().numpy()
        for i in range(13 - 10):
            for j in range(15 - 10):
                pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    assert math.isclose(ssim(x, y).item(), float(np.mean(values)), rel_tol=1e-9)
    assert ssim(x, y).item() < 0.99
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


# ---- the swap test -------------------------------------------------------------------------------
def two_shapes(first_cell, second_cell, language="en", colours=("yellow", "blue")):
    shapes = [{"colour": colours[0], "kind": "star", "size": "small", "row": first_cell[0],
               "col": first_cell[1]},
              {"colour": colours[1], "kind": "square", "size": "large", "row": second_cell[0],
               "col": second_cell[1]}]
    return {"background": "gray", "language": language, "shapes": shapes}


def test_swapped_caption_exchanges_the_two_shapes_words():
    en = two_shapes((0, 0), (2, 2))
    caption = "a small yellow star at the top left and a large blue square in the bottom right"
    assert swapped_caption(caption, en, "colour") == \
        "a small blue star at the top left and a large yellow square in the bottom right"
    assert swapped_caption(caption, en, "kind") == \
        "a small yellow square at the top left and a large blue star in the bottom right"
    zh = two_shapes((0, 0), (2, 2), "zh")
    assert swapped_caption("一个黄色的小星形在左上角，右下角有一个大的蓝色正方形", zh, "colour") == \
        "一个蓝色的小星形在左上角，右下角有一个大的黄色正方形"
    same = two_shapes((0, 0), (2, 2), colours=("red", "red"))
    assert swapped_caption("a red star and a red square", same, "colour") is None
    assert swapped_caption("a yellow star, a yellow square and a blue square", en, "colour") is None
    one = {**en, "shapes": en["shapes"][:1]}
    assert swapped_caption("a small yellow star at the top left", one, "colour") is None


def test_swap_test_tells_binding_by_order_from_binding_by_content():
    """Fake scorers with a known rule: one binds the first colour named to the first cell in
    reading order, the other to the shape the caption names it with."""
    examples = []
    for i, cells in enumerate([((0, 0), (2, 2)), ((2, 1), (0, 2)), ((1, 0), (1, 2)),
                               ((2, 2), (0, 0)), ((0, 1), (1, 1))]):
        colours = (["red", "green", "purple", "black", "white"][i], "blue")
        attributes = two_shapes(*cells, colours=colours)
        caption = f"a small {colours[0]} star at x and a large {colours[1]} square at y"
        examples.append({"caption": caption, "attributes": attributes})
    codes = torch.arange(len(examples))[:, None]  # the example's index, as its "picture"

    def first_named_colour(text):
        return next(w for w in text.split() if w in ("red", "green", "purple", "black", "white",
                                                     "blue"))

    def by_content(codes, texts):   # the true caption's first colour is the star's
        return torch.tensor([float(first_named_colour(t) == examples[int(c)]["attributes"]
                                   ["shapes"][0]["colour"]) for c, t in zip(codes[:, 0], texts)])

    def by_order(codes, texts):     # the first colour named belongs to the first cell
        out = []
        for c, t in zip(codes[:, 0], texts):
            shapes = examples[int(c)]["attributes"]["shapes"]
            first_cell = min(shapes, key=lambda s: (s["row"], s["col"]))
            out.append(float(first_named_colour(t) == first_cell["colour"]))
        return torch.tensor(out)

    result = swap_test(examples, codes, lambda t: t, by_order, by_content)["colour"]
    assert result["pairs"] == {"named in reading order": 3, "named in reverse": 2}
    assert result["text->image"] == {"named in reading order": 1.0, "named in reverse": 0.0}
    assert result["image->text"] == {"named in reading order": 1.0, "named in reverse": 1.0}
    # swapping the kinds leaves the colour the scorers look at: a tie, which is no win
    kinds = swap_test(examples, codes, lambda t: t, by_order, by_content)["kind"]
    assert kinds["pairs"] == result["pairs"]
    assert kinds["text->image"] == {"named in reading order": 0.0, "named in reverse": 0.0}
    # a model with no caption direction: the other direction alone
    one_way = swap_test(examples, codes, lambda t: t, by_order, None)["colour"]
    assert one_way["text->image"] == result["text->image"] and "image->text" not in one_way


# ---- a toy checkpoint, its tokenizers and a token data set of the synthetic images -------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_tokenizers):
    root = tmp_path_factory.mktemp("toy")
    tokenizers = toy_tokenizers
    ckpt = make_checkpoint(str(root / "ckpt"), tokenizers)
    model, _, layout, stored = load_model(ckpt)
    text, image = load_tokenizers(layout, None, None, stored=stored)
    synthetic = write_dataset(str(root / "synthetic"), 12, seed=5, image_size=32, progress=False)
    entries = [json.loads(line) for line in open(os.path.join(synthetic, "attributes.jsonl"))]
    codes = image.encode_images([Image.open(os.path.join(synthetic, e["file"])) for e in entries])
    records = [(text.encode(e["caption"])[:layout.max_text_tokens], c.tolist(), e["file"])
               for e, c in zip(entries, codes)]
    tokens = str(root / "tokens")
    write_token_dataset(tokens, records, layout)
    return {"root": root, "ckpt": ckpt, "model": model, "layout": layout, "image": image,
            "synthetic": synthetic, "tokens": tokens, "entries": entries}


def test_tokenizer_figures_match_direct_computation(toy):
    tok = toy["image"]
    x = to_tensor([make_example(i, 9, 32).image for i in range(20)])
    figures = tokenizer_figures(tok, x, batch_size=7)
    codes = tok.encode_images(tok.normalize(x))
    counts = np.bincount(codes.flatten().numpy(), minlength=tok.codebook_size)
    p = counts[counts > 0] / counts.sum()
    assert figures["code_usage"] == (counts > 0).sum() / tok.codebook_size
    assert math.isclose(figures["perplexity"], float(np.exp(-(p * np.log(p)).sum())), rel_tol=1e-5)
    y = tok.decode_to_tensor(codes).double()
    mse = ((y - x.double()) ** 2).mean(dim=(1, 2, 3))
    assert math.isclose(figures["psnr"], float((10 * torch.log10(1 / mse)).mean()), rel_tol=1e-9)
    assert 0 < figures["ssim"] < 1 and figures["images"] == 20


@pytest.mark.parametrize("order", ["raster", "lshape"])
def test_heldout_losses_are_plain_cross_entropy_split_by_target_kind(toy, order):
    """One sequence at a time through a plain forward; L-shape: its block-causal mask and its
    slots' targets (the records are raster, the layout's order builds the sequences)."""
    from megatron_t2i.data.lmdb_store import TokenDataset
    from megatron_t2i.model.attention import block_causal_mask

    layout, model = dataclasses.replace(toy["layout"], image_order=order), toy["model"]
    dataset = TokenDataset(toy["tokens"])
    indices = np.array([1, 4, 6])
    got = heldout_losses(model, layout, dataset, indices, batch_size=2, progress=False)
    sums = {"image": [0.0, 0], "text": [0.0, 0]}
    for i in indices:
        record = dataset[int(i)]
        seq = layout.text_to_image(record.text_ids, record.image_codes)
        tokens, positions = seq.tokens[None, :-1], seq.position_ids[None, :-1]
        attention = block_causal_mask(seq.block_ids[None, :-1]) if order == "lshape" else None
        with torch.no_grad():
            logits = model(tokens, positions, attention, gather_logits=True)[0]   # [L-1, V]
        targets = (seq.targets if order == "lshape" else seq.tokens)[1:]
        mask = seq.loss_mask[1:] > 0
        losses = F.cross_entropy(logits.double(), targets, reduction="none")
        for t, m, loss in zip(targets.tolist(), mask.tolist(), losses.tolist()):
            if m:
                kind = "image" if t < layout.num_image_codes else "text"
                sums[kind][0] += loss
                sums[kind][1] += 1
    assert got["image_targets"] == sums["image"][1] == 3 * layout.image_tokens
    assert got["text_targets"] == sums["text"][1] > 0
    assert math.isclose(got["image_loss"], sums["image"][0] / sums["image"][1], rel_tol=1e-5)
    assert math.isclose(got["text_loss"], sums["text"][0] / sums["text"][1], rel_tol=1e-5)


# ---- evaluate.py ---------------------------------------------------------------------------------
def test_evaluate_images_scores_ground_truth_and_writes_the_report(tmp_path, reader):
    folder = write_dataset(str(tmp_path / "truth"), 40, seed=11, image_size=64, progress=False)
    out = str(tmp_path / "report")
    assert evaluate.main(["--images", folder, "--output-path", out, "--num-prompts", "5"],
                         reader=reader) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["alignment"]["images"] == 40
    assert report["alignment"]["colour"] >= 0.95 and report["alignment"]["kind"] >= 0.95
    assert report["alignment_other_captions"]["colour"] < 0.4
    assert len(report["rows"]) == 40 and report["grid"] == "grid.png"
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "## Caption alignment" in md and f"{report['alignment']['colour']:.3f}" in md
    assert "![examples](grid.png)" in md
    grid = Image.open(os.path.join(out, "grid.png"))
    assert grid.size[1] > 5 * 96  # five rows of enlarged images
    assert sorted(os.listdir(out)) == ["grid.png", "report.json", "report.md"]  # no temp files


def test_evaluate_checkpoint_generates_and_reports_every_figure(tmp_path, toy, reader):
    out = str(tmp_path / "report")
    argv = ["--load", toy["ckpt"], "--data-path", toy["tokens"], "--synthetic-dir", toy["synthetic"],
            "--holdout-fraction", "0.25", "--seed", "3", "--num-prompts", "2",
            "--samples-per-prompt", "3", "--device", "cpu", "--output-path", out]
    assert evaluate.main(argv, reader=reader) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    held = split_indices(12, 0.25, 3)[1]
    captions = [toy["entries"][i]["caption"] for i in held[:2]]
    assert [r["caption"] for r in report["rows"]] == captions
    assert "held-out records" in report["source"]["prompts"]
    assert all(len(r["ok"]) == 3 and len(r["found"]) == 3 for r in report["rows"])
    assert report["alignment"]["images"] == 6
    assert report["heldout_loss"]["records"] == len(held) and report["heldout_loss"]["image_loss"] > 0
    t = report["tokenizer"]
    assert t["images"] == len(held) and 0 < t["code_usage"] <= 1 and t["psnr"] > 0
    assert report["reader_check_clean"]["images"] == len(held)  # the captions' own pictures
    assert report["reader_check_clean"]["colour"] >= 0.95
    assert report["diversity"]["pairwise_distance"] > 0  # random samples of a random model
    v = report["speed"]  # no reranking asked: drawing is all the time
    assert v["images"] == 6 and v["reranking_s"] < 0.05 * v["drawing_s"]
    assert v["images_per_s"] == pytest.approx(6 / v["drawing_s"])
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    for section in ("Caption alignment", "Diversity", "Image tokenizer", "Held-out token loss",
                    "Sampling speed"):
        assert f"## {section}" in md
    assert sum(a["images"] for a in report["alignment_by_caption"].values()) == 6
    assert "### By kind of caption" in md
    # the swap test ran on the held-out two-shape pictures whose colours differ
    two = [e for e in (toy["entries"][i] for i in held) if len(e["attributes"]["shapes"]) == 2
           and len({s["colour"] for s in e["attributes"]["shapes"]}) == 2]
    assert sum(report["binding"]["colour"]["pairs"].values()) == len(two)
    assert "## Binding (swap test)" in md


def test_evaluate_rerank_orders_the_same_samples_and_scores_the_best(tmp_path, capsys, toy, reader):
    argv = ["--load", toy["ckpt"], "--data-path", toy["tokens"], "--synthetic-dir", toy["synthetic"],
            "--holdout-fraction", "0.25", "--seed", "3", "--num-prompts", "3",
            "--samples-per-prompt", "3", "--device", "cpu"]
    reports = {}
    for name, extra in (("plain", []), ("ranked", ["--rerank-top", "2"])):
        out = str(tmp_path / name)
        assert evaluate.main(argv + extra + ["--output-path", out], reader=reader) == 0
        reports[name] = json.load(open(os.path.join(out, "report.json")))
    plain, ranked = reports["plain"], reports["ranked"]
    assert plain["alignment_reranked"] is None
    for p, r in zip(plain["rows"], ranked["rows"]):  # the same samples (per-sample seeds), reordered
        assert sorted(map(json.dumps, p["found"])) == sorted(map(json.dumps, r["found"]))
    best = alignment([f for r in ranked["rows"] for f in r["found"][:2]],
                     [r["attributes"] for r in ranked["rows"] for _ in range(2)])
    assert ranked["alignment_reranked"]["images"] == 6
    assert ranked["alignment_reranked"]["overall"] == best["overall"]
    assert ranked["source"]["reranked"] == "best 2 of 3 by caption score"
    assert "reranked: best 2 of 3" in open(os.path.join(tmp_path, "ranked", "report.md")).read()
    assert evaluate.main(argv + ["--rerank-top", "4", "--output-path", str(tmp_path / "x")],
                         reader=reader) == 2
    assert "--rerank-top 4 exceeds --samples-per-prompt 3" in capsys.readouterr().err


def test_a_text_to_image_only_model_is_evaluated_without_its_missing_caption_direction(
        tmp_path, capsys, toy, toy_tokenizers, reader):
    """A model whose position table holds text->image only (pretrain.py --tasks text2image):
    the swap test scores log p(picture | caption) alone, and reranking by the caption direction
    it lacks is one line (it used to fail deep in scoring on the missing positions)."""
    from generation_toy import tiny_config
    from megatron_t2i.tasks import max_positions
    layout = toy["layout"]
    config = dataclasses.replace(tiny_config(layout),
                                 max_position_embeddings=max_positions(layout, ["text2image"]))
    assert config.max_position_embeddings < max_positions(layout, ["image2text"])
    ckpt = make_checkpoint(str(tmp_path / "t2i"), toy_tokenizers, config=config)
    argv = ["--load", ckpt, "--data-path", toy["tokens"], "--synthetic-dir", toy["synthetic"],
            "--holdout-fraction", "0.25", "--seed", "3", "--num-prompts", "2",
            "--samples-per-prompt", "2", "--device", "cpu"]
    assert evaluate.main(argv + ["--output-path", str(tmp_path / "out")], reader=reader) == 0
    binding = json.load(open(tmp_path / "out" / "report.json"))["binding"]
    capsys.readouterr()
    scored = [r for r in binding.values() if sum(r["pairs"].values())]
    assert scored and all("text->image" in r and "image->text" not in r for r in scored)
    assert evaluate.main(argv + ["--rerank-top", "1", "--rerank", "caption",
                                 "--output-path", str(tmp_path / "x")], reader=reader) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--rerank caption: this model has no image->text" in err


class MeanReader:
    """Reads nothing but tells the samples apart: each reading carries the image's mean pixel."""

    def read(self, images):
        return [{"background": "gray", "shapes": [], "mean": round(float(x.mean()), 6)}
                for x in images]


def test_evaluate_rerank_puts_the_highest_caption_score_first(tmp_path, toy, monkeypatch):
    """With caption scores that grow with the sample's index, the reranked rows hold the samples
    in reverse drawing order: the order comes from the scores, not from generation."""
    from megatron_t2i.generation import scoring

    argv = ["--load", toy["ckpt"], "--data-path", toy["tokens"], "--synthetic-dir", toy["synthetic"],
            "--holdout-fraction", "0.25", "--seed", "3", "--num-prompts", "2",
            "--samples-per-prompt", "3", "--device", "cpu"]
    out = {}
    for name, extra in (("plain", []), ("ranked", ["--rerank-top", "1"])):
        assert evaluate.main(argv + extra + ["--output-path", str(tmp_path / name)],
                             reader=MeanReader()) == 0
        out[name] = json.load(open(tmp_path / name / "report.json"))["rows"]
        monkeypatch.setattr(scoring, "score_captions",
                            lambda ctx, text, codes: torch.arange(len(codes), dtype=torch.float32))
    for p, r in zip(out["plain"], out["ranked"]):
        means = [f["mean"] for f in p["found"]]
        assert len(set(means)) == 3  # the toy's samples differ
        assert [f["mean"] for f in r["found"]] == means[::-1]


def test_an_interrupted_evaluation_is_one_line(tmp_path, capsys, monkeypatch, reader):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", interrupted)
    assert evaluate.main(["--load", str(tmp_path), "--output-path", str(tmp_path / "out")],
                         reader=reader) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted before the report was finished" in err[0]
    assert not (tmp_path / "out").exists()


def test_bad_invocations_are_one_line_errors(tmp_path, capsys, reader):
    assert evaluate.main(["--output-path", str(tmp_path)], reader=reader) == 2
    assert "give either --load CKPT" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate.main(["--images", str(empty), "--output-path", str(tmp_path)], reader=reader) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "attributes.jsonl: no such file" in err
    (empty / "attributes.jsonl").write_text('{"file": "a.png"}\n')
    assert evaluate.main(["--images", str(empty), "--output-path", str(tmp_path)], reader=reader) == 2
    assert "attributes.jsonl:1: expected a JSON object" in capsys.readouterr().err


# ---- FID and KID ---------------------------------------------------------------------------------
def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians fitted to feature rows, written out with scipy."""
    from scipy import linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_matches_the_formula_and_orders_corruptions(reader, held_out):
    from megatron_t2i.evaluation.fid import ReaderFeatures, fid_kid
    from megatron_t2i.evaluation.reader import blur
    images = held_out[0]                                                       # [200, 3, S, S]
    real, other = images[:100], images[100:]
    features = ReaderFeatures(reader)
    assert features(real[:2]).shape == (2, features.num_features)
    same = fid_kid(features, real, other)
    blurred = fid_kid(features, real, blur(other, 1.5))
    shuffled = other.flatten(1)[:, torch.randperm(other[0].numel(), generator=torch.Generator()
                                                  .manual_seed(0))].view_as(other)
    noise = fid_kid(features, real, shuffled)  # the same pixels, no picture
    assert same["fid"] < blurred["fid"] < noise["fid"]
    assert same["kid"] < blurred["kid"] < noise["kid"]
    assert abs(same["kid"]) < 3 * same["kid_std"]  # two samples of one distribution: about 0
    want = frechet(features(real).double().numpy(), features(blur(other, 1.5)).double().numpy())
    assert blurred["fid"] == pytest.approx(want, rel=1e-3)
