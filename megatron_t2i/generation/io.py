"""Inputs and outputs of generation: query sources, safe file names, PNGs and grids.

Queries come from `--input-source`: `interactive` (a prompt loop on stdin; `stop` or end of input
leaves) or a file with one query per line (`id<TAB>query` with --with-id). Under tensor
parallelism only global rank 0 reads; each parsed query is broadcast to the other ranks, so they
run the model on the same input (interactive mode included).

Output names come from user text, so they are sanitised: no path separators or control
characters, no leading dots (`../../etc/x` stays inside the output folder), bounded length. A file
is never overwritten: a taken name gets a `-1`, `-2`... suffix. Every file is written under a
temporary name and then linked to its final name, so a reader never sees half an image.
"""
from __future__ import annotations

import itertools
import os
import re
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.distributed as dist
from PIL import Image

from megatron_t2i.io_utils import ordinary_mode

INTERACTIVE = "interactive"
STOP = "stop"
PROMPT = "Query (stop to exit) >>> "


# ----------------------------------------------------------------------------------------------
# Names and files

def safe_name(text: str, max_bytes: int = 100, default: str = "query") -> str:
    """A file name from free text: letters and digits of any script, '-', '_', ',', '.', '+';
    everything else (separators, control characters, whitespace) becomes '_'. Leading and
    trailing dots are dropped (no '..', no hidden files); at most max_bytes of UTF-8."""
    text = unicodedata.normalize("NFKC", text)
    name = "".join(c if c.isalnum() or c in "-_,.+" else "_" for c in text)
    name = re.sub(r"_+", "_", name).strip("._")
    name = name.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore").strip("._")
    return name or default


def save_new(path: str, write: Callable[[str], None]) -> str:
    """Write a new file at `path`, or at `stem-1.ext`, `stem-2.ext`... when the name is taken;
    `write(tmp_path)` writes the content. Returns the path used."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ext, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, ordinary_mode())  # mkstemp's files are private; the user's outputs are not
        for n in itertools.count():
            candidate = path if n == 0 else f"{stem}-{n}{ext}"
            try:
                os.link(tmp, candidate)  # atomic, and fails instead of replacing a file
                return candidate
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links
                if not os.path.exists(candidate):
                    os.replace(tmp, candidate)
                    return candidate
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_image(image: Image.Image, path: str) -> str:
    """PNG at `path` (or a suffixed free name); returns the path used."""
    return save_new(path, lambda tmp: image.save(tmp, format="PNG"))


def open_results(path: str, header: list[str]) -> str:
    """A new TSV file with `header` at `path`, or at a suffixed free name if taken (never another
    run's file); returns its path. Lines are then appended with append_row."""
    return save_new(path, lambda tmp: append_row(tmp, header))


def append_row(path: str, fields: list) -> None:
    """One TSV line, in one write (tabs and newlines inside a field become spaces)."""
    line = "\t".join(" ".join(str(f).split()) for f in fields) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def make_grid(images: list[Image.Image], nrow: int = 8, padding: int = 2,
              fill=(255, 255, 255)) -> Image.Image:
    """Images of one size side by side, `nrow` per row, `padding` pixels around each."""
    if not images:
        raise ValueError("make_grid: no images")
    w, h = images[0].size
    cols = max(1, min(nrow, len(images)))
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + padding) + padding, rows * (h + padding) + padding), fill)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(image.convert("RGB"), (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def save_grid(images: list[Image.Image], path: str, nrow: int = 8) -> str:
    """One PNG of all `images` (see make_grid) at `path` or a suffixed free name."""
    return save_image(make_grid(images, nrow), path)


def query_folder(output_path: str, query_id: str | None, text: str) -> str:
    """Where a query's images go: {out}/{id}/ with --with-id, else {out}/{text}/ (sanitised)."""
    return os.path.join(output_path, safe_name(query_id if query_id is not None else text))


def save_samples(images: list[Image.Image], output_path: str, query_id: str | None, text: str,
                 debug: bool = False, nrow: int = 8, start: int = 0) -> list[str]:
    """Write a query's images, each as {folder}/{k:03d}.png with folder = query_folder(...) and k
    counting from `start`; or with `debug` one grid named from the text and the time,
    {out}/{text}-{time}.png (inside {out}/{id}/ with an id). Returns the paths written."""
    if debug:
        folder = output_path if query_id is None else query_folder(output_path, query_id, text)
        name = f"{safe_name(text, 60)}-{time.strftime('%Y%m%d-%H%M%S')}.png"
        return [save_grid(images, os.path.join(folder, name), nrow)]
    folder = query_folder(output_path, query_id, text)
    return [save_image(image, os.path.join(folder, f"{k:03d}.png"))
            for k, image in enumerate(images, start)]


def token_progress(is_writer: bool) -> bool:
    """Whether to draw per-token progress bars: on the writer, in a terminal; a redirected log
    gets the one summary line per query instead of thousands of bar updates."""
    return is_writer and sys.stderr.isatty()


# ----------------------------------------------------------------------------------------------
# Queries

@dataclass
class Query:
    index: int          # 0, 1, 2... in input order (skipped lines do not count)
    id: str | None      # with --with-id
    text: str           # the line (without the id)
    item: Any           # what the task's parse() made of it


class _Decoder:
    """Input lines as text: bytes are decoded as UTF-8; a line that is not is reported on `log`
    (the 1st, 2nd, 4th, 8th... of a source, so a binary file does not flood it) and dropped."""

    def __init__(self, source: str, log):
        self.source, self.log, self.bad = source, log, 0

    def __call__(self, raw, number: int) -> str | None:
        if isinstance(raw, str):
            return raw
        try:
            return raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            self.bad += 1
            if self.bad & (self.bad - 1) == 0:
                print(f"skipped line {number} of {self.source}: not UTF-8 text (byte "
                      f"0x{raw[e.start]:02x} at position {e.start}; {self.bad} such line(s) so "
                      f"far)", file=self.log, flush=True)
            return None


def read_lines(source: str, stdin=None, stdout=None, log=None) -> Iterator[tuple[int, str]]:
    """(line number, line) from a file, or from stdin for `interactive` (prompt, `stop` leaves).
    Lines are decoded one by one: a line that is not UTF-8 is skipped with one line on `log`
    (stderr) and the rest still read, so one bad line neither ends a session nor a file."""
    log = log or sys.stderr
    if source == INTERACTIVE:
        stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
        stream = getattr(stdin, "buffer", stdin)  # bytes when it can: no locale decoding
        decode = _Decoder("interactive input (stdin)", log)
        for number in itertools.count(1):
            stdout.write(PROMPT)
            stdout.flush()
            line = decode(stream.readline(), number)
            if line is None:
                continue
            if not line or line.strip() == STOP:  # end of input or stop
                return
            if line.strip():
                yield number, line.rstrip("\r\n")
        return
    try:
        f = open(source, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"--input-source {source}: no such file (or use "
                                f"'{INTERACTIVE}')") from None
    decode = _Decoder(source, log)
    with f:
        for number, raw in enumerate(f, 1):
            line = decode(raw, number)
            if line is not None and line.strip():
                yield number, line.rstrip("\r\n")


def parse_queries(lines, source: str, with_id: bool, parse: Callable[[str], Any],
                  log=None) -> Iterator[Query]:
    """Lines -> Query objects. A line that does not parse is reported on `log` (stderr) in one
    line and skipped, so one bad query neither ends an interactive session nor a long file."""
    log = log or sys.stderr
    index = 0
    for number, line in lines:
        try:
            query_id, text = None, line
            if with_id:
                query_id, tab, text = line.partition("\t")
                if not tab or not query_id.strip():
                    raise ValueError("expected id<TAB>query (--with-id)")
                query_id = query_id.strip()
            item = parse(text)
        except (ValueError, OSError) as e:
            print(f"skipped line {number} of {source}: {e}", file=log, flush=True)
            continue
        yield Query(index, query_id, text, item)
        index += 1


def broadcast_queries(queries: Iterator[Query] | None) -> Iterator[Query]:
    """The writer's queries on every rank: rank 0 iterates `queries` and broadcasts each (None
    marks the end); the other ranks pass None and receive. Without torch.distributed, `queries`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield from queries
        return
    source = iter(queries) if dist.get_rank() == 0 else None
    while True:
        box = [next(source, None) if source is not None else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        yield box[0]


def queries(source: str, with_id: bool, is_writer: bool,
            parse: Callable[[str], Any] = lambda text: text) -> Iterator[Query]:
    """The queries of `source` (a file, or 'interactive') on every rank; `parse(text)` runs on the
    writer only (e.g. to read and encode an image) and its result, which must pickle, is
    broadcast."""
    local = parse_queries(read_lines(source), source, with_id, parse) if is_writer else None
    return broadcast_queries(local)
