"""SentencePiece text tokenizer: round trips in English and Chinese, byte fallback, truncation
warnings, vocabulary size, deterministic training, pickling, errors and the CLI."""
import logging
import multiprocessing
import os
import pickle
import unicodedata

import pytest

from megatron_t2i.data.synthetic import make_example, write_dataset
from megatron_t2i.cli import text_tokenizer as text_cli
from megatron_t2i.tokenizers.text import TextTokenizer, train_text_tokenizer

VOCAB = 600
CORPUS = [make_example(i, seed=11, chinese_fraction=0.5).caption for i in range(300)]
HELD_OUT = [make_example(i, seed=12, chinese_fraction=0.5).caption for i in range(50)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_text_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok") / "captions"), VOCAB)


def test_round_trips_english_and_chinese(model_path):
    tok = TextTokenizer(model_path)
    assert {"zh", "en"} == {"zh" if any("\u4e00" <= c <= "\u9fff" for c in x) else "en" for x in HELD_OUT}
    samples = HELD_OUT + ["a big red circle in the top left on a gray background",
                          "一个红色的大圆形在左上角",
                          "ＲＥＤ ｃｉｒｃｌｅ ①，全角！"]  # full-width forms: NFKC folds them
    for caption in samples:
        ids = tok.encode(caption)
        assert ids and all(isinstance(i, int) and 0 < i < tok.vocab_size for i in ids)  # 0 is unknown
        assert tok.decode(ids) == unicodedata.normalize("NFKC", caption)
    # pieces are learned: an English caption takes far fewer ids than its letters
    english = next(x for x in HELD_OUT if x.isascii())
    assert len(tok.encode(english)) < len(english) / 3


def test_chinese_characters_are_pieces_of_their_own(model_path):
    """On templated Chinese captions BPE would merge whole clauses into one id; every character
    (and no byte) must be its own piece, so a new combination reuses the words of the corpus."""
    tok = TextTokenizer(model_path)
    for caption in [x for x in HELD_OUT if not x.isascii()][:5] + ["右下角有一个小的红色圆形"]:
        pieces = [tok.decode([i]).strip() for i in tok.encode(caption)]
        assert [p for p in pieces if p] == list(unicodedata.normalize("NFKC", caption))
    english = tok.decode(tok.encode("a red circle")).split()
    assert len(tok.encode("a red circle")) == len(english) == 3  # English words still merge


def test_unseen_characters_fall_back_to_bytes(model_path):
    tok = TextTokenizer(model_path)
    unseen = "猫🐈"
    assert not any(c in caption for caption in CORPUS for c in unseen)
    ids = tok.encode(unseen)
    assert 0 not in ids and len(ids) >= len(unseen)
    assert tok.decode(ids) == unseen
    assert tok.decode(tok.encode(f"a {unseen} in the centre")) == f"a {unseen} in the centre"


def test_truncation_warns_sparsely_and_counts(model_path, caplog):
    tok = TextTokenizer(model_path)
    long = HELD_OUT[:10]
    with caplog.at_level(logging.WARNING, logger="megatron_t2i.tokenizers.text"):
        for caption in long:
            full = tok.encode(caption)
            assert len(full) > 3
            assert tok.encode(caption, max_len=3) == full[:3]
        assert tok.encode("a red star", max_len=50) == tok.encode("a red star")  # short: untouched
    assert tok.truncated == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # the 1st, 2nd, 4th and 8th
    assert "truncated to 3" in warnings[0] and "(8 truncated so far)" in warnings[-1]


def test_empty_text_and_bad_ids(model_path):
    tok = TextTokenizer(model_path)
    assert tok.encode("") == [] and tok.encode("  \t\n") == []
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match="expected a str"):
        tok.encode(None)


def test_vocab_size(tmp_path, model_path):
    tok = TextTokenizer(model_path)
    assert tok.vocab_size == VOCAB
    ids = {i for caption in CORPUS for i in tok.encode(caption)}
    assert max(ids) < VOCAB and tok.decode([VOCAB - 1]) is not None
    # a tiny corpus cannot fill a big vocabulary: a smaller one, not a failure
    small = TextTokenizer(train_text_tokenizer(CORPUS[:5], str(tmp_path / "small"), 5000))
    assert 257 < small.vocab_size < 5000  # unknown + 256 bytes + the corpus's characters and merges
    assert small.decode(small.encode(CORPUS[0])) == unicodedata.normalize("NFKC", CORPUS[0])
    with pytest.raises(ValueError, match="too small for this corpus; it needs at least"):
        train_text_tokenizer(CORPUS, str(tmp_path / "tiny"), 100)
    assert not any(name.startswith("tiny") for name in os.listdir(tmp_path))


def test_training_is_deterministic_for_every_input_form(tmp_path, model_path):
    first = TextTokenizer(model_path)
    again = TextTokenizer(train_text_tokenizer(CORPUS, str(tmp_path / "again"), VOCAB))
    assert again.sha256 == first.sha256
    assert [again.encode(x) for x in HELD_OUT] == [first.encode(x) for x in HELD_OUT]
    # the same captions as a file (one per line) and as a folder of .txt files: the same model
    lines = tmp_path / "captions.txt"
    lines.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    folder = write_dataset(str(tmp_path / "syn"), 300, seed=11, image_size=8, chinese_fraction=0.5,
                           progress=False)
    for source in (str(lines), folder):
        assert TextTokenizer(train_text_tokenizer(source, str(tmp_path / "other"), VOCAB)).sha256 == first.sha256
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # atomic write left no temp file


def test_pickles_into_worker_processes(tmp_path, model_path):
    tok = TextTokenizer(train_text_tokenizer(CORPUS, str(tmp_path / "moving"), VOCAB))
    expected = [tok.encode(x) for x in HELD_OUT[:4]]
    blob = pickle.dumps(tok)
    os.remove(tok.model_path)  # the model travels inside the pickle, not by path
    clone = pickle.loads(blob)
    assert clone.sha256 == tok.sha256 and clone.vocab_size == tok.vocab_size
    assert [clone.encode(x) for x in HELD_OUT[:4]] == expected
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.map(clone.encode, HELD_OUT[:4]) == expected


def test_clear_errors_for_missing_or_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model: no such file"):
        TextTokenizer(str(tmp_path / "nope.model"))
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bogus.model is not a SentencePiece model"):
        TextTokenizer(str(bogus))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        train_text_tokenizer(str(tmp_path / "missing"), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no captions"):
        train_text_tokenizer(["", "  "], str(tmp_path / "x"))


def test_cli(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CORPUS), encoding="utf-8")
    out = tmp_path / "cli" / "text.model"
    text_cli.main(["--input", str(captions), "--text-tokenizer", str(out), "--text-vocab-size", str(VOCAB)])
    printed = capsys.readouterr().out
    assert f"{VOCAB} ids" in printed and str(out) in printed
    assert TextTokenizer(str(out)).vocab_size == VOCAB
    with pytest.raises(SystemExit) as e:
        text_cli.main(["--input", str(tmp_path / "missing"), "--text-tokenizer", str(out)])
    assert "no such file or folder" in str(e.value.code) and "\n" not in str(e.value.code)
