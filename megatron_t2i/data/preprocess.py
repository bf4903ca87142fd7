"""Images with captions -> token data set (LMDB), in parallel, resumable, robust to bad input.

    python -m megatron_t2i.cli.preprocess --input data/synthetic --output data/tokens \
        --text-tokenizer text.model --image-tokenizer vqvae.pt --image-size 64 --workers 8

Inputs (the source key of an example is its image path relative to the input's folder):
  - a folder: every image (png, jpg, jpeg, webp, bmp, gif, tif, tiff) with a caption in a `.txt`
    of the same stem beside it, searched recursively;
  - a TSV file: `path<TAB>caption` per line, paths relative to the TSV's folder (an optional
    first line `path<TAB>caption` is a header);
  - a JSONL file: `{"path": ..., "caption": ...}` per line ("image" and "text" also accepted).
The same image listed again (e.g. several captions) gets the key `path#1`, `path#2`...

Worker processes read, convert (see images.py) and resize/crop the images and tokenize the
captions; the main process encodes batches with the VQ-VAE and commits them (see lmdb_store.py).
Killed at any point, a re-run of the same command continues where it stopped, and the result is
identical to an uninterrupted run's; once finished, a re-run with the same settings keeps the
data set (anything else already at --output is an error, never overwritten).

An input that cannot be used is skipped with a one-line warning naming it and the reason; the
counts per reason are printed at the end and stored in the data set's metadata (`report`), the
list in `skipped.tsv` inside the data set. Valid images in odd modes (RGBA, CMYK, grey, palette,
16-bit) are converted, not skipped.

With --sr-low-res each record also stores the codes of its image resized to half the side
(S/2 px -> (grid/2)^2 codes, the same VQ-VAE): the low-resolution input of super-resolution
training (pretrain.py --tasks super-resolution, see megatron_t2i/generation/tasks/super_resolution.py).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from tqdm.contrib.logging import logging_redirect_tqdm

from megatron_t2i.data.images import BadInput, load_rgb
from megatron_t2i.data.lmdb_store import LMDBWriter, TokenDataset, dataset_config, encode_record
from megatron_t2i.progress import progress_bar
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.tokenizers.text import TextTokenizer
from megatron_t2i.tokenizers.vqvae import VQVAE, ImageTokenizer

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# skip reasons (besides images.UNREADABLE and images.UNSUPPORTED)
MISSING_IMAGE = "missing image"
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
NOT_UTF8 = "caption not UTF-8"
MALFORMED = "malformed line"


@dataclass(frozen=True)
class Source:
    key: str                          # image path relative to the input's folder
    image: str                        # path of the image file
    caption: str | None = None        # the caption (TSV, JSONL) ...
    caption_file: str | None = None   # ... or the file holding it (folder input)


# ---- listing the inputs -------------------------------------------------------------------------
def list_sources(input_path: str) -> tuple[list[Source], list[tuple[str, str, str]]]:
    """-> (usable-looking sources, skipped [(key, reason, detail)]) of a folder, TSV or JSONL."""
    if os.path.isdir(input_path):
        return _list_folder(input_path)
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input {input_path}: no such folder or file")
    ext = os.path.splitext(input_path)[1].lower()
    if ext not in (".tsv", ".jsonl"):
        raise ValueError(f"--input {input_path}: expected a folder, a .tsv or a .jsonl file")
    sources, skipped = [], []
    root, name = os.path.dirname(os.path.abspath(input_path)), os.path.basename(input_path)
    parse = _parse_tsv_line if ext == ".tsv" else _parse_jsonl_line
    with open(input_path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                path, caption = parse(raw, lineno)
            except ValueError as e:
                skipped.append((f"{name}:{lineno}", MALFORMED, str(e)))
                continue
            if path is None:  # header
                continue
            key = os.path.normpath(path)
            if caption is None:
                skipped.append((key, NOT_UTF8, f"{name} line {lineno}"))
                continue
            sources.append(Source(key, os.path.join(root, path), caption=caption))
    return _unique_keys(sources), skipped


def _parse_tsv_line(raw: bytes, lineno: int):
    """-> (path, caption or None if not UTF-8); (None, None) for a header."""
    if b"\t" not in raw:
        raise ValueError("expected path<TAB>caption")
    path, caption = raw.split(b"\t", 1)
    try:
        path = path.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError:
        raise ValueError("path is not UTF-8") from None
    if lineno == 1 and (path.lower(), caption.strip().lower()) in (("path", b"caption"),
                                                                   ("image", b"text")):
        return None, None
    if not path:
        raise ValueError("empty path")
    try:
        return path, caption.decode("utf-8")
    except UnicodeDecodeError:
        return path, None


def _parse_jsonl_line(raw: bytes, lineno: int):
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    path = obj.get("path", obj.get("image")) if isinstance(obj, dict) else None
    caption = obj.get("caption", obj.get("text")) if isinstance(obj, dict) else None
    if not isinstance(path, str) or not path or not isinstance(caption, str):
        raise ValueError('expected {"path": str, "caption": str} (or "image"/"text")')
    return path, caption


def _unique_keys(sources: list[Source]) -> list[Source]:
    seen = Counter()
    out = []
    for s in sources:
        n = seen[s.key]
        seen[s.key] += 1
        out.append(replace(s, key=f"{s.key}#{n}") if n else s)
    return out


def _list_folder(root: str):
    images, captions = {}, set()  # stem (relative, without extension) -> [relative image paths]
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):  # hidden files (.DS_Store, editor swap files) are not inputs
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)
            stem, ext = os.path.splitext(rel)
            if ext.lower() in IMAGE_EXTENSIONS:
                images.setdefault(stem, []).append(rel)
            elif ext.lower() == ".txt":
                captions.add(stem)
    sources, skipped = [], []
    for stem in sorted(images):
        for rel in sorted(images[stem]):
            if stem in captions:
                sources.append(Source(rel, os.path.join(root, rel),
                                      caption_file=os.path.join(root, stem + ".txt")))
            else:
                skipped.append((rel, MISSING_CAPTION, f"no {stem}.txt beside it"))
    for stem in sorted(captions - set(images)):
        skipped.append((stem + ".txt", MISSING_IMAGE, "caption without an image"))
    return sources, skipped


# ---- worker processes: read, convert, crop, tokenize --------------------------------------------
_WORKER: dict = {}


def _init_worker(text_tokenizer, image_config, image_size: int, max_text_tokens: int) -> None:
    torch.set_num_threads(1)
    # Only the cropping of ImageTokenizer is used here; a model on the meta device has the config
    # but no weights, so workers neither copy the VQ-VAE nor touch the accelerator.
    with torch.device("meta"):
        model = VQVAE(replace(image_config, image_size=image_size))
    _WORKER.update(text=text_tokenizer, pixels=ImageTokenizer(model), max_text=max_text_tokens)


def read_caption(source: Source) -> str:
    text = source.caption
    if source.caption_file is not None:
        try:
            with open(source.caption_file, "rb") as f:
                text = f.read().decode("utf-8-sig")
        except FileNotFoundError:
            raise BadInput(MISSING_CAPTION, f"{source.caption_file} disappeared") from None
        except UnicodeDecodeError as e:
            raise BadInput(NOT_UTF8, f"{source.caption_file}: {e}") from None
    text = " ".join(text.split())  # one line, single spaces
    if not text:
        raise BadInput(EMPTY_CAPTION, "no text")
    return text


def _load_example(source: Source):
    """-> ("ok", key, text_ids, truncated, pixels uint8 [3,S,S]) or ("skip", key, reason, detail)."""
    try:
        if not os.path.isfile(source.image):
            raise BadInput(MISSING_IMAGE, f"{source.image} not found")
        ids = _WORKER["text"].encode(read_caption(source))
        if not ids:
            raise BadInput(EMPTY_CAPTION, "caption has no tokens")
        pixels = _WORKER["pixels"].crop_uint8(load_rgb(source.image))
    except BadInput as e:
        return "skip", source.key, e.reason, e.detail
    limit = _WORKER["max_text"]
    return "ok", source.key, ids[:limit], len(ids) > limit, pixels.numpy()


# ---- the main process ---------------------------------------------------------------------------
@torch.no_grad()
def _encode(image_tokenizer: ImageTokenizer, pixels: list[np.ndarray]) -> np.ndarray:
    """uint8 [B,3,S,S] -> codes [B, grid*grid]; the VQ-VAE is convolutional, so S need not be the
    tokenizer's training size."""
    x = torch.from_numpy(np.stack(pixels)).to(image_tokenizer.device)
    return image_tokenizer.model.encode(image_tokenizer.normalize(x)).flatten(1).cpu().numpy()


def _clip_embed(clip, pixels: list[np.ndarray]) -> np.ndarray:
    """uint8 [3, S, S] images -> their unit CLIP embeddings [B, D] (resized to the CLIP's size)."""
    x = torch.from_numpy(np.stack(pixels))
    s = clip.config.image_size
    if x.shape[-1] != s:
        x = torch.nn.functional.interpolate(x.float(), size=(s, s), mode="bicubic",
                                            antialias=True).round().clamp(0, 255).byte()
    return clip.encode_pixels(x).numpy()


def half_resolution(pixels: np.ndarray) -> np.ndarray:
    """uint8 [3, S, S] -> uint8 [3, S/2, S/2], resampled as crop_uint8 resizes (antialiased bicubic)."""
    s = pixels.shape[-1] // 2
    image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    return np.array(image.resize((s, s), Image.Resampling.BICUBIC, reducing_gap=3.0)).transpose(2, 0, 1)


def load_image_tokenizer(path: str, device="cpu") -> ImageTokenizer:
    """Our checkpoint, else CogView's released file; the error of the first if neither."""
    try:
        return ImageTokenizer.load(path, device=device)
    except ValueError as ours:
        try:
            return ImageTokenizer.from_cogview(path, device=device)
        except ValueError:
            raise ours from None


def preprocess(input: str, output: str, text_tokenizer, image_tokenizer, max_text_tokens: int = 40,
               image_size: int | None = None, workers: int = 0, batch_size: int = 32,
               progress: bool = True, sr_low_res: bool = False,
               image_positions: str = "fixed", clip=None, image_order: str = "raster") -> dict:
    """Tokenize `input` into the data set `output`; returns the report (also in the metadata).

    text_tokenizer / image_tokenizer: objects or paths. image_size: pixels per side after
    resize and centre crop (default: the image tokenizer's). workers: processes reading images
    (0: in this process). batch_size: images per VQ-VAE batch and per committed transaction.
    sr_low_res: also store the codes of each image at half resolution (super-resolution data).
    image_positions, image_order: the layout's numbering of image positions and the order its
    sequences generate an image in (see TokenLayout; records keep raster codes). clip: a Clip
    (tokenizers/clip.py): each record also stores the unit CLIP embedding of its image as the
    float array "clip_image" (what language-free training, --tasks clip2image, reads)."""
    text_tok = TextTokenizer(text_tokenizer) if isinstance(text_tokenizer, str) else text_tokenizer
    image_tok = (load_image_tokenizer(image_tokenizer) if isinstance(image_tokenizer, str)
                 else image_tokenizer)
    image_size = image_size or image_tok.image_size
    try:
        layout = TokenLayout(num_image_codes=image_tok.codebook_size,
                             num_text_tokens=text_tok.vocab_size,
                             image_grid=image_tok.model.grid_size(image_size),
                             max_text_tokens=max_text_tokens, image_positions=image_positions,
                             image_order=image_order)
    except ValueError as e:
        raise ValueError(f"--image-size {image_size}: {e}") from None
    if sr_low_res and layout.image_grid % 2:
        raise ValueError(f"--sr-low-res: the code grid of --image-size {image_size} is "
                         f"{layout.image_grid}x{layout.image_grid}; half an image needs an even grid")
    low_res_grid = layout.image_grid // 2 if sr_low_res else 0
    config = dataset_config(layout, text_tok.sha256, image_tok.sha256, image_size, low_res_grid)
    if clip is not None:
        if clip.tokens.text.sha256 != text_tok.sha256:
            raise ValueError("--clip: a CLIP trained with another text tokenizer than "
                             "--text-tokenizer")
        config["clip_tokenizer_sha256"] = clip.sha256  # records depend on it: resume checks it
    extend = os.path.isdir(output)
    if extend:
        _check_existing(output, config, input)
    sources, listed_skips = list_sources(input)
    if extend:
        new = _new_inputs(output, input, sources, listed_skips)
        if not new:
            meta = TokenDataset(output).meta
            logger.info("%s is already complete (%d records of every input in %s); remove it to "
                        "tokenize again", output, meta["count"], input)
            return meta["report"]
        logger.info("%s: %d new inputs in %s (e.g. %s); adding them (the data set is rebuilt "
                    "with them and replaced when complete)", output, len(new), input, new[0])
    writer = LMDBWriter(output, config, extend=extend)
    try:
        done = writer.done_keys()
        todo = [s for s in sources if s.key not in done]
        pending_skips = [(k, r) for k, r, _ in listed_skips if k not in done]
        for key, reason, detail in listed_skips:
            if key not in done:
                logger.warning("skipped %s: %s (%s)", key, reason, detail)
        if done:
            logger.info("resuming %s: %d of %d inputs already done", writer.staging, len(done),
                        len(sources) + len(listed_skips))
        _run(writer, todo, pending_skips, text_tok, image_tok, layout, image_size, workers,
             batch_size, progress, low_res_grid > 0, clip)
        if not writer.record_count():
            raise ValueError(f"--input {input}: no usable example (skipped: "
                             f"{dict(Counter(r for _, r in writer.skipped_items()))})")
        # where the tokenizers were, so training can copy them beside its checkpoints
        tokenizers = {f"{name}_tokenizer_path": os.path.abspath(path) for name, path in
                      (("text", text_tok.model_path), ("image", image_tok.path),
                       ("clip", getattr(clip, "path", None))) if path}
        meta = writer.publish({"input": os.path.abspath(input),
                               "sources": len(sources) + len(listed_skips), **tokenizers})
    finally:
        writer.close()
    report = meta["report"]
    logger.info("wrote %d records to %s (layout.json inside); skipped %d: %s", report["written"],
                os.path.abspath(output), report["skipped_total"], report["skipped"] or "none")
    if report["skipped_total"]:
        logger.info("skipped inputs listed in %s", os.path.join(os.path.abspath(output), "skipped.tsv"))
    return report


def _check_existing(output: str, config: dict, input: str) -> None:
    """A finished data set at `output` may be kept or extended only if it was made from the same
    input with the same settings; anything else there is an error, never overwritten."""
    try:
        meta = TokenDataset(output).meta
    except (ValueError, OSError) as e:
        raise FileExistsError(f"{output} already exists and is not a readable token data set "
                              f"({e}); choose another --output") from None
    config = json.loads(json.dumps(config))
    differ = [k for k in config if meta.get(k) != config[k]]
    differ += ["input"] if meta.get("report", {}).get("input") != os.path.abspath(input) else []
    if differ:
        raise FileExistsError(f"{output} already exists with a different {', '.join(differ)}; "
                              f"remove it or choose another --output")


def _new_inputs(output: str, input: str, sources: list[Source], listed_skips) -> list[str]:
    """Keys of `input` that the data set at `output` has neither written nor skipped. Inputs it
    holds that are no longer listed are an error: a data set only grows."""
    dataset = TokenDataset(output)
    done = {dataset[i].key for i in range(len(dataset))}
    listing = os.path.join(output, "skipped.tsv")
    if os.path.isfile(listing):
        with open(listing, encoding="utf-8") as f:
            done |= {line.rsplit("\t", 1)[0] for line in f if "\t" in line}
    listed = {s.key for s in sources} | {k for k, _, _ in listed_skips}
    gone = sorted(done - listed)
    if gone:
        raise FileExistsError(f"{output}: {len(gone)} of the inputs it was made from are no longer "
                              f"in --input {input} (e.g. {gone[0]}); "
                              f"remove {output} to tokenize again")
    return sorted(listed - done)


def _run(writer, todo, skipped, text_tok, image_tok, layout, image_size, workers, batch_size,
         progress, sr_low_res: bool = False, clip=None) -> None:
    batch, truncated, n_skipped = [], 0, len(skipped)

    def flush():
        nonlocal batch, skipped, truncated
        records = []
        if batch:
            codes = _encode(image_tok, [pixels for _, _, pixels in batch])
            lows = _encode(image_tok, [half_resolution(pixels) for _, _, pixels in batch]) \
                if sr_low_res else [None] * len(batch)
            arrays = [{"clip_image": e} for e in _clip_embed(clip, [p for *_, p in batch])] \
                if clip is not None else [None] * len(batch)
            records = [(key, encode_record(ids, c, key, layout.num_image_codes, low, a))
                       for (key, ids, _), c, low, a in zip(batch, codes, lows, arrays)]
        writer.add(records, skipped, counts={"truncated_captions": truncated})
        batch, skipped, truncated = [], [], 0

    init = (text_tok, image_tok.config, image_size, layout.max_text_tokens)
    pool = multiprocessing.Pool(workers, _init_worker, init) if workers > 0 else None
    if pool is None:
        _init_worker(*init)
    try:
        if pool is None:
            results = map(_load_example, todo)
        else:  # chunks amortise the IPC; small enough that every worker gets some
            chunk = max(1, min(16, len(todo) // (4 * workers)))
            results = pool.imap_unordered(_load_example, todo, chunksize=chunk)
        bar = progress_bar(results, total=len(todo), unit="img", desc="preprocess",
                           disable=not progress, dynamic_ncols=True)
        with logging_redirect_tqdm():
            for result in bar:
                if result[0] == "skip":
                    _, key, reason, detail = result
                    n_skipped += 1
                    logger.warning("skipped %s: %s (%s) [%d skipped so far]", key, reason, detail,
                                   n_skipped)
                    skipped.append((key, reason))
                    continue
                _, key, ids, was_truncated, pixels = result
                batch.append((key, ids, pixels))
                truncated += was_truncated
                if len(batch) == batch_size:
                    flush()
            flush()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
