"""Reader of CogView's compact binary token files, with the interface of TokenDataset.

The file is a flat array of little-endian int32 rows, no header; each row is

    text_length (64) text ids, padded at the end with -1 | grid*grid (1024) image codes

Text ids: CogView's loader (`CompactBinaryDataset`) puts a row's text right after its [ROI1]
token without any shift, so the stored ids are in CogView's unified vocabulary, where a text id is
the SentencePiece id + 8192 (the image codebook size; see REFERENCE.md). We therefore subtract
`text_offset=8192` by default to get SentencePiece ids, as in our LMDB records; pass
`text_offset=0` for files that hold raw SentencePiece ids. A stored id below the offset is
reported as an error naming the file and row, never silently wrapped.

The file is memory-mapped lazily in each process (the map is not pickled: DataLoader workers and
ranks each map it themselves), so random access costs one page read per row.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
from torch.utils.data import Dataset

from megatron_t2i.data.lmdb_store import Record
from megatron_t2i.tokenizers.layout import TokenLayout

COGVIEW_TEXT_LENGTH = 64
ROW_DTYPE = np.dtype("<i4")


class CogViewBinaryDataset(Dataset):
    """`ds[i] -> Record(text_ids, image_codes, key)`; key is "<file name>:<row>".

    layout: the token layout the ids belong to (default: CogView's, with `grid`)."""

    def __init__(self, path: str, grid: int = 32, text_length: int = COGVIEW_TEXT_LENGTH,
                 text_offset: int = 8192, layout: TokenLayout | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such CogView binary file")
        self.path, self.grid, self.text_length, self.text_offset = path, grid, text_length, text_offset
        self.row_length = text_length + grid * grid
        row_bytes = self.row_length * ROW_DTYPE.itemsize
        size = os.path.getsize(path)
        if size % row_bytes:
            raise ValueError(f"{path}: size {size} bytes is not a multiple of the row size {row_bytes} "
                             f"({text_length} text + {grid}x{grid} codes, int32); wrong --grid or "
                             f"not a CogView binary file")
        self._len = size // row_bytes
        self.layout = layout or replace(TokenLayout.cogview(), image_grid=grid)
        self.meta = {"format": "cogview.compact_binary", "path": os.path.abspath(path),
                     "count": self._len, "text_length": text_length, "grid": grid,
                     "text_offset": text_offset, "layout": self.layout.to_dict()}
        self._rows, self._pid = None, None

    def _map(self) -> np.ndarray:
        if self._pid != os.getpid():
            self._rows = np.memmap(self.path, dtype=ROW_DTYPE, mode="r",
                                   shape=(self._len, self.row_length))
            self._pid = os.getpid()
        return self._rows

    def __getstate__(self):
        return dict(self.__dict__, _rows=None, _pid=None)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self._len:
            raise IndexError(f"row {i} out of range for {self.path} of {self._len} rows")
        row = np.array(self._map()[i], dtype=np.int64)  # copy: the map stays read-only
        text = row[:self.text_length]
        text = text[text != -1] - self.text_offset
        if text.size and text.min() < 0:
            raise ValueError(f"{self.path}: row {i} has text id {text.min() + self.text_offset} "
                             f"below text_offset {self.text_offset} (raw SentencePiece ids? "
                             f"use text_offset=0)")
        return Record(text, row[self.text_length:], f"{os.path.basename(self.path)}:{i}")

    def check(self, layout: TokenLayout, text_sha: str | None = None,
              image_sha: str | None = None) -> None:
        """Layout check as TokenDataset.check; the file records no tokenizer hashes, so those
        arguments are accepted and not compared."""
        layout.check_compatible(self.layout, f"CogView binary {self.path}")
