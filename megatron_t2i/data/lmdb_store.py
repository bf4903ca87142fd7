"""Token data sets on LMDB: one record format, a resumable writer and a fork-safe reader.

A published data set is an LMDB folder (`data.mdb`, `lock.mdb`) plus `layout.json` (the token
layout, also in the metadata), `report.json` (the preprocessing report of the metadata with every
skipped input: {"file": source key, "reason": ...}) and, when inputs were skipped, `skipped.tsv`
(source key, reason).

Keys and values of a published data set:

    b"__meta__"      JSON: {"format": FORMAT, "layout": TokenLayout.to_dict(),
                            "text_tokenizer_sha256": str, "image_tokenizer_sha256": str,
                            "image_size": int, "count": N, "report": {...preprocessing report}}
    b"%010d" % i     record i, for i in 0..N-1 (fixed width so LMDB's byte order is index order)

A record value, little-endian:

    header  8 bytes  struct "<BBHI": version (1), code item size (2 or 4), n_text, n_codes
    n_text  x int32  text ids, in SentencePiece space (no layout offset added)
    n_codes x uint16 (item size 2, codebooks up to 65536) or int32 (item size 4): image codes,
                     row-major over the code grid
    rest             the source key, UTF-8 (the input's relative path)

Version 2 records (written only with low-resolution codes, preprocess --sr-low-res) add a uint32
n_low after the header and n_low codes of the same item size after the image codes: the image at
half resolution, (grid/2)^2 codes, the input of super-resolution training (`--tasks super-resolution`).

Version 3 records (written only when a record has float arrays: a CLIP embedding, continuous
latents) have the version-2 layout (n_low may be 0) and then, before the key:

    uint16            n_arrays
    per array         uint8 name length, name (UTF-8), uint8 dtype (1 float16, 2 float32),
                      uint8 ndim, ndim x uint32 shape, then the values (little-endian, C order)

Every version is read by decode_record; an unknown one is refused with one line (TokenDataset
names the data set and record), never read as garbage.

Records are ordered by the UTF-8 bytes of their source keys, so the content of a data set does
not depend on the order in which workers finished or on interruptions.

Writing is resumable: `LMDBWriter` commits batches to a staging environment `<out>.partial/`
(named databases `records` and `skipped`, keyed by source key, plus the writer's configuration)
so a re-run skips what is finished. `publish()` builds the indexed environment in a temporary
folder beside `<out>` and renames it into place: a reader never sees a half-written data set,
and a folder without metadata is refused with a clear error.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections import Counter
from typing import NamedTuple

import lmdb
import numpy as np
from torch.utils.data import Dataset

from megatron_t2i.io_utils import replace_folder
from megatron_t2i.tokenizers.layout import LayoutMismatchError, TokenLayout

FORMAT = "megatron_t2i.lmdb_tokens/1"
META_KEY = b"__meta__"
RECORD_VERSION = 1
_HEADER = struct.Struct("<BBHI")
_LOW_COUNT = struct.Struct("<I")  # version 2: number of low-resolution codes
_CODE_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<i4")}
_INITIAL_MAP_SIZE = 1 << 28   # 256 MiB; doubled whenever a transaction does not fit
_PUBLISH_TXN_RECORDS = 10_000  # records per transaction while building the published index
_SHARD_PREFIX = b"shard:"      # staging: finished input shards, in the main database


RECORD_VERSIONS = (1, 2, 3)
_ARRAY_DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}


class Record(NamedTuple):
    text_ids: np.ndarray     # [n_text] int64, SentencePiece ids
    image_codes: np.ndarray  # [grid*grid] int64
    key: str                 # source key (relative path of the input image)
    low_codes: np.ndarray | None = None  # [(grid/2)^2] int64: the image at half resolution
    arrays: dict | None = None           # name -> float32 array (e.g. "clip_image": [512])


def index_key(i: int) -> bytes:
    return b"%010d" % i


def encode_record(text_ids, image_codes, key: str, num_image_codes: int, low_codes=None,
                  arrays: dict | None = None) -> bytes:
    """One record's bytes (see the module docstring); arrays: name -> float array, stored as
    float16 when given as float16, else float32."""
    text = np.asarray(text_ids, dtype=np.int64).reshape(-1)
    codes = np.asarray(image_codes, dtype=np.int64).reshape(-1)
    low = None if low_codes is None else np.asarray(low_codes, dtype=np.int64).reshape(-1)
    if text.size > 0xFFFF:
        raise ValueError(f"record {key}: {text.size} text ids exceed the format's limit of 65535")
    for name, c in (("image", codes), ("low-resolution", low)):
        if c is not None and c.size and (c.min() < 0 or c.max() >= num_image_codes):
            raise ValueError(f"record {key}: {name} code out of range [0, {num_image_codes})")
    itemsize = 2 if num_image_codes <= 1 << 16 else 4
    version = 3 if arrays else RECORD_VERSION if low is None else 2
    parts = [_HEADER.pack(version, itemsize, text.size, codes.size)]
    parts += [] if version == 1 else [_LOW_COUNT.pack(0 if low is None else low.size)]
    parts += [text.astype("<i4").tobytes(), codes.astype(_CODE_DTYPES[itemsize]).tobytes()]
    parts += [] if low is None else [low.astype(_CODE_DTYPES[itemsize]).tobytes()]
    if version == 3:
        parts.append(_encode_arrays(arrays, key))
    return b"".join(parts + [key.encode("utf-8")])


def _encode_arrays(arrays: dict, key: str) -> bytes:
    out = [struct.pack("<H", len(arrays))]
    for name, values in sorted(arrays.items()):
        a = np.asarray(values)
        code = 1 if a.dtype == np.float16 else 2
        a = np.ascontiguousarray(a, dtype=_ARRAY_DTYPES[code])
        raw = name.encode("utf-8")
        if not raw or len(raw) > 255 or a.ndim > 255 or not np.isfinite(a).all():
            raise ValueError(f"record {key}: array {name!r} must have a name of 1-255 bytes, at "
                             f"most 255 dimensions and finite values")
        out += [struct.pack("<B", len(raw)), raw, struct.pack("<BB", code, a.ndim),
                struct.pack(f"<{a.ndim}I", *a.shape), a.tobytes()]
    return b"".join(out)


def decode_record(buf) -> Record:
    version, itemsize, n_text, n_codes = _HEADER.unpack_from(buf, 0)
    if version not in RECORD_VERSIONS or itemsize not in _CODE_DTYPES:
        raise ValueError(f"record version {version} (code item size {itemsize}): written by "
                         f"another megatron_t2i; this one reads versions "
                         f"{', '.join(map(str, RECORD_VERSIONS))}")
    start = _HEADER.size
    n_low = _LOW_COUNT.unpack_from(buf, start)[0] if version >= 2 else 0
    start += _LOW_COUNT.size if version >= 2 else 0
    text = np.frombuffer(buf, dtype="<i4", count=n_text, offset=start)
    start += 4 * n_text
    codes = np.frombuffer(buf, dtype=_CODE_DTYPES[itemsize], count=n_codes, offset=start)
    start += itemsize * n_codes
    low = np.frombuffer(buf, dtype=_CODE_DTYPES[itemsize], count=n_low, offset=start) \
        if n_low else None
    start += itemsize * n_low
    arrays = None
    if version == 3:
        arrays, start = _decode_arrays(buf, start)
    key = bytes(buf[start:]).decode("utf-8")
    return Record(text.astype(np.int64), codes.astype(np.int64), key,
                  None if low is None else low.astype(np.int64), arrays)


def _decode_arrays(buf, start: int) -> tuple[dict, int]:
    (count,) = struct.unpack_from("<H", buf, start)
    start += 2
    arrays = {}
    for _ in range(count):
        (length,) = struct.unpack_from("<B", buf, start)
        name = bytes(buf[start + 1:start + 1 + length]).decode("utf-8")
        code, ndim = struct.unpack_from("<BB", buf, start + 1 + length)
        start += 3 + length
        shape = struct.unpack_from(f"<{ndim}I", buf, start)
        start += 4 * ndim
        if code not in _ARRAY_DTYPES:
            raise ValueError(f"array {name!r} of unknown dtype code {code}")
        size = int(np.prod(shape)) if ndim else 1
        arrays[name] = np.frombuffer(buf, dtype=_ARRAY_DTYPES[code], count=size,
                                     offset=start).reshape(shape).astype(np.float32)
        start += _ARRAY_DTYPES[code].itemsize * size
    return arrays, start


def _transact(env: lmdb.Environment, work) -> None:
    """Run `work(txn)` in one write transaction, growing the map until it fits."""
    while True:
        try:
            with env.begin(write=True) as txn:
                work(txn)
            return
        except lmdb.MapFullError:  # the aborted transaction left nothing behind; retry larger
            env.set_mapsize(env.info()["map_size"] * 2)


def _put_all(env: lmdb.Environment, puts) -> None:
    """Commit [(key, value)] in one transaction."""
    def work(txn):
        for k, v in puts:
            txn.put(k, v)
    _transact(env, work)


def check_whole(path: str, env: lmdb.Environment) -> None:
    """Refuse an environment whose data.mdb is shorter than its own page count says (a copy cut
    short, a full disk). Only the two meta pages, read with pread, are looked at: touching a page
    past the end of a memory-mapped file would kill the process with SIGBUS."""
    data = os.path.join(path, "data.mdb")
    size = os.path.getsize(data)
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if size < need:
        env.close()
        raise ValueError(f"{data}: {size} bytes, its page table needs {need}: the file is "
                         f"truncated (a copy cut short, a full disk); copy it again or re-run "
                         f"preprocess")


class LMDBWriter:
    """Resumable writer of one data set at `out`.

    `config` (see `dataset_config`: layout, tokenizer hashes, image size) is stored in the
    staging environment: resuming with a different config is refused, so a data set never mixes
    records of two tokenizers. Each `add()` is one committed transaction.

    extend=True adds to the published data set at `out` (of the same config): its records and
    skipped inputs seed the staging environment, and `publish()` replaces it atomically.
    """

    def __init__(self, out: str, config: dict, extend: bool = False):
        self.out = os.path.abspath(out)
        self.staging = self.out + ".partial"
        if os.path.exists(self.out) and not extend:
            raise FileExistsError(f"{out} already exists; remove it or choose another --output")
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        if "layout" not in config:
            raise ValueError("LMDBWriter: config needs the token layout (use dataset_config)")
        self.config = json.loads(json.dumps(config))  # normalise (tuples -> lists) for comparison
        self.env = lmdb.open(self.staging, map_size=_INITIAL_MAP_SIZE, max_dbs=2)
        check_whole(self.staging, self.env)
        self.records = self.env.open_db(b"records")
        self.skipped = self.env.open_db(b"skipped")
        with self.env.begin() as txn:
            stored = txn.get(b"config")
        if stored is None:
            _put_all(self.env, [(b"config", json.dumps(self.config).encode())])
        elif json.loads(stored) != self.config:
            old = json.loads(stored)
            diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            self.env.close()
            raise LayoutMismatchError(
                f"{self.staging}: unfinished run with a different {', '.join(diff)}; "
                f"delete {self.staging} to start over")
        with self.env.begin() as txn:
            seeded = txn.get(b"seeded") is not None
        if extend and not seeded:  # (again, if a run was killed while seeding: puts repeat)
            self._seed_from(TokenDataset(self.out))

    def _seed_from(self, published: "TokenDataset") -> None:
        """Copy the records, skipped inputs and counts of a published data set into staging."""
        skipped = []
        listing = os.path.join(published.path, "skipped.tsv")
        if os.path.isfile(listing):
            with open(listing, encoding="utf-8") as f:
                skipped = [tuple(line.rstrip("\n").rsplit("\t", 1)) for line in f if "\t" in line]
        counts = {k: v for k, v in published.meta.get("report", {}).items()
                  if k == "truncated_captions"}
        with open_readonly(published.path).begin(buffers=True) as txn:
            for start in range(0, len(published), _PUBLISH_TXN_RECORDS):
                values = [bytes(txn.get(index_key(i)))
                          for i in range(start, min(start + _PUBLISH_TXN_RECORDS, len(published)))]
                self.add([(decode_record(v).key, v) for v in values])
        self.add(skipped=skipped)
        _put_all(self.env, [(b"counts", json.dumps(counts).encode()), (b"seeded", b"1")])

    def done_keys(self) -> set[str]:
        """Source keys already written or skipped (a re-run must not redo them)."""
        keys = set()
        with self.env.begin() as txn:
            for db in (self.records, self.skipped):
                keys.update(k.decode("utf-8") for k in txn.cursor(db=db).iternext(values=False))
        return keys

    def add(self, records=(), skipped=(), counts: dict | None = None, shards=()) -> None:
        """Commit, in one transaction, encoded records [(key, value bytes)], skipped inputs
        [(key, reason)], increments of named counters (e.g. truncated captions) and the names of
        input shards now finished (a re-run does not read them again)."""
        def work(txn):
            for k, v in records:
                txn.put(k.encode("utf-8"), v, db=self.records)
            for k, reason in skipped:
                txn.put(k.encode("utf-8"), reason.encode("utf-8"), db=self.skipped)
            if counts:
                total = Counter(json.loads(txn.get(b"counts") or b"{}"))
                total.update(counts)
                txn.put(b"counts", json.dumps(dict(total)).encode())
            for name in shards:
                txn.put(_SHARD_PREFIX + name.encode("utf-8"), b"1")
        _transact(self.env, work)

    def done_shards(self) -> set[str]:
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_range(_SHARD_PREFIX):
                return set()
            return {k[len(_SHARD_PREFIX):].decode("utf-8")
                    for k in cursor.iternext(values=False) if k.startswith(_SHARD_PREFIX)}

    def absorb(self, staging: str) -> None:
        """Add everything another writer committed to its (closed) staging environment: how
        the parts of a distributed run become one data set."""
        env = lmdb.open(staging, readonly=True, lock=False, max_dbs=2)
        try:
            with env.begin() as txn:
                if txn.get(b"config") is None or json.loads(txn.get(b"config")) != self.config:
                    raise LayoutMismatchError(f"{staging}: a part written with another "
                                              f"configuration; delete it to start over")
                counts = json.loads(txn.get(b"counts") or b"{}")
                for name, put in ((b"records", "records"), (b"skipped", "skipped")):
                    cursor = txn.cursor(db=env.open_db(name, txn=txn, create=False))
                    batch = []
                    for k, v in cursor:
                        batch.append((k.decode("utf-8"), bytes(v) if put == "records" else
                                      bytes(v).decode("utf-8")))
                        if len(batch) == _PUBLISH_TXN_RECORDS:
                            self.add(**{put: batch})
                            batch = []
                    self.add(**{put: batch})
        finally:
            env.close()
        self.add(counts=counts)

    def record_count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.records)["entries"]

    def counts(self) -> dict:
        with self.env.begin() as txn:
            return json.loads(txn.get(b"counts") or b"{}")

    def skipped_items(self) -> list[tuple[str, str]]:
        with self.env.begin() as txn:
            return [(k.decode("utf-8"), v.decode("utf-8"))
                    for k, v in txn.cursor(db=self.skipped).iternext()]

    def publish(self, report: dict | None = None) -> dict:
        """Build the indexed data set, rename it to `out` and delete the staging environment.
        `report` is stored in the metadata with the counts. Returns the metadata."""
        skipped = self.skipped_items()
        reasons = Counter(reason for _, reason in skipped)
        tmp = self.out + ".publishing"  # left over only if a previous publish was killed
        shutil.rmtree(tmp, ignore_errors=True)
        final = lmdb.open(tmp, map_size=max(_INITIAL_MAP_SIZE, 2 * os.path.getsize(
            os.path.join(self.staging, "data.mdb"))))
        count, batch = 0, []
        with self.env.begin() as txn:
            for _, value in txn.cursor(db=self.records):  # LMDB order: sorted source keys
                batch.append((index_key(count), value))
                count += 1
                if len(batch) == _PUBLISH_TXN_RECORDS:
                    _put_all(final, batch)
                    batch = []
        meta = dict(self.config, format=FORMAT, count=count,
                    report=dict(report or {}, **self.counts(), written=count,
                                skipped=dict(sorted(reasons.items())), skipped_total=len(skipped)))
        _put_all(final, batch + [(META_KEY, json.dumps(meta).encode())])  # metadata last
        final.sync(True)
        final.close()
        extra = {"layout.json": json.dumps(self.config["layout"], indent=2),
                 "report.json": json.dumps(dict(meta["report"], skipped_records=[
                     {"file": k, "reason": r} for k, r in skipped]), indent=2, ensure_ascii=False)}
        if skipped:
            extra["skipped.tsv"] = "".join(f"{k}\t{r}\n" for k, r in skipped)
        for name, text in extra.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        replace_folder(tmp, self.out)  # atomic: readers see all of it or nothing
        self.env.close()
        shutil.rmtree(self.staging)
        return meta

    def close(self) -> None:
        self.env.close()


def write_token_dataset(out: str, records, layout: TokenLayout, text_tokenizer_sha256: str = "",
                        image_tokenizer_sha256: str = "", image_size: int = 0,
                        report: dict | None = None, low_res_grid: int = 0) -> dict:
    """Write [(text_ids, image_codes, key)] (or with a 4th item, low-resolution codes or None,
    and a 5th, {name: float array}) as a published data set at once (tests, benchmarks,
    conversions). Returns the metadata."""
    writer = LMDBWriter(out, dataset_config(layout, text_tokenizer_sha256, image_tokenizer_sha256,
                                            image_size, low_res_grid))
    writer.add([(key, encode_record(t, c, key, layout.num_image_codes, *extra))
                for t, c, key, *extra in records])
    return writer.publish(report)


def dataset_config(layout: TokenLayout, text_tokenizer_sha256: str, image_tokenizer_sha256: str,
                   image_size: int, low_res_grid: int = 0) -> dict:
    """What a data set's records depend on; stored in its metadata and checked on resume.
    low_res_grid: side of the half-resolution code grid stored per record (0: none, and then
    no key, so data sets written before the option keep their configuration)."""
    config = {"layout": layout.to_dict(), "text_tokenizer_sha256": text_tokenizer_sha256,
              "image_tokenizer_sha256": image_tokenizer_sha256, "image_size": image_size}
    return dict(config, low_res_grid=low_res_grid) if low_res_grid else config


_READ_ENVS: dict = {}  # realpath -> (read-only environment, (st_dev, st_ino) of its data.mdb)
_READ_ENVS_PID = os.getpid()


def open_readonly(path: str, revalidate: bool = False) -> lmdb.Environment:
    """The process's one read-only environment of `path` (LMDB allows one per process), reopened
    after a fork (a child must not use its parent's handle) and, with `revalidate`, when the
    data set at `path` was replaced since it was opened."""
    global _READ_ENVS_PID
    if _READ_ENVS_PID != os.getpid():
        _READ_ENVS.clear()
        _READ_ENVS_PID = os.getpid()
    key = os.path.realpath(path)
    try:
        st = os.stat(os.path.join(path, "data.mdb")) if revalidate or key not in _READ_ENVS else None
    except OSError:
        raise ValueError(f"{path}: no data.mdb; not an LMDB data set") from None
    if key in _READ_ENVS and st is not None and _READ_ENVS[key][1] != (st.st_dev, st.st_ino):
        _READ_ENVS.pop(key)[0].close()
    if key not in _READ_ENVS:
        try:
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as e:
            raise ValueError(f"{path}: cannot open as LMDB ({e})") from None
        check_whole(path, env)
        _READ_ENVS[key] = (env, (st.st_dev, st.st_ino))
    return _READ_ENVS[key][0]


class TokenDataset(Dataset):
    """Random access to a published data set: `ds[i] -> Record(text_ids, image_codes, key,
    low_codes)` (low_codes None unless preprocessed with --sr-low-res).

    The LMDB environment is opened read-only, without locks or readahead, lazily in each process
    (`open_readonly` keeps one per path and pid), so one instance can be pickled to many
    DataLoader workers and used by many ranks.
    """

    def __init__(self, path: str):
        self.path = path = os.path.normpath(path)
        if not os.path.isdir(path):
            if os.path.isdir(path + ".partial"):
                raise FileNotFoundError(f"{path}: not published yet (only {path}.partial exists; "
                                        f"re-run preprocess to finish it)")
            raise FileNotFoundError(f"{path}: no such data set folder")
        with open_readonly(path, revalidate=True).begin() as txn:
            raw = txn.get(META_KEY)
        if raw is None:
            raise ValueError(f"{path}: no metadata key {META_KEY.decode()}; not a complete "
                             f"megatron_t2i token data set")
        self.meta = json.loads(raw)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{path}: data set format {self.meta.get('format')!r}, expected {FORMAT}")
        self.layout = TokenLayout.from_dict(self.meta["layout"], source=f"data set {path}")
        self._len = int(self.meta["count"])
        stored = open_readonly(path).stat()["entries"] - 1  # the records beside the metadata
        if stored != self._len:
            raise ValueError(f"{path}: holds {stored} records, its metadata says {self._len}: "
                             f"the data set is damaged; re-run preprocess")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self._len:
            raise IndexError(f"record {i} out of range for {self.path} of {self._len} records")
        with open_readonly(self.path).begin(buffers=True) as txn:
            buf = txn.get(index_key(i))
            if buf is None:
                raise ValueError(f"{self.path}: record {i} missing (data set damaged)")
            try:
                return decode_record(buf)
            except (ValueError, struct.error, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: record {i}: {e}") from None

    def check(self, layout: TokenLayout, text_sha: str | None = None,
              image_sha: str | None = None) -> None:
        """Raise LayoutMismatchError naming the data set and field if it does not fit `layout` or
        was made with other tokenizers (hashes are compared only when given)."""
        layout.check_compatible(self.layout, f"data set {self.path}")
        for name, want in (("text_tokenizer_sha256", text_sha), ("image_tokenizer_sha256", image_sha)):
            have = self.meta.get(name)
            if want is not None and have != want:
                raise LayoutMismatchError(f"data set {self.path}: {name} mismatch: expected {want}, "
                                          f"found {have}")
