"""The embedded default data set: determinism, pictures that match their attributes, captions that
name every attribute, languages, atomic writing and the CLI."""
import json
import os

import numpy as np
import pytest

from megatron_t2i.cli import synthetic as synthetic_cli
from megatron_t2i.data import synthetic
from megatron_t2i.data.synthetic import BACKGROUNDS, COLOURS, make_example, write_dataset

# Written here independently of the generator: what a reader expects each attribute to be called.
ZH_COLOUR = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
             "orange": "橙色", "white": "白色", "black": "黑色", "gray": "灰色", "pink": "粉色",
             "brown": "棕色", "cyan": "青色"}
ZH_KIND = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字形"}
ZH_SIZE = {"small": "小", "large": "大"}
ZH_POSITION = {(0, 0): "左上角", (0, 1): "上方", (0, 2): "右上角", (1, 0): "左边", (1, 1): "中间",
               (1, 2): "右边", (2, 0): "左下角", (2, 1): "下方", (2, 2): "右下角"}
EN_POSITION = {(0, 0): "top left", (0, 1): "top middle", (0, 2): "top right",
               (1, 0): "middle left", (1, 1): "centre", (1, 2): "middle right",
               (2, 0): "bottom left", (2, 1): "bottom middle", (2, 2): "bottom right"}
EN_SIZE = {"small": ("small", "little"), "large": ("large", "big")}


def test_same_index_and_seed_give_the_same_example_in_any_order():
    forward = [make_example(i, seed=3) for i in range(6)]
    backward = [make_example(i, seed=3) for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward):
        assert a.caption == b.caption and a.attributes == b.attributes
        assert a.image.tobytes() == b.image.tobytes()
    other = [make_example(i, seed=4) for i in range(6)]
    assert sum(a.caption != b.caption for a, b in zip(forward, other)) >= 5
    assert sum(a.image.tobytes() != b.image.tobytes() for a, b in zip(forward, other)) >= 5


def _cell(row, col, n):
    """Pixel slices of grid cell (row, col) in an n x n image."""
    return (slice(int(row * n / 3), int((row + 1) * n / 3)), slice(int(col * n / 3), int((col + 1) * n / 3)))


def _expected_coverage(kind, size_frac, row, col, n, sub=8):
    """Share of each pixel of the cell inside the shape, [h, w] in [0, 1], from an analytic inside
    test at sub x sub points per pixel (the star is left out: not analytic)."""
    rows, cols = _cell(row, col, n)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    cx, cy, r = (col + 0.5) * n / 3, (row + 0.5) * n / 3, size_frac * n / 3 / 2
    dy = (rows.start + (np.arange(h * sub) + 0.5) / sub - cy)[:, None]   # [h*sub, 1]
    dx = (cols.start + (np.arange(w * sub) + 0.5) / sub - cx)[None, :]   # [1, w*sub]
    if kind == "circle":
        inside = dx ** 2 + dy ** 2 <= r ** 2
    elif kind == "square":
        inside = (abs(dx) <= r) & (abs(dy) <= r)
    elif kind == "triangle":  # apex up at cy - r, base from cx - r to cx + r at cy + r
        inside = (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2)
    else:
        assert kind == "cross"  # arms a third of the side wide
        inside = ((abs(dx) <= r / 3) & (abs(dy) <= r)) | ((abs(dy) <= r / 3) & (abs(dx) <= r))
    return inside.reshape(h, sub, w, sub).mean(axis=(1, 3))


def test_every_shape_is_drawn_where_and_as_the_attributes_say():
    n = 96
    for index in range(150):
        ex = make_example(index, seed=1, image_size=n)
        assert ex.image.mode == "RGB" and ex.image.size == (n, n)
        pixels = np.asarray(ex.image).astype(np.float64)  # [n, n, 3]
        bg = np.array(BACKGROUNDS[ex.attributes["background"]], dtype=np.float64)
        occupied = set()
        for shape in ex.attributes["shapes"]:
            row, col = shape["row"], shape["col"]
            occupied.add((row, col))
            colour = np.array(COLOURS[shape["colour"]], dtype=np.float64)
            y, x = int((row + 0.5) * n / 3), int((col + 0.5) * n / 3)
            assert np.abs(pixels[y, x] - colour).max() <= 2, (index, shape)  # the centre: exact colour
            # share of the shape colour in each pixel of the cell (edges are anti-aliased blends)
            crop = pixels[_cell(row, col, n)]
            drawn = np.clip((crop - bg) @ (colour - bg) / ((colour - bg) @ (colour - bg)), 0, 1)
            frac = {"small": 0.45, "large": 0.8}[shape["size"]]
            if shape["kind"] == "star":  # five points cover about a third of the bounding square
                assert 0.25 < drawn.sum() / (frac * n / 3) ** 2 < 0.42, (index, shape)
                continue
            # the drawn shape matches the named kind and size best of all candidates (soft IoU)
            iou = {}
            for kind in ("circle", "square", "triangle", "cross"):
                for size, f in (("small", 0.45), ("large", 0.8)):
                    want = _expected_coverage(kind, f, row, col, n)
                    iou[kind, size] = np.minimum(drawn, want).sum() / np.maximum(drawn, want).sum()
            named = (shape["kind"], shape["size"])
            assert max(iou, key=iou.get) == named and iou[named] > 0.9, (index, shape, iou)
        for row in range(3):
            for col in range(3):
                if (row, col) not in occupied:  # empty cells show only the background
                    assert (pixels[_cell(row, col, n)] == bg).all(), (index, row, col)
        assert 1 <= len(occupied) == len(ex.attributes["shapes"]) <= 2  # never two in one cell


def test_captions_name_every_attribute_bound_to_its_shape():
    for index in range(300):
        ex = make_example(index, seed=2, chinese_fraction=0.5)
        a, text = ex.attributes, ex.caption
        assert json.loads(json.dumps(a)) == a  # JSON-serialisable
        if a["language"] == "en":
            assert a["background"] in text and "background" in text
            for s in a["shapes"]:
                assert any(f"{word} {s['colour']} {s['kind']}" in text for word in EN_SIZE[s["size"]]), text
                assert EN_POSITION[s["row"], s["col"]] == s["position"] and s["position"] in text, text
        else:
            assert a["language"] == "zh"
            assert ZH_COLOUR[a["background"]] + "背景" in text or "背景是" + ZH_COLOUR[a["background"]] in text
            for s in a["shapes"]:
                colour, kind, size = ZH_COLOUR[s["colour"]], ZH_KIND[s["kind"]], ZH_SIZE[s["size"]]
                assert f"{colour}的{size}{kind}" in text or f"{size}的{colour}{kind}" in text, text
                assert ZH_POSITION[s["row"], s["col"]] in text, text
        if len(a["shapes"]) == 2:
            assert " and " in text or "，" in text


def test_captions_name_the_shapes_in_reading_order_by_default_or_in_any_order():
    drawn_first_named_first = {"reading": set(), "random": set()}
    for order, seen in drawn_first_named_first.items():
        for index in range(300):
            ex = make_example(index, seed=2, chinese_fraction=0.5, caption_order=order)
            shapes = ex.attributes["shapes"]
            if len(shapes) != 2:
                continue
            zh = ex.attributes["language"] == "zh"
            where = [ex.caption.index(synthetic.ZH[s["position"]] if zh else s["position"])
                     for s in shapes]
            assert where[0] < where[1], ex.caption  # "shapes" lists them in the caption's order
            seen.add((shapes[0]["row"], shapes[0]["col"]) < (shapes[1]["row"], shapes[1]["col"]))
    assert drawn_first_named_first == {"reading": {True}, "random": {True, False}}
    for index in range(30):  # the caption order changes the caption, never the picture
        a, b = (make_example(index, seed=2, caption_order=o) for o in ("reading", "random"))
        assert a.image.tobytes() == b.image.tobytes()
        key = lambda s: (s["row"], s["col"])  # noqa: E731
        assert sorted(a.attributes["shapes"], key=key) == sorted(b.attributes["shapes"], key=key)
    with pytest.raises(ValueError, match="caption_order must be one of reading, random"):
        make_example(0, caption_order="alphabetical")


def test_chinese_captions_appear_at_the_configured_fraction():
    def zh_count(fraction, n=500):
        examples = [make_example(i, seed=5, chinese_fraction=fraction) for i in range(n)]
        for ex in examples:
            has_cjk = any("\u4e00" <= ch <= "\u9fff" for ch in ex.caption)
            assert has_cjk == (ex.attributes["language"] == "zh"), ex.caption
        return sum(ex.attributes["language"] == "zh" for ex in examples)
    assert 70 <= zh_count(0.2) <= 130  # binomial(500, 0.2): 100 +- 3 sigma
    assert zh_count(0.0, 100) == 0 and zh_count(1.0, 100) == 100


def test_variety():
    examples = [make_example(i, seed=0) for i in range(500)]
    assert len({ex.caption for ex in examples}) >= 480
    shapes = [s for ex in examples for s in ex.attributes["shapes"]]
    assert {s["colour"] for s in shapes} == set(COLOURS)
    assert {s["kind"] for s in shapes} == {"circle", "square", "triangle", "star", "cross"}
    assert {(s["row"], s["col"]) for s in shapes} == set(EN_POSITION)
    assert {ex.attributes["background"] for ex in examples} == set(BACKGROUNDS)
    assert {len(ex.attributes["shapes"]) for ex in examples} == {1, 2}


def test_write_dataset_is_complete_idempotent_and_refuses_other_data(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    path = write_dataset(str(out), 12, seed=7, image_size=32, progress=False)
    assert path == str(out)
    lines = (out / "attributes.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    for index, line in enumerate(lines):
        record, ex = json.loads(line), make_example(index, 7, 32)
        assert record == {"file": f"{index:06d}.png", "caption": ex.caption, "attributes": ex.attributes}
        assert (out / f"{index:06d}.txt").read_text(encoding="utf-8") == ex.caption
        from PIL import Image
        with Image.open(out / f"{index:06d}.png") as im:
            assert im.tobytes() == ex.image.tobytes()
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["seed"], meta["count"], meta["image_size"], meta["chinese_fraction"],
            meta["caption_order"]) == (7, 12, 32, 0.2, "reading")
    assert "format" in meta

    # the same parameters: returned as is, nothing regenerated
    def boom(*a, **k):
        raise AssertionError("regenerated an existing data set")
    monkeypatch.setattr(synthetic, "make_example", boom)
    assert write_dataset(str(out), 12, seed=7, image_size=32, progress=False) == str(out)
    monkeypatch.undo()

    # different parameters, or a folder of someone else's files: a clear error, nothing deleted
    for other in ({"count": 13}, {"count": 12, "caption_order": "random"}):
        with pytest.raises(ValueError, match="already holds other data"):
            write_dataset(str(out), seed=7, image_size=32, progress=False, **other)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds other data"):
        write_dataset(str(mine), 3, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me" and len(os.listdir(out)) == 12 * 2 + 2

    # an empty folder is fine to fill
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dataset(str(empty), 2, image_size=16, progress=False)
    assert (empty / "dataset.json").exists()


def test_write_dataset_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    real = synthetic.make_example

    def fail_at_5(index, *a, **k):
        if index == 5:
            raise RuntimeError("disk full")
        return real(index, *a, **k)
    monkeypatch.setattr(synthetic, "make_example", fail_at_5)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(str(tmp_path / "syn"), 10, image_size=16, progress=False)
    assert os.listdir(tmp_path) == []  # neither a half-written data set nor a temporary folder


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    synthetic_cli.main(["--synthetic-dir", str(out), "--synthetic-count", "4", "--seed", "3",
                    "--image-size", "24", "--chinese-fraction", "0.5", "--caption-order", "random"])
    assert str(out) in capsys.readouterr().out
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["count"], meta["seed"], meta["image_size"], meta["chinese_fraction"],
            meta["caption_order"]) == (4, 3, 24, 0.5, "random")
    with pytest.raises(SystemExit) as e:
        synthetic_cli.main(["--synthetic-dir", str(out), "--synthetic-count", "5"])
    assert "already holds other data" in str(e.value.code) and "\n" not in str(e.value.code)
