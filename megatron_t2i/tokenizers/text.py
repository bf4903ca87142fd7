"""SentencePiece text tokenizer: training on captions, encoding and decoding (English and Chinese).

Text ids are SentencePiece ids [0, vocab_size); TokenLayout shifts them past the image codes.
Only the unknown piece (id 0) is reserved: begin/end/pad are the layout's special tokens, not text.

Every caption encodes to something meaningful: NFKC folds full-width forms and compatibility
characters first, and byte fallback spells any character the model never saw (a rare Chinese
character, an emoji) as its UTF-8 bytes instead of one unknown id, so decode(encode(x)) == NFKC(x).

    python -m megatron_t2i.cli.text_tokenizer --input data/synthetic --text-tokenizer text.model
"""
from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import re
import time
from typing import Iterable

import sentencepiece as spm

from megatron_t2i.io_utils import write_bytes_atomic

logger = logging.getLogger(__name__)

# CJK punctuation, kana, ideographs (with extension A and compatibility ideographs)
_CJK = re.compile(r"([\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")
_PIECE_BREAK = "\t"  # SentencePiece never builds a piece across it; captions are single lines


def _captions(source: Iterable[str] | str) -> list[str]:
    """Non-empty caption lines from strings, a file (one caption per line) or a folder of .txt
    files (searched recursively, in sorted order so training sees the same stream every time).
    Held in memory: SentencePiece keeps every training sentence in memory anyway."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
            if not files:
                raise ValueError(f"text tokenizer: no .txt caption files under {path}")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise FileNotFoundError(f"text tokenizer: caption source {path}: no such file or folder")
        source = []
        for name in files:
            try:
                with open(name, encoding="utf-8") as f:
                    source.append(f.read())
            except UnicodeDecodeError as e:
                raise ValueError(f"text tokenizer: {name} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [line.strip() for text in source for line in text.splitlines()]
    return [line for line in lines if line]


def train_text_tokenizer(captions: Iterable[str] | str, model_prefix: str, vocab_size: int = 1000,
                         character_coverage: float = 1.0) -> str:
    """Train a SentencePiece model on `captions` (strings, a caption file or a folder of .txt
    captions) and write `<model_prefix>.model` atomically. Returns its path.

    vocab_size counts every id, including the unknown piece and the 256 byte pieces; a corpus too
    small to fill it yields a smaller vocabulary instead of an error (read TextTokenizer.vocab_size).
    character_coverage 1.0 gives every character of the corpus its own piece, which suits
    Chinese captions; on a huge corpus 0.9995 leaves the rarest characters to byte fallback.
    """
    lines = _captions(captions)
    if not lines:
        raise ValueError(f"text tokenizer: no captions to train on in "
                         f"{captions if isinstance(captions, str) else 'the given list'}")
    model = io.BytesIO()
    start = time.time()
    try:
        # BPE rather than unigram: greedy merges of the most frequent pair are a deterministic
        # function of the corpus (no sampling, no EM), and the original CogView vocabulary was BPE.
        # num_threads is pinned: the model file records it, and the file's sha256 must not depend
        # on the machine that trained it.
        spm.SentencePieceTrainer.train(
            sentence_iterator=(_CJK.sub(_PIECE_BREAK + r"\1" + _PIECE_BREAK, line) for line in lines),
            pretokenization_delimiter=_PIECE_BREAK, model_writer=model,
            model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
            normalization_rule_name="nfkc", byte_fallback=True, character_coverage=character_coverage,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            num_threads=8, minloglevel=2)
    except RuntimeError as e:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if needed:
            raise ValueError(f"text tokenizer: vocab_size {vocab_size} is too small for this corpus; "
                             f"it needs at least {needed.group(1)} (256 byte pieces, the unknown "
                             f"piece and one per distinct character)") from None
        raise ValueError(f"text tokenizer: SentencePiece training failed: {str(e).splitlines()[0]}") from None

    path = f"{model_prefix}.model"
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_bytes_atomic(path, model.getvalue())
    logger.info("trained text tokenizer %s on %d captions in %.1f s", path, len(lines), time.time() - start)
    return path


class TextTokenizer:
    """Encode captions to SentencePiece ids and back. Picklable: the model travels as bytes, so a
    worker process uses exactly the model whose sha256 was recorded."""

    def __init__(self, model_path: str):
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(
                f"text tokenizer: {self.model_path}: no such file (train one with `python -m "
                f"megatron_t2i.cli.text_tokenizer --input CAPTIONS --text-tokenizer {self.model_path}`)")
        with open(self.model_path, "rb") as f:
            self._load(f.read())
        self.truncated = 0  # captions cut to max_len so far

    def _load(self, model: bytes) -> None:
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model)
        except RuntimeError:
            raise ValueError(f"text tokenizer: {self.model_path} is not a SentencePiece model") from None
        self._model = model
        self.sha256 = hashlib.sha256(model).hexdigest()

    def __getstate__(self):
        return {"model_path": self.model_path, "model": self._model, "truncated": self.truncated}

    def __setstate__(self, state):
        self.model_path, self.truncated = state["model_path"], state["truncated"]
        self._load(state["model"])

    @property
    def vocab_size(self) -> int:
        """Number of text ids: TokenLayout.num_text_tokens."""
        return self._sp.get_piece_size()

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """Ids of `text`, at most max_len of them; over-long text is cut with a counted warning.
        Empty or whitespace-only text gives [] (the caller decides whether that is an error)."""
        if not isinstance(text, str):
            raise TypeError(f"text tokenizer: expected a str to encode, got {type(text).__name__}")
        if max_len is not None and max_len < 0:
            raise ValueError(f"text tokenizer: max_len must be >= 0, got {max_len}")
        if not text.strip():
            return []
        ids = self._sp.encode(text)
        if max_len is not None and len(ids) > max_len:
            self.truncated += 1
            if self.truncated & (self.truncated - 1) == 0:  # 1st, 2nd, 4th, 8th... : visible, not a flood
                logger.warning("text tokenizer: caption of %d ids truncated to %d (%d truncated so far): %.60r",
                               len(ids), max_len, self.truncated, text)
            ids = ids[:max_len]
        return ids

    def decode(self, ids) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor/array of text ids)."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"text tokenizer: id {bad[0]} out of range [0, {self.vocab_size})")
        return self._sp.decode(ids)
