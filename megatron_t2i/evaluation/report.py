"""The evaluation report: report.json (every figure), report.md (the same for people) and grid.png
(one row per prompt: the ground-truth picture, the samples with a green or red bar for "the reader
found everything the caption names", and the caption).
"""
from __future__ import annotations

import io
import math
import os

import torch
from PIL import Image, ImageDraw, ImageFont

from megatron_t2i.evaluation.binding import DIRECTIONS, ORDERS
from megatron_t2i.io_utils import write_bytes_atomic, write_json_atomic, write_text_atomic

FORMAT = "megatron_t2i.evaluation/1"
TILE = 96          # pixels per image in the grid (small images are scaled up, pixel for pixel)
PAD = 4
BAR = 5            # height of the pass/fail bar under a sample
TEXT_WIDTH = 420   # pixels for the caption beside a row
PASS, FAIL, BLANK = (40, 170, 60), (210, 40, 40), (255, 255, 255)


def describe(attributes: dict) -> str:
    """Attributes in short English: 'small red circle top left, large blue star centre; gray
    background' (what the grid shows for captions the default font cannot draw)."""
    shapes = ", ".join(f"{s['size']} {s['colour']} {s['kind']} {s['position']}"
                       for s in attributes["shapes"]) or "no shape"
    return f"{shapes}; {attributes['background']} background"


def to_pil(image) -> Image.Image:
    """PIL image or [3, H, W] tensor in [0, 1] -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


def _wrap(text: str, font, width: int, max_lines: int = 4) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [lines[max_lines - 1] + " ..."]
    return lines


def grid_image(rows: list[dict], label: str = "samples") -> Image.Image:
    """rows: [{"caption": str, "attributes": dict, "target": image or None,
    "samples": [image, ...], "ok": [bool per sample]}] -> one RGB image, a row per prompt:
    target | samples (bar under each: green = every check passed) | caption."""
    font = ImageFont.load_default(size=13)
    columns = max(len(r["samples"]) for r in rows) + 1
    row_h = TILE + BAR + 2 * PAD
    header = 20
    width = columns * (TILE + PAD) + PAD + TEXT_WIDTH
    grid = Image.new("RGB", (width, header + len(rows) * row_h), BLANK)
    draw = ImageDraw.Draw(grid)
    draw.text((PAD, 4), "target", fill=(0, 0, 0), font=font)
    draw.text((PAD + TILE + PAD, 4), f"{label} (bar: green = caption fully found)", fill=(0, 0, 0),
              font=font)
    for r, row in enumerate(rows):
        y = header + r * row_h + PAD
        tiles = [row.get("target")] + list(row["samples"])
        for c, image in enumerate(tiles):
            if image is None:
                continue
            x = PAD + c * (TILE + PAD)
            grid.paste(to_pil(image).resize((TILE, TILE), Image.Resampling.NEAREST), (x, y))
            if c > 0:
                draw.rectangle([x, y + TILE + 1, x + TILE - 1, y + TILE + BAR],
                               fill=PASS if row["ok"][c - 1] else FAIL)
        caption = row["caption"]
        if not caption.isascii():  # the default font has no CJK glyphs: show the attributes
            caption = "(" + row["attributes"].get("language", "other") + ") " + describe(row["attributes"])
        x = PAD + columns * (TILE + PAD)
        for i, line in enumerate(_wrap(caption, font, TEXT_WIDTH - 2 * PAD)):
            draw.text((x, y + 4 + 16 * i), line, fill=(0, 0, 0), font=font)
    return grid


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


ALIGNMENT_KEYS = ("colour", "kind", "size", "position", "count", "background", "overall", "exact")


def markdown(report: dict, grid_name: str | None, shown_rows: int = 0) -> str:
    """report.json's figures as Markdown; the captions of the first `shown_rows` rows (those of
    the grid) and the rows with failed checks."""
    out = ["# Evaluation", ""]
    src = report["source"]
    out += [f"- {k.replace('_', ' ')}: {_fmt(v)}" for k, v in src.items() if v is not None] + [""]

    scored = "given images" if "images" in src else "generated samples"
    alignments = {name: report[key] for name, key in (
        (scored, "alignment"), (f"{scored}, reranked: {src.get('reranked')}", "alignment_reranked"),
        (f"{scored} vs other captions (chance)", "alignment_other_captions"),
        ("ground truth (reader check)", "reader_check_clean"),
        ("ground truth through the tokenizer", "reader_check_reconstructed")) if report.get(key)}
    if alignments:
        out += ["## Caption alignment", "",
                "Share of what the captions name that the attribute reader finds in the images "
                "(colour, kind and size count only where a shape is at the named position; count: "
                "same number of shapes; exact: every check of an image passed). Chance: the same "
                "images scored against other images' captions. Ground truth: the captions' own "
                "pictures, as drawn and after the tokenizer's round trip -- how far the reader "
                "can be trusted, and the most a model could score through this tokenizer.", ""]
        out += _table(["images"] + list(ALIGNMENT_KEYS) + ["n"],
                      [[name] + [a.get(k) for k in ALIGNMENT_KEYS] + [a.get("images")]
                       for name, a in alignments.items()]) + [""]
    if report.get("alignment_by_caption"):
        out += ["### By kind of caption", "", f"The same figures per language and number of shapes "
                f"({src.get('reranked') or 'every sample'}).", ""]
        out += _table(["captions"] + list(ALIGNMENT_KEYS) + ["n"],
                      [[name] + [a.get(k) for k in ALIGNMENT_KEYS] + [a.get("images")]
                       for name, a in report["alignment_by_caption"].items()]) + [""]
    if report.get("binding"):
        out += ["## Binding (swap test)", "",
                "Held-out two-shape pictures whose shapes differ in the attribute: share of pairs "
                "where the model finds the picture more likely with its own caption than with the "
                "two shapes' words swapped (text->image: log p(picture | caption); image->text: "
                "log p(caption | picture)). Chance 0.5. Split by whether the caption names first "
                "the shape whose cell comes first row by row: binding by order instead of by "
                "content scores near 1 there and near 0 in reverse.", ""]
        rows = [[f"{attribute}, {direction}"] + [r[direction][o] for o in ORDERS]
                for attribute, r in report["binding"].items() for direction in DIRECTIONS
                if direction in r]
        pairs = {a: r["pairs"] for a, r in report["binding"].items()}
        out += _table(["attribute, direction", *ORDERS], rows) + [""]
        out += ["Pairs: " + "; ".join(f"{a} {', '.join(f'{n} {o}' for o, n in p.items())}"
                                      for a, p in pairs.items()), ""]
    if report.get("clip"):
        c = report["clip"]
        out += ["## CLIP", "",
                f"In the space of the CLIP trained here ({_fmt(c.get('path'))}): CLIP score, the mean "
                f"cosine of a sample and its caption; R-precision, the share of samples whose "
                f"caption is the closest among {c['candidates']} held-out captions.", ""]
        rows = [["all samples", c["clip_score"], c["r_precision"], c["samples"]]]
        if "clip_score_reranked" in c:
            rows.append([f"reranked ({src.get('reranked')})", c["clip_score_reranked"],
                         c["r_precision_reranked"], None])
        out += _table(["samples", "CLIP score", "R-precision", "n"], rows) + [""]
        h = c["clip_heldout"]
        out += ["The CLIP on held-out pairs (the captions' own pictures): retrieval R@1 / R@5 "
                "among all of them and among groups of 100, and the cosine gap.", ""]
        out += _table(["", "R@1 all", "R@5 all", "R@1 among 100", "R@5 among 100"],
                      [[d.replace("_to_", "->"), h[f"{d}_r1_all"], h[f"{d}_r5_all"],
                        h.get(f"{d}_r1_among_100"), h.get(f"{d}_r5_among_100")]
                       for d in ("text_to_image", "image_to_text")]) + [""]
        out += [f"Paired cosine {_fmt(h['paired_cosine'])}, unpaired {_fmt(h['unpaired_cosine'])}, "
                f"gap {_fmt(h['cosine_gap'])} ({h['pairs']} pairs).", ""]
    if report.get("fid"):
        out += ["## FID and KID", "",
                "Distances between the samples and the held-out pictures, in the feature space "
                "of a network trained here (no Inception weights: megatron_t2i/evaluation/fid.py); "
                "the floor is the held-out pictures through the image tokenizer. Lower is closer; "
                "figures compare within one network only.", ""]
        out += _table(["network", "images", "FID", "KID", "KID std", "generated", "held-out"],
                      [[name, which, r["fid"], r["kid"], r["kid_std"], r["generated"], r["real"]]
                       for name, f in report["fid"].items()
                       for which, r in (("samples", f["samples"]),
                                        ("tokenizer floor", f["tokenizer_floor"]))]) + [""]
    if report.get("speed"):
        v = report["speed"]
        out += ["## Sampling speed", "",
                f"{v['images']} samples on {v['device']} ({v['threads']} threads): "
                f"{_fmt(v['images_per_s'])} images/s drawn (KV-cached decoding, batches of the "
                f"samples of one caption), {_fmt(v['images_per_s_with_reranking'])} images/s "
                f"with their reranking ({_fmt(v['drawing_s'])} s + {_fmt(v['reranking_s'])} s).",
                ""]
    if report.get("diversity"):
        d = report["diversity"]
        out += ["## Diversity", "",
                f"Mean RMS pixel distance between two samples of one prompt: "
                f"{_fmt(d['pairwise_distance'])}; pairs farther apart than {d['threshold']}: "
                f"{_fmt(d['distinct_pairs'])}.", ""]
    if report.get("tokenizer"):
        t = report["tokenizer"]
        out += ["## Image tokenizer (held-out images)", ""]
        out += _table(["PSNR (dB)", "SSIM", "code usage", "perplexity", "codebook", "images"],
                      [[t["psnr"], t["ssim"], t["code_usage"], t["perplexity"], t["codebook_size"],
                        t["images"]]]) + [""]
    if report.get("heldout_loss") and "patches" in report["heldout_loss"]:
        h = report["heldout_loss"]
        out += ["## Held-out denoising loss (x0 MSE per latent channel)", ""]
        out += _table(["loss", "sigma < 0.5", "sigma >= 0.5", "patches", "records"],
                      [[h["loss"], h.get("x0_loss_low_noise", "-"),
                        h.get("x0_loss_high_noise", "-"), h["patches"], h["records"]]]) + [""]
    elif report.get("heldout_loss"):
        h = report["heldout_loss"]
        out += ["## Held-out token loss", ""]
        out += _table(["image loss", "text loss", "loss", "image targets", "text targets", "records"],
                      [[h["image_loss"], h["text_loss"], h["loss"], h["image_targets"],
                        h["text_targets"], h["records"]]]) + [""]
    if grid_name:
        out += ["## Examples", "", f"![examples]({grid_name})", ""]
    rows = report.get("rows") or []
    if shown_rows:
        out += _table(["#", "caption", "passed"],
                      [[i + 1, _cell(r["caption"]), f"{sum(r['ok'])}/{len(r['ok'])}"]
                       for i, r in enumerate(rows[:shown_rows])]) + [""]
    failed = [(i, r, found) for i, r in enumerate(rows) for ok, found in zip(r["ok"], r["found"])
              if not ok]
    if failed:
        out += [f"## Images not fully matching their caption ({len(failed)}, first 20)", ""]
        out += _table(["#", "caption", "the reader found"],
                      [[i + 1, _cell(describe(r["attributes"])), _cell(describe(found))]
                       for i, r, found in failed[:20]]) + [""]
    return "\n".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "/")


def write_report(out_dir: str, report: dict, grid_rows: list[dict] | None = None,
                 grid_label: str = "samples") -> dict:
    """Write report.json, report.md and (with grid_rows, see grid_image) grid.png into out_dir,
    each atomically. Returns {"json", "markdown", "grid"} paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"),
             "markdown": os.path.join(out_dir, "report.md"), "grid": None}
    if grid_rows:
        buf = io.BytesIO()
        grid_image(grid_rows, grid_label).save(buf, format="PNG")
        paths["grid"] = os.path.join(out_dir, "grid.png")
        write_bytes_atomic(paths["grid"], buf.getvalue())
    report = {"format": FORMAT, **report, "grid": "grid.png" if grid_rows else None}
    write_json_atomic(paths["json"], _finite(report))
    write_text_atomic(paths["markdown"], markdown(report, report["grid"], len(grid_rows or ())))
    return paths


def _finite(obj):
    """NaN/inf -> None (strict JSON has neither), tensors -> lists, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if torch.is_tensor(obj):
        return _finite(obj.tolist())
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
