"""LMDB token store: record bytes, resumable writing, atomic publishing, multi-worker reading."""
import json
import os
import pickle
import shutil
import struct

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from megatron_t2i.data import lmdb_store
from megatron_t2i.data.lmdb_store import (LMDBWriter, TokenDataset, dataset_config, decode_record,
                                          encode_record, write_token_dataset)
from megatron_t2i.tokenizers.layout import LayoutMismatchError, TokenLayout

LAYOUT = TokenLayout(num_image_codes=512, num_text_tokens=300, image_grid=8, max_text_tokens=12)


def make_records(n, seed=0):
    rng = np.random.default_rng(seed)
    # keys deliberately not in sorted order, one non-ASCII
    keys = [f"img/{(7 * i) % n:03d}.png" for i in range(n)]
    keys[0] = "img/ünïcode 图.png"
    return [(rng.integers(0, 300, rng.integers(1, 13)), rng.integers(0, 512, 64), k) for k in keys]


def as_tuples(records):
    return sorted((k, tuple(int(x) for x in t), tuple(int(x) for x in c)) for t, c, k in records)


def read_all(ds):
    return [(r.key, tuple(r.text_ids.tolist()), tuple(r.image_codes.tolist()))
            for r in (ds[i] for i in range(len(ds)))]


def test_record_bytes_follow_documented_format():
    text, codes = [5, 0, 299], list(range(64))
    buf = encode_record(text, codes, "a/b.png", num_image_codes=512)
    # independent parse of the documented layout: <BBHI header, int32 text, uint16 codes, utf-8 key
    version, itemsize, n_text, n_codes = struct.unpack_from("<BBHI", buf)
    assert (version, itemsize, n_text, n_codes) == (1, 2, 3, 64)
    assert list(struct.unpack_from("<3i", buf, 8)) == text
    assert list(struct.unpack_from("<64H", buf, 20)) == codes
    assert buf[20 + 128:] == b"a/b.png"
    rec = decode_record(buf)
    assert rec.text_ids.dtype == np.int64 and rec.image_codes.dtype == np.int64
    assert rec.text_ids.tolist() == text and rec.image_codes.tolist() == codes and rec.key == "a/b.png"
    # a codebook beyond 65536 codes needs int32 codes
    big = encode_record([1], [70000, 3], "k", num_image_codes=100000)
    assert struct.unpack_from("<BBHI", big)[1] == 4
    assert decode_record(big).image_codes.tolist() == [70000, 3]
    with pytest.raises(ValueError, match="out of range"):
        encode_record([1], [512], "k", num_image_codes=512)


def test_write_read_sorted_by_key_with_metadata(tmp_path):
    records = make_records(20)
    meta = write_token_dataset(str(tmp_path / "ds"), records, LAYOUT, "tsha", "isha", 64)
    ds = TokenDataset(str(tmp_path / "ds"))
    assert len(ds) == 20 and meta["count"] == 20
    got = read_all(ds)
    assert got == as_tuples(records)                            # exact content, ordered by key
    assert [k for k, _, _ in got] == sorted(k for _, _, k in records)
    assert ds.layout == LAYOUT
    assert ds.meta["text_tokenizer_sha256"] == "tsha" and ds.meta["image_size"] == 64
    assert ds.meta["report"] == {"written": 20, "skipped": {}, "skipped_total": 0}
    with open(tmp_path / "ds" / "layout.json") as f:
        assert TokenLayout.from_dict(json.load(f)) == LAYOUT
    assert not os.path.exists(tmp_path / "ds.partial")        # staging removed after publish
    with pytest.raises(IndexError):
        ds[20]


def test_interrupted_write_resumes_to_identical_content(tmp_path):
    records = make_records(30, seed=1)
    config = dataset_config(LAYOUT, "t", "i", 32)
    encoded = [(k, encode_record(t, c, k, 512)) for t, c, k in records]

    reference = str(tmp_path / "reference")
    w = LMDBWriter(reference, config)
    w.add(encoded, skipped=[("bad.png", "unreadable image")], counts={"truncated_captions": 2})
    w.publish({"sources": 31})

    out = str(tmp_path / "resumed")
    w = LMDBWriter(out, config)
    with pytest.raises(RuntimeError):
        for start in range(0, 30, 7):  # committed batches of 7, then a crash in the 3rd batch
            if start == 14:
                raise RuntimeError("simulated crash")
            w.add(encoded[start:start + 7], counts={"truncated_captions": 1})
    w.close()
    with pytest.raises(FileNotFoundError, match="not published"):
        TokenDataset(out)                                      # a reader never sees a partial set

    w = LMDBWriter(out, config)
    done = w.done_keys()
    assert done == {k for k, _ in encoded[:14]}
    w.add([e for e in encoded if e[0] not in done], skipped=[("bad.png", "unreadable image")])
    w.publish({"sources": 31})
    a, b = TokenDataset(reference), TokenDataset(out)
    assert read_all(a) == read_all(b)
    assert a.meta == b.meta and b.meta["report"]["truncated_captions"] == 2
    assert b.meta["report"]["skipped"] == {"unreadable image": 1}
    with open(os.path.join(out, "skipped.tsv")) as f:
        assert f.read() == "bad.png\tunreadable image\n"


def test_resume_with_other_tokenizer_is_refused(tmp_path):
    out = str(tmp_path / "ds")
    LMDBWriter(out, dataset_config(LAYOUT, "t1", "i", 32)).close()
    with pytest.raises(LayoutMismatchError, match=r"ds\.partial.*text_tokenizer_sha256"):
        LMDBWriter(out, dataset_config(LAYOUT, "t2", "i", 32))


def test_existing_output_is_not_overwritten(tmp_path):
    write_token_dataset(str(tmp_path / "ds"), make_records(3), LAYOUT)
    with pytest.raises(FileExistsError, match="already exists"):
        LMDBWriter(str(tmp_path / "ds"), dataset_config(LAYOUT, "", "", 0))


def test_map_grows_when_full(tmp_path, monkeypatch):
    monkeypatch.setattr(lmdb_store, "_INITIAL_MAP_SIZE", 64 * 1024)
    rng = np.random.default_rng(0)
    records = [(rng.integers(0, 300, 10), rng.integers(0, 512, 4096), f"{i:04d}")
               for i in range(200)]  # ~1.6 MB of codes, far beyond 64 KiB
    layout = TokenLayout(num_image_codes=512, num_text_tokens=300, image_grid=64, max_text_tokens=12)
    write_token_dataset(str(tmp_path / "big"), records, layout)
    assert read_all(TokenDataset(str(tmp_path / "big"))) == as_tuples(records)


def test_refuses_folder_without_metadata_and_missing_path(tmp_path):
    env = lmdb.open(str(tmp_path / "raw"))
    with env.begin(write=True) as txn:
        txn.put(b"0000000000", b"x")
    env.close()
    with pytest.raises(ValueError, match="no metadata"):
        TokenDataset(str(tmp_path / "raw"))
    with pytest.raises(FileNotFoundError, match="no such data set"):
        TokenDataset(str(tmp_path / "nothing"))


def test_check_names_path_and_field(tmp_path):
    path = str(tmp_path / "ds")
    write_token_dataset(path, make_records(3), LAYOUT, "tsha", "isha", 64)
    ds = TokenDataset(path)
    ds.check(LAYOUT, text_sha="tsha", image_sha="isha")
    other = TokenLayout(num_image_codes=1024, num_text_tokens=300, image_grid=8, max_text_tokens=12)
    with pytest.raises(LayoutMismatchError, match=f"{path}.*num_image_codes.*1024.*512"):
        ds.check(other)
    with pytest.raises(LayoutMismatchError, match=f"{path}.*image_tokenizer_sha256"):
        ds.check(LAYOUT, image_sha="other")


def _identity(batch):
    return batch


def test_dataloader_workers_return_exactly_the_records(tmp_path):
    records = make_records(40, seed=3)
    path = str(tmp_path / "ds")
    write_token_dataset(path, records, LAYOUT)
    ds = TokenDataset(path)
    ds[0]  # opened in this process before forking: workers must reopen, not share the handle
    assert len(pickle.dumps(ds)) < 10_000  # no environment or data travels with the object
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=2, collate_fn=_identity)
    got = [(r.key, tuple(r.text_ids.tolist()), tuple(r.image_codes.tolist()))
           for batch in loader for r in batch]
    assert len(got) == 40 and sorted(got) == as_tuples(records)
    # a second instance of the same path in one process shares the environment
    assert read_all(TokenDataset(path + "/")) == read_all(ds)


def test_replaced_data_set_is_reopened(tmp_path):
    path = str(tmp_path / "ds")
    write_token_dataset(path, make_records(5, seed=1), LAYOUT)
    assert len(TokenDataset(path)) == 5
    shutil.rmtree(path)
    records = make_records(8, seed=2)
    write_token_dataset(path, records, LAYOUT)
    assert read_all(TokenDataset(path)) == as_tuples(records)  # not the first set's cached handle


def test_float_arrays_round_trip_beside_the_ids_and_every_version_reads(tmp_path):
    clip = np.linspace(-1, 1, 8, dtype=np.float32)
    latent = np.arange(24, dtype=np.float16).reshape(2, 3, 4) / 7
    buf = encode_record([5, 6], [1, 2, 3, 4], "a.png", 512, None,
                        {"clip_image": clip, "latent": latent})
    assert struct.unpack_from("<BBHI", buf)[0] == 3
    rec = decode_record(buf)
    assert rec.text_ids.tolist() == [5, 6] and rec.image_codes.tolist() == [1, 2, 3, 4]
    assert rec.key == "a.png" and rec.low_codes is None
    assert np.array_equal(rec.arrays["clip_image"], clip)
    assert rec.arrays["latent"].shape == (2, 3, 4)
    assert np.array_equal(rec.arrays["latent"], latent.astype(np.float32))  # float16 kept exact
    with_low = decode_record(encode_record([5], [1, 2, 3, 4], "b", 512, [7], {"x": clip}))
    assert with_low.low_codes.tolist() == [7] and np.array_equal(with_low.arrays["x"], clip)
    # versions 1 and 2 read as before: no arrays
    assert decode_record(encode_record([5], [1, 2], "c", 512)).arrays is None
    assert decode_record(encode_record([5], [1, 2], "c", 512, [3])).low_codes.tolist() == [3]
    # a data set of such records, and one record of an unknown version: one line naming it
    good, path = str(tmp_path / "good"), str(tmp_path / "ds")
    for folder in (good, path):
        write_token_dataset(folder, [([1], list(range(64)), "k0", None, {"clip_image": clip})],
                            LAYOUT)
    assert np.array_equal(TokenDataset(good)[0].arrays["clip_image"], clip)
    env = lmdb.open(path)
    with env.begin(write=True) as txn:
        txn.put(b"%010d" % 0, b"\x09" + bytes(encode_record([1], [2], "k0", 512))[1:])
    env.close()
    with pytest.raises(ValueError, match=f"{path}: record 0: record version 9 .*reads versions "
                                         f"1, 2, 3"):
        TokenDataset(path)[0]
    with pytest.raises(ValueError, match="array 'bad' must have .* finite values"):
        encode_record([1], [2], "k", 512, None, {"bad": np.array([np.nan])})
