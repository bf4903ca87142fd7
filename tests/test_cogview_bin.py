"""CogView compact binary reader on files written here: int32 rows of 64 text ids (-1 padded,
CogView's unified ids = SentencePiece id + 8192) followed by grid*grid codes."""
import pickle

import numpy as np
import pytest
from torch.utils.data import DataLoader

from megatron_t2i.data.cogview_bin import CogViewBinaryDataset
from megatron_t2i.tokenizers.layout import LayoutMismatchError, TokenLayout


def write_rows(path, texts, codes, text_length=64, offset=8192):
    rows = np.full((len(texts), text_length + codes.shape[1]), -1, dtype="<i4")
    for r, t in enumerate(texts):
        rows[r, :len(t)] = np.asarray(t) + offset
    rows[:, text_length:] = codes
    rows.tofile(path)


def sample(n=6, grid=32, seed=0):
    rng = np.random.default_rng(seed)
    texts = [rng.integers(0, 50000, rng.integers(0, 65)).tolist() for _ in range(n)]
    texts[0] = []                              # no text at all
    texts[1] = list(range(64))                 # a full row, no padding
    return texts, rng.integers(0, 8192, (n, grid * grid))


def _identity(batch):
    return batch


def test_reads_rows_as_records(tmp_path):
    texts, codes = sample()
    path = str(tmp_path / "train.bin")
    write_rows(path, texts, codes)
    ds = CogViewBinaryDataset(path)
    assert len(ds) == 6
    for i in range(6):
        rec = ds[i]
        assert rec.text_ids.dtype == np.int64 and rec.image_codes.dtype == np.int64
        assert rec.text_ids.tolist() == texts[i]            # SentencePiece ids, padding dropped
        assert rec.image_codes.tolist() == codes[i].tolist()
        assert rec.key == f"train.bin:{i}"
    assert ds.layout == TokenLayout.cogview()
    ds.check(TokenLayout.cogview())
    with pytest.raises(LayoutMismatchError, match="train.bin.*num_text_tokens"):
        ds.check(TokenLayout(num_image_codes=8192, num_text_tokens=1000, image_grid=32,
                             max_text_tokens=61))
    with pytest.raises(IndexError):
        ds[6]


def test_raw_sentencepiece_ids_and_other_grid(tmp_path):
    texts, codes = sample(n=3, grid=16, seed=1)
    path = str(tmp_path / "small.bin")
    write_rows(path, texts, codes, offset=0)
    ds = CogViewBinaryDataset(path, grid=16, text_offset=0)
    assert [ds[i].text_ids.tolist() for i in range(3)] == texts
    assert ds.layout.image_grid == 16
    # read with the default offset, raw ids fall below it: a clear error, not wrapped ids
    with pytest.raises(ValueError, match="small.bin: row 1 .*text_offset"):
        CogViewBinaryDataset(path, grid=16)[1]


def test_size_not_multiple_of_row_is_an_error(tmp_path):
    texts, codes = sample(n=2)
    path = tmp_path / "broken.bin"
    write_rows(str(path), texts, codes)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="broken.bin.*not a multiple of the row size 4352"):
        CogViewBinaryDataset(str(path))
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        CogViewBinaryDataset(str(tmp_path / "nope.bin"))


def test_dataloader_workers(tmp_path):
    texts, codes = sample(n=10, seed=2)
    path = str(tmp_path / "train.bin")
    write_rows(path, texts, codes)
    ds = CogViewBinaryDataset(path)
    ds[0]  # mapped here first: workers must map again, and pickling must not copy the rows
    assert len(pickle.dumps(ds)) < 10_000
    got = sorted((r.key, tuple(r.text_ids.tolist())) for batch in
                 DataLoader(ds, batch_size=3, shuffle=True, num_workers=2, collate_fn=_identity)
                 for r in batch)
    assert got == sorted((f"train.bin:{i}", tuple(t)) for i, t in enumerate(texts))
