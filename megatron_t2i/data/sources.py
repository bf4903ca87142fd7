"""Where preprocessing's examples come from: folders, TSV, JSONL and webdataset shards.

Inputs (the source key of an example names it in the data set and in the skipped-record report):
  - a folder: every image (png, jpg, jpeg, webp, bmp, gif, tif, tiff) with a caption in a `.txt`
    of the same stem beside it, searched recursively; key: the image path relative to the folder;
  - a TSV file: `path<TAB>caption` per line, paths relative to the TSV's folder (an optional
    first line `path<TAB>caption` is a header);
  - a JSONL file: `{"path": ..., "caption": ...}` per line ("image" and "text" also accepted);
  - webdataset / img2dataset shards: a `.tar`, a brace pattern (`shards/{00000..00099}.tar`,
    several patterns separated by `::`), or a folder holding `.tar` files (img2dataset's output
    folder). Each sample's image is its jpg/jpeg/png/webp/... member, its caption its `txt`
    member or the "caption" (or "text") of its `json` member. Shards are streamed, never
    unpacked; key: `<shard path relative to the shards' common folder>/<member name>`.
The same image listed again (e.g. several captions) gets the key `path#1`, `path#2`...
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterator

import braceexpand
from webdataset import tariterators

from megatron_t2i.data.images import BadInput

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
    data: bytes | None = None         # the image file's bytes (shards), read instead of `image`


# ---- listing the inputs -------------------------------------------------------------------------
def list_sources(input_path: str) -> tuple[list[Source], list[tuple[str, str, str]]]:
    """-> (usable-looking sources, skipped [(key, reason, detail)]) of a folder, TSV or JSONL
    (shards are streamed instead: see shard_examples)."""
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



# ---- webdataset shards ------------------------------------------------------------------------
UNREADABLE_SHARD = "unreadable shard"
CAPTION_SUFFIXES = ("txt", "json")


def is_shards(input_path: str) -> bool:
    """A .tar, a brace pattern or a folder of .tar files (rather than a folder of images)."""
    if input_path.endswith(".tar") or "{" in input_path or "::" in input_path:
        return True
    return os.path.isdir(input_path) and bool(glob.glob(os.path.join(glob.escape(input_path), "*.tar")))


def expand_shards(input_path: str) -> list[str]:
    """The shard files of `input_path` (see the module docstring), each checked to exist."""
    if os.path.isdir(input_path):
        paths = sorted(glob.glob(os.path.join(glob.escape(input_path), "*.tar")))
    else:
        paths = [p for pattern in input_path.split("::") for p in braceexpand.braceexpand(pattern)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--input {input_path}: {len(missing)} of {len(paths)} shards do "
                                f"not exist (e.g. {missing[0]})")
    if not paths:
        raise ValueError(f"--input {input_path}: no .tar shards")
    if len(set(map(os.path.realpath, paths))) != len(paths):
        raise ValueError(f"--input {input_path}: names a shard twice")
    return paths


def shard_names(paths: list[str]) -> list[str]:
    """Shard paths relative to their common folder: the first part of their examples' keys."""
    paths = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def count_shard_images(path: str) -> int:
    """Samples with an image in a shard, from the tar headers alone (for progress totals)."""
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar if m.isfile()]
    except (tarfile.TarError, OSError, EOFError):
        return 0  # streaming it will say what is wrong
    return len({_split(n)[0] for n in names if _split(n)[1].lower() in IMAGE_SUFFIXES})


IMAGE_SUFFIXES = {ext[1:] for ext in IMAGE_EXTENSIONS}


def _split(name: str) -> tuple[str, str]:
    """'dir/000012.jpg' -> ('dir/000012', 'jpg'); webdataset's rule: the suffix starts at the
    first dot of the base name."""
    prefix, suffix = tariterators.base_plus_ext(name)
    return (prefix or name), (suffix or "")


def shard_examples(path: str, name: str) -> Iterator["Source | tuple"]:
    """Stream one shard: a Source per usable-looking sample, ("skip", key, reason, detail) per
    sample without an image or caption, and one skip for the shard if it cannot be read to its
    end (the samples before the damage are kept)."""
    try:
        with open(path, "rb") as f:
            files = tariterators.tar_file_expander([{"url": path, "stream": f}], eof_value=None)
            for sample in tariterators.group_by_keys(files):
                yield _shard_example(sample, name)
    except Exception as e:  # tarfile.ReadError, a truncated member, duplicate names...
        yield "skip", name, UNREADABLE_SHARD, f"{type(e).__name__}: {e}"


def _shard_example(sample: dict, shard: str):
    images = sorted(k for k in sample if k.lower() in IMAGE_SUFFIXES)
    base = f"{shard}/{sample['__key__']}"
    if not images:
        return "skip", base, MISSING_IMAGE, "no image member in the sample"
    key = f"{base}.{images[0]}"
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8-sig")
        except UnicodeDecodeError:
            return "skip", key, NOT_UTF8, f"{base}.txt"
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "skip", key, MALFORMED, f"{base}.json is not JSON"
        caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
        if not isinstance(caption, str):
            return "skip", key, MISSING_CAPTION, f'{base}.json has no "caption"'
    else:
        return "skip", key, MISSING_CAPTION, "no txt or json member in the sample"
    return Source(key, key, caption=caption, data=sample[images[0]])


def all_examples(input_path: str) -> Iterator[Source]:
    """Every usable-looking example of any input, in order (skipped ones left out): what the
    tokenizer and CLIP trainers read."""
    if not is_shards(input_path):
        yield from list_sources(input_path)[0]
        return
    paths = expand_shards(input_path)
    for path, name in zip(paths, shard_names(paths)):
        yield from (s for s in shard_examples(path, name) if isinstance(s, Source))
