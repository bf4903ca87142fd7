"""Images with captions -> token data set (LMDB): parallel, on many processes, resumable, robust.

    python -m megatron_t2i.cli.preprocess --input data/synthetic --output data/tokens \
        --text-tokenizer text.model --image-tokenizer vqvae.pt --image-size 64 --workers 8
    torchrun --nproc-per-node 8 -m megatron_t2i.cli.preprocess --input 'shards/{00000..00999}.tar' ...

Inputs: folders, TSV, JSONL and webdataset / img2dataset shards (see sources.py).

Worker processes read and convert the images (images.py: EXIF orientation, every mode to RGB, a
size limit against decompression bombs, a minimum side), fit them to the square (resize + centre
crop, or pad with --image-fit pad) and tokenize the captions; the main process encodes batches
with the VQ-VAE on its device and commits them (see lmdb_store.py). Killed at any point, a re-run
of the same command continues where it stopped, and the result is identical to an uninterrupted
run's; once finished, a re-run with the same settings keeps the data set (anything else already
at --output is an error, never overwritten).

Many processes (torchrun or the multi-node launcher set RANK and WORLD_SIZE): rank r of W takes
every W-th shard (or every W-th listed input) starting at the r-th and writes it to its own
staging environment `<out>.part<r>-of-<W>.partial`, then `<out>.part<r>-of-<W>.done`. Rank 0
waits for every part, merges them into `<out>` (key order, so the data set equals one process's
record for record) and removes them. The output's folder must be one that every rank reaches;
each part has a single writer and is read only after it is closed. Finished shards are not read
again on a re-run; one cut short continues after its last committed record. Rank 0's progress bar
counts the images of all ranks (each rank leaves its count in `<part>.progress`).

An input that cannot be used is skipped with a one-line warning naming it and the reason; the
counts per reason are printed at the end and stored in the data set's metadata (`report`), the
list in `skipped.tsv` and the whole report, with every skipped (file, reason), in `report.json`
inside the data set.

With --sr-low-res each record also stores the codes of its image resized to half the side
(S/2 px -> (grid/2)^2 codes, the same VQ-VAE): the low-resolution input of super-resolution
training (pretrain.py --tasks super-resolution, see megatron_t2i/generation/tasks/super_resolution.py).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass

import lmdb
import numpy as np
import torch
from PIL import Image
from tqdm.contrib.logging import logging_redirect_tqdm

from megatron_t2i.data.images import MAX_PIXELS, BadInput, load_rgb
from megatron_t2i.data.lmdb_store import LMDBWriter, TokenDataset, dataset_config, encode_record
from megatron_t2i.data.sources import (EMPTY_CAPTION, MISSING_IMAGE, Source, count_shard_images,
                                       expand_shards, is_shards, list_sources, read_caption,
                                       shard_examples, shard_names)
from megatron_t2i.io_utils import read_json, write_json_atomic
from megatron_t2i.progress import progress_bar
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.tokenizers.pixels import FITS
from megatron_t2i.tokenizers.text import TextTokenizer
from megatron_t2i.tokenizers.vqvae import ImageTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePolicy:
    """How a real photo becomes the square the tokenizer reads (see images.py, pixels.py)."""
    fit: str = "crop"               # crop: short side to S, centre crop; pad: long side, padded
    max_pixels: int = MAX_PIXELS    # larger images are skipped (decompression bombs)
    min_side: int | None = None     # smaller are skipped; None: a quarter of the image size

    def resolved(self, image_size: int) -> "ImagePolicy":
        if self.fit not in FITS:
            raise ValueError(f"--image-fit {self.fit}: expected one of {', '.join(FITS)}")
        if self.max_pixels < 1 or (self.min_side or 0) < 0:
            raise ValueError("--max-image-pixels must be positive and --min-image-side >= 0")
        side = max(1, image_size // 4) if self.min_side is None else self.min_side
        return ImagePolicy(self.fit, self.max_pixels, side)


@dataclass(frozen=True)
class ShardEnd:
    """Marks the end of a shard in the stream of examples: committed together with its last
    records, so a re-run skips the shard."""
    name: str


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from a launcher's environment (torchrun, deepspeed, mpirun)."""
    rank = os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    return int(rank), int(world)


# ---- worker processes: read, convert, fit, tokenize ---------------------------------------------
_WORKER: dict = {}


def _init_worker(text_tokenizer, image_size: int, max_text_tokens: int, policy: ImagePolicy) -> None:
    torch.set_num_threads(1)
    # Pillow refuses images above twice its own limit before ours is checked; ours decides
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, policy.max_pixels)
    _WORKER.update(text=text_tokenizer, size=image_size, max_text=max_text_tokens, policy=policy)


def _load_example(item):
    """Source -> ("ok", key, text_ids, truncated, pixels uint8 [3,S,S]) or ("skip", key, reason,
    detail); skips and shard ends decided while listing pass through."""
    if not isinstance(item, Source):
        return item
    policy = _WORKER["policy"]
    try:
        if item.data is None and not os.path.isfile(item.image):
            raise BadInput(MISSING_IMAGE, f"{item.image} not found")
        ids = _WORKER["text"].encode(read_caption(item))
        if not ids:
            raise BadInput(EMPTY_CAPTION, "caption has no tokens")
        image = load_rgb(item.image if item.data is None else item.data, policy.max_pixels,
                         policy.min_side)
        pixels = FITS[policy.fit](image, _WORKER["size"])
    except BadInput as e:
        return "skip", item.key, e.reason, e.detail
    limit = _WORKER["max_text"]
    return "ok", item.key, ids[:limit], len(ids) > limit, pixels.numpy()


def _load_chunk(items: list) -> list:
    return [_load_example(item) for item in items]


def _ordered_map(pool, items, chunk: int, window: int):
    """_load_example over `items` in order, in chunks on the pool, with at most `window` chunks
    in flight: a stream of shards is read as fast as the workers go, never into memory whole
    (Pool.imap would queue all of it)."""
    if pool is None:
        yield from map(_load_example, items)
        return
    pending, buf = deque(), []
    for item in items:
        buf.append(item)
        if len(buf) == chunk:
            pending.append(pool.apply_async(_load_chunk, (buf,)))
            buf = []
            if len(pending) >= window:
                yield from pending.popleft().get()
    if buf:
        pending.append(pool.apply_async(_load_chunk, (buf,)))
    while pending:
        yield from pending.popleft().get()


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
               image_positions: str = "fixed", clip=None, image_order: str = "raster",
               policy: ImagePolicy = ImagePolicy(), rank: int | None = None,
               world_size: int | None = None) -> dict | None:
    """Tokenize `input` into the data set `output`; returns the report (also in the metadata),
    or None on a rank other than 0 of a distributed run (rank 0 merges and reports).

    text_tokenizer / image_tokenizer: objects or paths. image_size: pixels per side after
    fitting (default: the image tokenizer's). workers: processes reading images (0: in this
    process). batch_size: images per VQ-VAE batch and per committed transaction.
    sr_low_res: also store the codes of each image at half resolution (super-resolution data).
    image_positions, image_order: the layout's numbering of image positions and the order its
    sequences generate an image in (see TokenLayout; records keep raster codes). clip: a Clip
    (tokenizers/clip.py): each record also stores the unit CLIP embedding of its image as the
    float array "clip_image" (what language-free training, --tasks clip2image, reads).
    policy: fitting and size limits of the images. rank, world_size: this process's share
    (default: from the launcher's environment)."""
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
    policy = policy.resolved(image_size)
    if policy != ImagePolicy().resolved(image_size):  # (the default is left out, as before it existed)
        config["image_policy"] = {"fit": policy.fit, "max_pixels": policy.max_pixels,
                                  "min_side": policy.min_side}
    if clip is not None:
        if clip.tokens.text.sha256 != text_tok.sha256:
            raise ValueError("--clip: a CLIP trained with another text tokenizer than "
                             "--text-tokenizer")
        config["clip_tokenizer_sha256"] = clip.sha256  # records depend on it: resume checks it
    rank, world = distributed_rank() if rank is None else (rank, world_size or 1)
    shards = expand_shards(input) if is_shards(input) else None
    names = shard_names(shards) if shards else None
    extend = os.path.isdir(output)
    if extend:
        _check_existing(output, config, input)
        meta = TokenDataset(output).meta
        if shards:
            _check_same_shards(output, input, names, meta)
        new = [] if shards else _new_inputs(output, input)
        if not new:
            if rank == 0:
                logger.info("%s is already complete (%d records of every input in %s); remove it "
                            "to tokenize again", output, meta["count"], input)
            return meta["report"] if rank == 0 else None
        if world > 1:
            raise FileExistsError(f"{output}: adding the {len(new)} new inputs of --input {input} "
                                  f"(e.g. {new[0]}) runs in one process; or choose another --output")
        logger.info("%s: %d new inputs in %s (e.g. %s); adding them (the data set is rebuilt "
                    "with them and replaced when complete)", output, len(new), input, new[0])
    run = _Run(text_tok, image_tok, layout, image_size, workers, batch_size, policy,
               low_res_grid > 0, clip)
    report = {"input": os.path.abspath(input), **({"shards": names} if shards else {}),
              **_tokenizer_paths(text_tok, image_tok, clip)}
    if world == 1:
        writer = LMDBWriter(output, config, extend=extend)
        try:
            run(writer, _share(writer, input, shards, names, 0, 1), _Progress(progress))
            return _publish(writer, input, report)
        finally:
            writer.close()
    parts = [f"{os.path.abspath(output)}.part{r}-of-{world}" for r in range(world)]
    if not os.path.isfile(parts[rank] + ".done"):
        writer = LMDBWriter(parts[rank], config)
        try:
            run(writer, _share(writer, input, shards, names, rank, world),
                _Progress(progress and rank == 0, parts, rank))
            write_json_atomic(parts[rank] + ".done", {"records": writer.record_count()})
        finally:
            writer.close()
    if rank != 0:
        logger.info("rank %d: its share is in %s.partial; rank 0 merges the parts", rank,
                    parts[rank])
        return None
    _Progress(progress, parts, None).wait([p + ".done" for p in parts])
    return _merge(output, config, parts, input, report)


def _tokenizer_paths(text_tok, image_tok, clip) -> dict:
    """Where the tokenizers were, so training can copy them beside its checkpoints."""
    return {f"{name}_tokenizer_path": os.path.abspath(path) for name, path in
            (("text", text_tok.model_path), ("image", image_tok.path),
             ("clip", getattr(clip, "path", None))) if path}


def _publish(writer: LMDBWriter, input: str, report: dict) -> dict:
    if not writer.record_count():
        raise ValueError(f"--input {input}: no usable example (skipped: "
                         f"{dict(Counter(r for _, r in writer.skipped_items()))})")
    sources = writer.record_count() + len(writer.skipped_items())
    meta = writer.publish(dict(report, sources=sources))
    report = meta["report"]
    logger.info("wrote %d records to %s (layout.json inside); skipped %d: %s", report["written"],
                writer.out, report["skipped_total"], report["skipped"] or "none")
    if report["skipped_total"]:
        logger.info("skipped inputs (file, reason) listed in %s",
                    os.path.join(writer.out, "report.json"))
    return report


def _merge(output: str, config: dict, parts: list[str], input: str, report: dict) -> dict:
    """Rank 0: the finished parts -> the data set at `output`, then the parts are removed."""
    staging = os.path.abspath(output) + ".partial"
    if os.path.exists(staging):  # a one-process run's, or a merge cut short: both superseded
        logger.warning("removing %s: the parts of this distributed run replace it", staging)
        shutil.rmtree(staging)
    writer = LMDBWriter(output, config)
    try:
        for part in parts:
            writer.absorb(part + ".partial")
        report = _publish(writer, input, report)
    finally:
        writer.close()
    for part in parts:
        shutil.rmtree(part + ".partial")
        for suffix in (".done", ".progress"):
            if os.path.exists(part + suffix):
                os.remove(part + suffix)
    return report


def _share(writer: LMDBWriter, input: str, shards, names, rank: int, world: int):
    """-> (this rank's examples not done yet: Sources, skips and ShardEnds; their count)."""
    done = writer.done_keys()
    if shards is None:
        sources, listed_skips = list_sources(input)
        items = [s for s in sources] + [("skip", *skip) for skip in listed_skips]
        items = sorted(items, key=_key)[rank::world]
        todo = [item for item in items if _key(item) not in done]
        if done:
            logger.info("resuming %s: %d of %d inputs already done", writer.staging,
                        len(items) - len(todo), len(items))
        return todo, len(todo)
    finished = writer.done_shards()
    mine = [(path, name) for i, (path, name) in enumerate(zip(shards, names))
            if i % world == rank and name not in finished]
    if finished:
        logger.info("resuming %s: %d shards done, %d to go", writer.staging, len(finished), len(mine))
    total = sum(count_shard_images(path) for path, _ in mine)
    total -= sum(1 for k in done if any(k.startswith(name + "/") for _, name in mine))

    def stream():
        for path, name in mine:
            yield from (item for item in shard_examples(path, name) if _key(item) not in done)
            yield ShardEnd(name)
    return stream(), max(total, 0)


def _key(item) -> str:
    return item.key if isinstance(item, Source) else item[1]


class _Run:
    """Tokenizes a stream of examples into a writer: workers load, this process encodes."""

    def __init__(self, text_tok, image_tok, layout, image_size, workers, batch_size, policy,
                 sr_low_res, clip):
        self.image_tok, self.layout, self.clip = image_tok, layout, clip
        self.workers, self.batch_size, self.sr_low_res = workers, batch_size, sr_low_res
        self.init = (text_tok, image_size, layout.max_text_tokens, policy)

    def encode(self, batch) -> list:
        codes = _encode(self.image_tok, [pixels for _, _, pixels in batch])
        lows = (_encode(self.image_tok, [half_resolution(p) for _, _, p in batch])
                if self.sr_low_res else [None] * len(batch))
        arrays = ([{"clip_image": e} for e in _clip_embed(self.clip, [p for *_, p in batch])]
                  if self.clip is not None else [None] * len(batch))
        return [(key, encode_record(ids, c, key, self.layout.num_image_codes, low, a))
                for (key, ids, _), c, low, a in zip(batch, codes, lows, arrays)]

    def __call__(self, writer: LMDBWriter, share, bar: "_Progress") -> None:
        items, total = share
        batch, skipped, truncated, n_skipped = [], [], 0, 0

        def flush(shards=()):
            nonlocal batch, skipped, truncated
            writer.add(self.encode(batch) if batch else [], skipped,
                       counts={"truncated_captions": truncated}, shards=shards)
            batch, skipped, truncated = [], [], 0

        pool = (multiprocessing.Pool(self.workers, _init_worker, self.init)
                if self.workers > 0 else None)
        if pool is None:
            _init_worker(*self.init)
        bar.start(total)
        try:
            with logging_redirect_tqdm():
                for result in _ordered_map(pool, items, chunk=8, window=4 * max(1, self.workers)):
                    if isinstance(result, ShardEnd):
                        flush(shards=[result.name])
                        continue
                    bar.update()
                    if result[0] == "skip":
                        _, key, reason, detail = result
                        n_skipped += 1
                        logger.warning("skipped %s: %s (%s) [%d skipped so far]", key, reason,
                                       detail, n_skipped)
                        skipped.append((key, reason))
                        continue
                    _, key, ids, was_truncated, pixels = result
                    batch.append((key, ids, pixels))
                    truncated += was_truncated
                    if len(batch) == self.batch_size:
                        flush()
                flush()
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()


class _Progress:
    """A bar over images. In a distributed run every rank leaves its count in `<part>.progress`
    and rank 0's bar (shown with `show`) sums them, so its rate and ETA are the whole job's."""

    def __init__(self, show: bool, parts: list[str] | None = None, rank: int | None = None):
        self.show, self.parts, self.rank = show, parts, rank
        self.count, self.total, self.last, self.bar = 0, 0, 0.0, None

    def start(self, total: int) -> None:
        self.total = total
        self.bar = progress_bar(total=total, unit="img", desc="preprocess", disable=not self.show,
                                dynamic_ncols=True)
        self._report(force=True)

    def update(self) -> None:
        self.count += 1
        if self.parts is None:
            self.bar.update()
        else:
            self._report()

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.parts is None or (now - self.last < 1 and not force):
            return
        self.last = now
        if self.rank is not None:
            write_json_atomic(self.parts[self.rank] + ".progress",
                              {"done": self.count, "total": self.total})
        if self.show:
            counts = [read_json(p + ".progress") if os.path.isfile(p + ".progress") else {}
                      for p in self.parts]
            self.bar.total = sum(c.get("total", 0) for c in counts)
            self.bar.update(sum(c.get("done", 0) for c in counts) - self.bar.n)

    def wait(self, done_files: list[str]) -> None:
        """Rank 0: until every rank has finished its part, with the bar still moving."""
        self.start(0)
        try:
            while not all(os.path.isfile(f) for f in done_files):
                self._report(force=True)
                time.sleep(1)
            self._report(force=True)
        finally:
            self.close()

    def close(self) -> None:
        self._report(force=True)
        self.bar.close()


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


def _check_same_shards(output: str, input: str, names: list[str], meta: dict) -> None:
    """A data set of shards is kept only if made from the same shards; it is not extended (a
    shard's examples are known only by reading it)."""
    made_from = meta.get("report", {}).get("shards") or []
    if sorted(made_from) != sorted(names):
        raise FileExistsError(f"{output} was made from {len(made_from)} other shards than the "
                              f"{len(names)} of --input {input}; remove it or choose another "
                              f"--output")


def _new_inputs(output: str, input: str) -> list[str]:
    """Keys of `input` that the data set at `output` has neither written nor skipped. Inputs it
    holds that are no longer listed are an error: a data set only grows."""
    sources, listed_skips = list_sources(input)
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
