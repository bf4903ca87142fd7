"""preprocess: folder/TSV/JSONL inputs, odd but valid images kept, bad inputs skipped and counted,
resumable after kill -9, parallel workers giving the same result as in-process loading."""
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_t2i.data.images import BadInput, load_rgb
from megatron_t2i.data.lmdb_store import TokenDataset
from megatron_t2i.cli.preprocess import main
from megatron_t2i.data.preprocess import preprocess
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.tokenizers.text import TextTokenizer, train_text_tokenizer
from megatron_t2i.tokenizers.vqvae import VQVAE, ImageTokenizer, VQVAEConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TEXT = 8
CAPTIONS = ["a red circle on a white background", "two blue squares in the top left corner",
            "a small green triangle", "一个红色的圆形", "a large yellow star near the bottom",
            "a purple cross and an orange circle on a gray background"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    text_path = train_text_tokenizer(CAPTIONS * 3, str(root / "text"), vocab_size=400)
    torch.manual_seed(0)
    config = VQVAEConfig(hidden_channels=8, embed_dim=4, codebook_size=32, downsample=4,
                         num_res_blocks=0, image_size=32)
    image_tok = ImageTokenizer(VQVAE(config))
    image_tok.save(str(root / "vq.pt"))
    return TextTokenizer(text_path), ImageTokenizer.load(str(root / "vq.pt"))


def pattern(w=40, h=48, seed=0):
    """An RGB image with structure, so different conversions give different codes."""
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = rng.integers(0, 256, 3)
    a[h // 2:] = rng.integers(0, 256, 3)
    a[:, : w // 3, 0] = 250
    return Image.fromarray(a)


def write_caption(path, text):
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8"))


def make_folder(root):
    """-> (expected {key: (caption, expected RGB image or None)}, expected skip counts)."""
    os.makedirs(root / "sub")
    expected = {}
    for i in range(5):  # plain RGB, one in a sub-folder, one with a Chinese caption
        key = f"sub/rgb{i}.png" if i == 4 else f"rgb{i}.png"
        img = pattern(seed=i)
        img.save(root / key)
        caption = CAPTIONS[i]
        write_caption(root / key.replace(".png", ".txt"), caption)
        expected[key] = (caption, img)
    long_caption = " ".join(CAPTIONS)  # more than MAX_TEXT ids: kept, truncated, counted
    pattern(seed=9).save(root / "long.png")
    write_caption(root / "long.txt", long_caption)
    expected["long.png"] = (long_caption, pattern(seed=9))

    # valid odd modes, each with the RGB image it must become (built by hand, not by our code)
    rgba = np.zeros((48, 40, 4), np.uint8)
    rgba[:, :20] = (200, 30, 30, 255)   # opaque red left half
    rgba[:, 20:] = (0, 0, 0, 0)         # transparent right half hiding black
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    want = np.full((48, 40, 3), 255, np.uint8)
    want[:, :20] = (200, 30, 30)
    expected["rgba.png"] = ("a red circle on a white background", Image.fromarray(want))

    gray = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (48, 1))
    Image.fromarray(gray, "L").save(root / "gray.png")
    expected["gray.png"] = ("a small green triangle", Image.fromarray(np.stack([gray] * 3, -1)))

    deep = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (48, 1))
    Image.fromarray(deep).save(root / "gray16.png")  # mode I;16
    assert Image.open(root / "gray16.png").mode in ("I;16", "I")
    eight = np.rint(deep / 257).astype(np.uint8)
    expected["gray16.png"] = ("a large yellow star near the bottom",
                              Image.fromarray(np.stack([eight] * 3, -1)))

    pal = pattern(seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(root / "palette.png")
    expected["palette.png"] = ("two blue squares in the top left corner", pal.convert("RGB"))

    Image.new("CMYK", (40, 48), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)  # red
    expected["cmyk.jpg"] = ("a red circle on a white background", None)  # lossy: pixels tested below

    for key in ("rgba.png", "gray.png", "gray16.png", "palette.png", "cmyk.jpg"):
        write_caption(root / (os.path.splitext(key)[0] + ".txt"), expected[key][0])

    # bad inputs
    buf = io.BytesIO()
    pattern(seed=7).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    write_caption(root / "truncated.txt", "a small green triangle")
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg" * 10)
    write_caption(root / "garbage.txt", "a small green triangle")
    pattern(seed=8).save(root / "empty.png")
    write_caption(root / "empty.txt", "  \n\t ")
    pattern(seed=8).save(root / "latin1.png")
    write_caption(root / "latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    pattern(seed=8).save(root / "nocaption.png")
    write_caption(root / "orphan.txt", "a caption without its image")
    skips = {"unreadable image": 2, "empty caption": 1, "caption not UTF-8": 1,
             "missing caption": 1, "missing image": 1}
    return expected, skips


def records_by_key(path):
    ds = TokenDataset(path)
    return {ds[i].key: ds[i] for i in range(len(ds))}


def check_records(got, expected, text_tok, image_tok):
    assert set(got) == set(expected)
    for key, (caption, image) in expected.items():
        assert got[key].text_ids.tolist() == text_tok.encode(caption)[:MAX_TEXT], key
        if image is not None:
            want = image_tok.encode_images([image])[0]
            assert got[key].image_codes.tolist() == want.tolist(), key


def test_folder_with_odd_and_bad_inputs(tmp_path, tokenizers, caplog):
    text_tok, image_tok = tokenizers
    expected, skips = make_folder(tmp_path / "in")
    out = str(tmp_path / "tokens")
    with caplog.at_level(logging.WARNING):
        report = preprocess(str(tmp_path / "in"), out, text_tok, image_tok, max_text_tokens=MAX_TEXT,
                            workers=2, batch_size=4, progress=False)
    assert report["skipped"] == skips and report["skipped_total"] == 6
    assert report["written"] == len(expected) == 11
    assert report["sources"] == 17 and report["truncated_captions"] == 1
    got = records_by_key(out)
    check_records(got, expected, text_tok, image_tok)
    # one warning line per skipped input, naming it
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    for name in ("truncated.png", "garbage.jpg", "empty.png", "latin1.png", "nocaption.png", "orphan.txt"):
        assert sum(name in m for m in warned) == 1, name
    ds = TokenDataset(out)
    assert ds.meta["report"] == report
    layout = TokenLayout(num_image_codes=32, num_text_tokens=text_tok.vocab_size, image_grid=8,
                         max_text_tokens=MAX_TEXT)
    ds.check(layout, text_sha=text_tok.sha256, image_sha=image_tok.sha256)
    assert TokenLayout.load(os.path.join(out, "layout.json")) == layout
    with open(os.path.join(out, "skipped.tsv")) as f:
        assert sorted(line.split("\t")[0] for line in f) == sorted(
            ["truncated.png", "garbage.jpg", "empty.png", "latin1.png", "nocaption.png", "orphan.txt"])

    # in-process loading (workers=0) and another batch size give exactly the same data set
    out0 = str(tmp_path / "tokens0")
    preprocess(str(tmp_path / "in"), out0, text_tok, image_tok, max_text_tokens=MAX_TEXT, workers=0,
               batch_size=5, progress=False)
    got0 = records_by_key(out0)
    assert all(np.array_equal(got0[k].image_codes, got[k].image_codes) and
               np.array_equal(got0[k].text_ids, got[k].text_ids) for k in got)


def test_image_conversions_pixel_values(tmp_path):
    expected, _ = make_folder(tmp_path)
    for key in ("rgba.png", "gray.png", "gray16.png", "palette.png"):
        got = np.asarray(load_rgb(str(tmp_path / key)))
        assert got.shape == (48, 40, 3)
        assert np.array_equal(got, np.asarray(expected[key][1])), key
    cmyk = np.asarray(load_rgb(str(tmp_path / "cmyk.jpg"))).astype(int)
    assert np.abs(cmyk - [255, 0, 0]).max() <= 8  # C=0 M=255 Y=255 K=0 is red
    for key, reason in (("truncated.png", "unreadable image"), ("garbage.jpg", "unreadable image")):
        with pytest.raises(BadInput) as e:
            load_rgb(str(tmp_path / key))
        assert e.value.reason == reason


def test_tsv_and_jsonl_inputs(tmp_path, tokenizers):
    text_tok, image_tok = tokenizers
    os.makedirs(tmp_path / "imgs")
    for i in range(3):
        pattern(seed=i).save(tmp_path / "imgs" / f"{i}.png")
    tsv = (b"path\tcaption\n"
           b"imgs/0.png\ta red circle on a white background\n"
           b"imgs/1.png\ta small green triangle\n"
           b"imgs/1.png\ttwo blue squares in the top left corner\n"  # same image, second caption
           b"imgs/missing.png\ta small green triangle\n"
           b"no tab on this line\n"
           b"imgs/2.png\tcaf\xe9\n")
    (tmp_path / "list.tsv").write_bytes(tsv)
    report = preprocess(str(tmp_path / "list.tsv"), str(tmp_path / "tsv_tokens"), text_tok, image_tok,
                        max_text_tokens=MAX_TEXT, workers=0, progress=False)
    assert report["skipped"] == {"missing image": 1, "malformed line": 1, "caption not UTF-8": 1}
    check_records(records_by_key(str(tmp_path / "tsv_tokens")), {
        "imgs/0.png": (CAPTIONS[0], pattern(seed=0)), "imgs/1.png": (CAPTIONS[2], pattern(seed=1)),
        "imgs/1.png#1": (CAPTIONS[1], pattern(seed=1))}, text_tok, image_tok)

    lines = [json.dumps({"path": "imgs/0.png", "caption": CAPTIONS[3]}, ensure_ascii=False),
             json.dumps({"image": "imgs/2.png", "text": CAPTIONS[4]}),
             "{not json",
             json.dumps({"path": "imgs/1.png"}),
             json.dumps({"path": "imgs/1.png", "caption": ""})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = preprocess(str(tmp_path / "list.jsonl"), str(tmp_path / "jsonl_tokens"), text_tok,
                        image_tok, max_text_tokens=MAX_TEXT, workers=0, progress=False)
    assert report["skipped"] == {"malformed line": 2, "empty caption": 1}
    check_records(records_by_key(str(tmp_path / "jsonl_tokens")), {
        "imgs/0.png": (CAPTIONS[3], pattern(seed=0)), "imgs/2.png": (CAPTIONS[4], pattern(seed=2))},
        text_tok, image_tok)


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from megatron_t2i.data.preprocess import preprocess
    from megatron_t2i.tokenizers.vqvae import ImageTokenizer
    image_tok = ImageTokenizer.load({vq!r})
    encode = image_tok.model.encode
    def slow_encode(x):  # slow enough for the parent to kill us midway
        time.sleep(0.15)
        return encode(x)
    image_tok.model.encode = slow_encode
    preprocess({inp!r}, {out!r}, {text!r}, image_tok, max_text_tokens={max_text}, workers=0,
               batch_size=2, progress=False)
""")


def staged_records(staging):
    if not os.path.exists(os.path.join(staging, "data.mdb")):
        return 0
    env = lmdb.open(staging, readonly=True, max_dbs=2)
    try:
        with env.begin() as txn:
            db = env.open_db(b"records", txn=txn, create=False)
            return txn.stat(db)["entries"]
    except lmdb.NotFoundError:
        return 0
    finally:
        env.close()


def test_kill_9_midway_then_resume_equals_uninterrupted(tmp_path, tokenizers):
    text_tok, image_tok = tokenizers
    expected, _ = make_folder(tmp_path / "in")
    out = str(tmp_path / "tokens")
    script = CHILD.format(repo=REPO, vq=image_tok.path, inp=str(tmp_path / "in"), out=out,
                          text=text_tok.model_path, max_text=MAX_TEXT)
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while staged_records(out + ".partial") < 4:
        assert child.poll() is None, "preprocess finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert 4 <= staged_records(out + ".partial") < len(expected)
    with pytest.raises(FileNotFoundError, match="not published"):
        TokenDataset(out)

    report = preprocess(str(tmp_path / "in"), out, text_tok.model_path, image_tok.path,
                        max_text_tokens=MAX_TEXT, workers=2, batch_size=3, progress=False)
    reference = str(tmp_path / "reference")
    preprocess(str(tmp_path / "in"), reference, text_tok, image_tok, max_text_tokens=MAX_TEXT,
               workers=0, batch_size=8, progress=False)
    a, b = TokenDataset(out), TokenDataset(reference)
    assert len(a) == len(b) == len(expected)
    for i in range(len(a)):
        assert a[i].key == b[i].key
        assert np.array_equal(a[i].text_ids, b[i].text_ids)
        assert np.array_equal(a[i].image_codes, b[i].image_codes)
    assert a.meta == b.meta and report == b.meta["report"]
    assert not os.path.exists(out + ".partial")


def test_cli(tmp_path, tokenizers, capsys):
    text_tok, image_tok = tokenizers
    os.makedirs(tmp_path / "in")
    pattern().save(tmp_path / "in" / "a.png")
    write_caption(tmp_path / "in" / "a.txt", CAPTIONS[0])
    out = str(tmp_path / "tokens")
    main(["--input", str(tmp_path / "in"), "--output", out, "--text-tokenizer", text_tok.model_path,
          "--image-tokenizer", image_tok.path, "--image-size", "64", "--workers", "1",
          "--max-text-tokens", "5"])
    ds = TokenDataset(out)
    assert len(ds) == 1 and ds.layout.image_grid == 16 and ds.layout.max_text_tokens == 5
    assert ds.meta["image_size"] == 64 and ds[0].text_ids.tolist() == text_tok.encode(CAPTIONS[0])[:5]
    args = ["--input", str(tmp_path / "in"), "--output", out, "--text-tokenizer",
            text_tok.model_path, "--image-tokenizer", image_tok.path, "--image-size", "64"]
    main(args + ["--max-text-tokens", "5"])  # same settings again: the finished data set is kept
    with pytest.raises(SystemExit, match="already exists with a different layout"):  # one line
        main(args + ["--max-text-tokens", "6"])
    with pytest.raises(SystemExit, match="--image-size 34: image size 34 is not a multiple"):
        main(args[:-1] + ["34", "--output", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="--image-size 520: .*image_grid must be between 1 and 64"):
        main(args[:-1] + ["520", "--output", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="--input is required"):
        main(["--output", out, "--text-tokenizer", text_tok.model_path,
              "--image-tokenizer", image_tok.path])


def test_new_inputs_are_added_on_re_run_and_vanished_ones_refused(tmp_path, tokenizers):
    text_tok, image_tok = tokenizers
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        pattern(seed=i).save(folder / f"{i}.png")
        write_caption(folder / f"{i}.txt", CAPTIONS[i])
    (folder / "bad.png").write_bytes(b"not an image")
    write_caption(folder / "bad.txt", CAPTIONS[0])
    out = str(tmp_path / "tokens")
    first = preprocess(str(folder), out, text_tok, image_tok, MAX_TEXT, progress=False)
    assert first["written"] == 3 and first["skipped_total"] == 1
    for i in (3, 4):  # new images in the same folder
        pattern(seed=i).save(folder / f"{i}.png")
        write_caption(folder / f"{i}.txt", CAPTIONS[i])
    report = preprocess(str(folder), out, text_tok, image_tok, MAX_TEXT, progress=False)
    assert report["written"] == 5 and report["skipped_total"] == 1
    fresh = str(tmp_path / "fresh")  # the same as tokenizing all of them at once
    preprocess(str(folder), fresh, text_tok, image_tok, MAX_TEXT, progress=False)
    extended, reference = TokenDataset(out), TokenDataset(fresh)
    assert len(extended) == len(reference) == 5
    for i in range(5):
        a, b = extended[i], reference[i]
        assert a.key == b.key and np.array_equal(a.text_ids, b.text_ids) \
            and np.array_equal(a.image_codes, b.image_codes)
    os.remove(folder / "1.png")
    with pytest.raises(FileExistsError, match="1 of the inputs it was made from are no longer in "
                                              ".* \\(e.g. 1.png\\); remove"):
        preprocess(str(folder), out, text_tok, image_tok, MAX_TEXT, progress=False)
