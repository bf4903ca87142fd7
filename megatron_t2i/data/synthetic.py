"""The embedded default data set: captioned images made procedurally.

Each image is a plain background with one or two shapes. Every shape has a colour, a kind, a size
and a cell of a 3x3 grid, and the caption names all of them (and the background), in English or
Chinese. Nothing in the picture is left to chance once the caption is known, so a model can only
draw the right picture by reading the caption, and an evaluator can check a generated image
against the ground-truth `attributes` by looking at the pixels of each named grid cell.

Caption order: by default ("reading") a caption names its shapes in reading order (top row first,
left to right), the order in which a text->image model draws their codes. With "random" a caption
names them in any order, and drawing the second-named shape first asks the model to find each
shape's colour by its position words: the demo model (4 layers, 20 minutes on a CPU) does not learn
that binding, it learns the reading order (see the README's evaluation section).

Checkable by construction:
  - shape colours, background colours: two disjoint palettes of clearly distinct RGB values
    (`COLOURS`, `BACKGROUNDS`, at least ~90 apart in RGB space);
  - every shape is centred on its grid cell and covers the cell centre, so the pixel at
    `cell_center(row, col, image_size)` has the shape's colour (large shapes cover a wide area
    around it: 80% of the cell side, small ones 45%);
  - two shapes never share a cell.

    python -m megatron_t2i.cli.synthetic --synthetic-dir data/synthetic --synthetic-count 2000
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from megatron_t2i.io_utils import ordinary_mode
from megatron_t2i.progress import progress_bar

FORMAT = "megatron_t2i.synthetic/1"

COLOURS = {  # shape colours: saturated primaries plus white and black
    "red": (230, 25, 25), "green": (20, 170, 40), "blue": (30, 60, 230), "yellow": (250, 220, 20),
    "purple": (140, 40, 180), "orange": (250, 130, 10), "white": (255, 255, 255), "black": (0, 0, 0),
}
BACKGROUNDS = {  # background colours, none of which is a shape colour
    "gray": (128, 128, 128), "pink": (250, 170, 200), "brown": (120, 70, 30), "cyan": (40, 200, 200),
}
KINDS = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.45, "large": 0.8}  # shape side as a fraction of the grid cell side
POSITIONS = (("top left", "top middle", "top right"),
             ("middle left", "centre", "middle right"),
             ("bottom left", "bottom middle", "bottom right"))

ZH = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
    "white": "白色", "black": "黑色", "gray": "灰色", "pink": "粉色", "brown": "棕色", "cyan": "青色",
    "circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字形",
    "small": "小", "large": "大",
    "top left": "左上角", "top middle": "上方中间", "top right": "右上角",
    "middle left": "左边中间", "centre": "正中间", "middle right": "右边中间",
    "bottom left": "左下角", "bottom middle": "下方中间", "bottom right": "右下角",
}
EN_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}

CAPTION_ORDERS = ("reading", "random")
SUPERSAMPLE = 4  # draw 4x larger, then box-filter down: anti-aliased edges, exact flat interiors


@dataclass
class Example:
    image: Image.Image  # RGB, image_size x image_size
    caption: str
    attributes: dict    # JSON-serialisable ground truth, see make_example


def cell_center(row: int, col: int, image_size: int) -> tuple[float, float]:
    """(x, y) in pixels of the centre of grid cell (row, col)."""
    cell = image_size / 3
    return ((col + 0.5) * cell, (row + 0.5) * cell)


# ---- drawing -------------------------------------------------------------------------------------
def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a polygonal shape of half-side r centred on (cx, cy)."""
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":  # pointing up, bounding box centred: the centre is inside (width r there)
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "star":  # five points, inner radius 0.45 r: the centre region is solid
        angles = np.pi * (np.arange(10) / 5 - 0.5)
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
    if kind == "cross":  # plus sign with arms one third of the side wide
        a = r / 3
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
                (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
                (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(KINDS)}")


def render(attributes: dict, image_size: int) -> Image.Image:
    """Draw the picture that `attributes` describes."""
    big = image_size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[attributes["background"]])
    draw = ImageDraw.Draw(image)
    for shape in attributes["shapes"]:
        cx, cy = cell_center(shape["row"], shape["col"], big)
        r = SIZES[shape["size"]] * big / 3 / 2
        fill = COLOURS[shape["colour"]]
        if shape["kind"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_polygon(shape["kind"], cx, cy, r), fill=fill)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


# ---- captions ------------------------------------------------------------------------------------
def _caption_en(attributes: dict, rng: np.random.Generator) -> str:
    parts = []
    for s in attributes["shapes"]:
        size = EN_SIZE_WORDS[s["size"]][rng.integers(2)]
        where = ("in the", "at the")[rng.integers(2)]
        parts.append(f"a {size} {s['colour']} {s['kind']} {where} {s['position']}")
    shapes = " and ".join(parts)
    bg = attributes["background"]
    template = rng.integers(4)
    if template == 0:
        return f"{shapes} on a {bg} background"
    if template == 1:
        return f"a {bg} background with {shapes}"
    if template == 2:
        return f"{shapes}. the background is {bg}."
    return f"a picture of {shapes} against a {bg} background"


def _caption_zh(attributes: dict, rng: np.random.Generator) -> str:
    parts = []
    for s in attributes["shapes"]:
        colour, kind, size, where = ZH[s["colour"]], ZH[s["kind"]], ZH[s["size"]], ZH[s["position"]]
        if rng.integers(2) == 0:
            parts.append(f"一个{colour}的{size}{kind}在{where}")
        else:
            parts.append(f"{where}有一个{size}的{colour}{kind}")
    shapes = "，".join(parts)
    bg = ZH[attributes["background"]]
    template = rng.integers(3)
    if template == 0:
        return f"{bg}背景上，{shapes}"
    if template == 1:
        return f"{shapes}，背景是{bg}"
    return f"一张{bg}背景的图片：{shapes}"


def make_example(index: int, seed: int = 0, image_size: int = 64,
                 chinese_fraction: float = 0.2, caption_order: str = "reading") -> Example:
    """The example number `index` of the data set `seed`; the same (index, seed) always gives the
    same example, whatever else is generated before or after it.

    attributes = {"background": "gray", "language": "en" | "zh",
                  "shapes": [{"colour": "red", "kind": "circle", "size": "large",
                              "row": 0, "col": 2, "position": "top right"}, ...]}  (1 or 2 shapes)
    The caption names the shapes in the order of "shapes" (see caption_order above); the picture
    does not depend on caption_order.
    """
    if not (isinstance(index, int) and index >= 0 and isinstance(seed, int) and seed >= 0):
        raise ValueError(f"synthetic: index and seed must be non-negative integers, got {index!r}, {seed!r}")
    if image_size < 8:
        raise ValueError(f"synthetic: image_size must be at least 8 pixels, got {image_size}")
    if not 0.0 <= chinese_fraction <= 1.0:
        raise ValueError(f"synthetic: chinese_fraction must be in [0, 1], got {chinese_fraction}")
    if caption_order not in CAPTION_ORDERS:
        raise ValueError(f"synthetic: caption_order must be one of {', '.join(CAPTION_ORDERS)}, "
                         f"got {caption_order!r}")
    rng = np.random.default_rng([seed, index])  # per-example stream: independent of count and order

    cells = rng.choice(9, size=rng.integers(1, 3), replace=False)
    shapes = [{"colour": str(rng.choice(list(COLOURS))), "kind": str(rng.choice(KINDS)),
               "size": str(rng.choice(list(SIZES))), "row": int(c // 3), "col": int(c % 3),
               "position": POSITIONS[c // 3][c % 3]} for c in cells]
    if caption_order == "reading":  # cells are drawn in random order; only the naming order changes
        shapes.sort(key=lambda s: (s["row"], s["col"]))
    language = "zh" if rng.random() < chinese_fraction else "en"
    attributes = {"background": str(rng.choice(list(BACKGROUNDS))), "language": language,
                  "shapes": shapes}
    caption = (_caption_zh if language == "zh" else _caption_en)(attributes, rng)
    return Example(render(attributes, image_size), caption, attributes)


# ---- writing a data set --------------------------------------------------------------------------
def read_meta(path: str) -> dict | None:
    """The parameters (dataset.json) of the data set written at path, None if there is none."""
    try:
        with open(os.path.join(path, "dataset.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def write_dataset(out_dir: str, count: int, seed: int = 0, image_size: int = 64,
                  chinese_fraction: float = 0.2, caption_order: str = "reading",
                  progress: bool = True) -> str:
    """Write `count` examples to out_dir as {index:06d}.png + {index:06d}.txt, attributes.jsonl
    (one line per index: file, caption, attributes) and dataset.json (the parameters).

    The folder appears complete or not at all: it is written as a temporary sibling and renamed at
    the end. An existing data set with the same parameters is returned as is; anything else already
    at out_dir is an error (we never delete user data).
    """
    if count <= 0:
        raise ValueError(f"synthetic: count must be positive, got {count}")
    out_dir = os.path.abspath(out_dir)
    meta = {"format": FORMAT, "seed": seed, "count": count, "image_size": image_size,
            "chinese_fraction": chinese_fraction, "caption_order": caption_order}

    def existing() -> str | None:
        """out_dir if it already holds this data set; raises if it holds something else."""
        if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
            return None
        found = read_meta(out_dir)
        if found != meta:
            raise ValueError(f"synthetic: {out_dir} already holds other data "
                             f"({'dataset.json ' + json.dumps(found) if found else 'no readable dataset.json'}); "
                             f"wanted {json.dumps(meta)}: choose another --synthetic-dir or remove it")
        return out_dir

    if existing():
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    os.chmod(tmp, ordinary_mode(0o777))  # mkdtemp's folders are private; this one is not
    try:
        with open(os.path.join(tmp, "attributes.jsonl"), "w", encoding="utf-8") as jsonl:
            for index in progress_bar(range(count), desc="synthetic images", unit="img",
                                      disable=not progress):
                ex = make_example(index, seed, image_size, chinese_fraction, caption_order)
                name = f"{index:06d}"
                ex.image.save(os.path.join(tmp, name + ".png"))
                with open(os.path.join(tmp, name + ".txt"), "w", encoding="utf-8") as f:
                    f.write(ex.caption)
                jsonl.write(json.dumps({"file": name + ".png", "caption": ex.caption,
                                        "attributes": ex.attributes}, ensure_ascii=False) + "\n")
        with open(os.path.join(tmp, "dataset.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)  # written last: its presence marks a complete folder
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process published first: fine if it wrote the same data set
            if not existing():
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out_dir
