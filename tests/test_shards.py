"""webdataset shards: streamed preprocessing, 2 processes = 1 process record for record, resume
after kill -9 at shard granularity, and real photos' troublesome files each tokenized correctly or
skipped with its reason in report.json."""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from megatron_t2i.data.lmdb_store import TokenDataset
from megatron_t2i.data.preprocess import preprocess
from megatron_t2i.data.sources import expand_shards, is_shards
from test_preprocess import CAPTIONS, MAX_TEXT, pattern, staged_records, tokenizers  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png(image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def write_shard(path, samples):
    """samples: [(key, {suffix: bytes})] -> an uncompressed tar as img2dataset writes."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def write_shards(root, count=240, per_shard=40):
    os.makedirs(root, exist_ok=True)
    for s in range(count // per_shard):
        samples = []
        for i in range(s * per_shard, (s + 1) * per_shard):
            members = {"jpg" if i % 3 else "png": png(pattern(seed=i), "JPEG" if i % 3 else "PNG")}
            if i % 2:
                members["txt"] = CAPTIONS[i % len(CAPTIONS)].encode()
            else:
                members["json"] = json.dumps({"caption": CAPTIONS[i % len(CAPTIONS)]}).encode()
            samples.append((f"{i:09d}", members))
        write_shard(os.path.join(root, f"{s:05d}.tar"), samples)
    return os.path.join(root, "{00000..%05d}.tar" % (count // per_shard - 1))


def same_data_set(a_path, b_path):
    a, b = TokenDataset(a_path), TokenDataset(b_path)
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a[i].key == b[i].key
        assert np.array_equal(a[i].text_ids, b[i].text_ids), a[i].key
        assert np.array_equal(a[i].image_codes, b[i].image_codes), a[i].key
    assert a.meta == b.meta


def cli(text_tok, image_tok, inp, out, *extra):
    return ["-m", "megatron_t2i.cli.preprocess", "--input", inp, "--output", out,
            "--text-tokenizer", text_tok.model_path, "--image-tokenizer", image_tok.path,
            "--max-text-tokens", str(MAX_TEXT), "--image-size", "32", "--workers", "1",
            "--encode-batch-size", "8", *extra]


def torchrun(nproc: int, args, **kw):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={nproc}", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def slowed_encoder(tmp_path):
    """An environment whose Python processes sleep 0.2 s per VQ-VAE batch (a sitecustomize), so
    a kill lands midway."""
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import time\n"
        "import megatron_t2i.tokenizers.vqvae as v\n"
        "_encode = v.VQVAE.encode\n"
        "def encode(self, x):\n"
        "    time.sleep(0.2)\n"
        "    return _encode(self, x)\n"
        "v.VQVAE.encode = encode\n")
    return {**os.environ, "PYTHONPATH": str(folder)}


def test_shard_patterns(tmp_path):
    pattern_ = write_shards(tmp_path / "s", count=12, per_shard=4)
    assert is_shards(pattern_) and is_shards(str(tmp_path / "s")) and not is_shards(str(tmp_path))
    paths = expand_shards(pattern_)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_shards(str(tmp_path / "s")) == paths  # img2dataset's output folder
    assert expand_shards(f"{paths[0]}::{paths[2]}") == [paths[0], paths[2]]
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards do not exist .*00003\.tar"):
        expand_shards(str(tmp_path / "s" / "{00000..00003}.tar"))


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_after_kill_9(tmp_path, tokenizers):
    text_tok, image_tok = tokenizers
    shards = write_shards(tmp_path / "shards")
    reference = str(tmp_path / "one")
    report = preprocess(shards, reference, text_tok, image_tok, max_text_tokens=MAX_TEXT,
                        workers=2, batch_size=8, progress=False)
    assert report["written"] == 240 and report["skipped_total"] == 0
    assert report["shards"] == [f"{s:05d}.tar" for s in range(6)]
    keys = [TokenDataset(reference)[i].key for i in range(240)]
    assert keys[:2] == ["00000.tar/000000000.png", "00000.tar/000000001.jpg"]

    run = torchrun(2, cli(text_tok, image_tok, shards, str(tmp_path / "two")))
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 0, out[-3000:]
    same_data_set(str(tmp_path / "two"), reference)
    assert not [n for n in os.listdir(tmp_path) if ".part" in n]  # the parts were merged away

    # kill -9 the whole job once rank 1 has committed some records, then run it again
    killed = str(tmp_path / "killed")
    run = torchrun(2, cli(text_tok, image_tok, shards, killed), env=slowed_encoder(tmp_path))
    part = killed + ".part1-of-2.partial"
    deadline = time.time() + 120
    while staged_records(part) < 50:
        assert run.poll() is None, run.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert 50 <= staged_records(part) < 120 and not os.path.exists(killed)
    run = torchrun(2, cli(text_tok, image_tok, shards, killed))
    out = run.communicate(timeout=300)[0]
    assert run.returncode == 0, out[-3000:]
    assert "shards done" in out  # resumed, not restarted
    same_data_set(killed, reference)


def exif_rotated_jpeg():
    """A JPEG stored sideways with EXIF orientation 6 (to be shown turned 90 degrees clockwise)
    -> (its bytes, the upright picture: its decoded pixels turned by hand)."""
    stored = pattern(w=40, h=48, seed=3).transpose(Image.Transpose.ROTATE_90)  # as the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    data = png(stored, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as decoded:
        return data, decoded.convert("RGB").transpose(Image.Transpose.ROTATE_270)


def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (a decompression bomb's shape)."""
    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = data[16:29]
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_troublesome_images_tokenized_or_skipped_with_reason(tmp_path, tokenizers):
    text_tok, image_tok = tokenizers
    exif_jpeg, upright = exif_rotated_jpeg()
    rgba = np.zeros((48, 40, 4), np.uint8)
    rgba[:, :20] = (200, 30, 30, 255)
    white_red = np.full((48, 40, 3), 255, np.uint8)
    white_red[:, :20] = (200, 30, 30)
    gray = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (48, 1))
    deep = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (48, 1))
    pal = pattern(seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    wide = pattern(w=120, h=32, seed=6)
    truncated = png(pattern(seed=7), "JPEG")
    # key -> (image bytes, the RGB image it must become, or the reason it is skipped)
    cases = {
        "exif": (exif_jpeg, upright),
        "rgba": (png(Image.fromarray(rgba, "RGBA")), Image.fromarray(white_red)),
        "gray": (png(Image.fromarray(gray, "L")), Image.fromarray(np.stack([gray] * 3, -1))),
        "gray16": (png(Image.fromarray(deep)),
                   Image.fromarray(np.stack([np.rint(deep / 257).astype(np.uint8)] * 3, -1))),
        "palette": (png(pal), pal.convert("RGB")),
        "cmyk": (png(Image.new("CMYK", (40, 48), (0, 255, 255, 0)), "JPEG", quality=95), None),
        "wide": (png(wide), wide),  # non-square: resized and centre-cropped
        "tiny": (png(pattern(w=6, h=6, seed=1)), "image too small"),  # below 32 / 4
        "truncated": (truncated[: len(truncated) // 2], "unreadable image"),
        "bomb": (bomb_png(), "image too large"),
    }
    samples = [(k, {"png": data, "txt": CAPTIONS[0].encode()}) for k, (data, _) in cases.items()]
    samples += [("nocaption", {"png": png(pattern(seed=2))}),
                ("latin1", {"png": png(pattern(seed=2)), "txt": "caf\xe9".encode("latin-1")}),
                ("noimage", {"txt": b"a caption alone"})]
    write_shard(tmp_path / "00000.tar", samples)
    good = tmp_path / "00001.tar"  # a shard cut short: what precedes the damage is kept
    write_shard(good, [(f"ok{i}", {"png": png(pattern(seed=10 + i)), "txt": CAPTIONS[1].encode()})
                       for i in range(3)])
    good.write_bytes(good.read_bytes()[: 4 * 1024 + 700])  # (each member: 512 header + 512 data)

    out = str(tmp_path / "tokens")
    report = preprocess(str(tmp_path), out, text_tok, image_tok, max_text_tokens=MAX_TEXT,
                        workers=2, batch_size=4, progress=False)
    with open(os.path.join(out, "report.json")) as f:
        on_disk = json.load(f)
    reasons = {r["file"]: r["reason"] for r in on_disk["skipped_records"]}
    expected_skips = {f"00000.tar/{k}.png": why for k, (_, why) in cases.items()
                      if isinstance(why, str)}
    expected_skips.update({"00000.tar/nocaption.png": "missing caption",
                           "00000.tar/latin1.png": "caption not UTF-8",
                           "00000.tar/noimage": "missing image",
                           "00001.tar": "unreadable shard"})
    assert reasons == expected_skips
    assert on_disk["skipped"] == report["skipped"] and report["skipped_total"] == len(reasons)
    data = TokenDataset(out)
    got = {data[i].key: data[i] for i in range(len(data))}
    kept = {f"00000.tar/{k}.png" for k, (_, want) in cases.items() if not isinstance(want, str)}
    assert set(got) - kept == {"00001.tar/ok0.png"} or set(got) - kept == {
        "00001.tar/ok0.png", "00001.tar/ok1.png"}
    for key, (_, want) in cases.items():
        if want is None or isinstance(want, str):
            continue
        codes = image_tok.encode_images([want])[0].tolist()
        assert got[f"00000.tar/{key}.png"].image_codes.tolist() == codes, key


def test_pad_keeps_the_whole_picture(tmp_path, tokenizers):
    from megatron_t2i.data.preprocess import ImagePolicy
    from megatron_t2i.tokenizers.pixels import pad_square
    text_tok, image_tok = tokenizers
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    padded = pad_square(wide, 32)
    a = padded.permute(1, 2, 0).numpy()
    assert (a[8:24] == (255, 0, 0)).all() and (a[:8] == 255).all() and (a[24:] == 255).all()
    write_shard(tmp_path / "00000.tar", [("w", {"png": png(wide), "txt": CAPTIONS[0].encode()})])
    out = str(tmp_path / "tokens")
    preprocess(str(tmp_path), out, text_tok, image_tok, max_text_tokens=MAX_TEXT,
               progress=False, policy=ImagePolicy(fit="pad"))
    data = TokenDataset(out)
    want = image_tok.encode_images([Image.fromarray(a)])[0].tolist()
    assert data[0].image_codes.tolist() == want
    assert data.meta["image_policy"] == {"fit": "pad", "max_pixels": 64_000_000, "min_side": 8}
