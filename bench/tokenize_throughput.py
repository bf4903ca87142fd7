"""Throughput of the tokenization path; prints one JSON object.

    python bench/tokenize_throughput.py [--seconds 3] [--device cpu|cuda] [--shard-images 600]

  - vqvae_encode_images_per_s: VQ-VAE encoding (demo config, random weights, 64 px, batch 32);
  - vqvae_encode_gflops_per_s: the same as achieved FLOP/s (convolutions and the codebook
    distance matmul, counted by torch's FlopCounterMode, 2 FLOPs per multiply-add);
  - matmul_gflops_per_s: a square fp32 matmul measured in the same run, the machine's reference;
  - encode_flops_vs_matmul: the ratio of the two, comparable across machines (1.0 would mean the
    encoder runs as efficiently as a large matmul);
  - lmdb_random_read_records_per_s: TokenDataset random access over a data set written to a
    temporary folder (16x16 codes and 20 text ids per record);
  - shards_images_per_s_1_process / _2_processes: the whole preprocessing path (megatron_t2i.cli.
    preprocess under torchrun: streaming webdataset shards of 64 px JPEGs, decoding, VQ-VAE
    encoding, LMDB writes, and for 2 processes the merge) with 1 and 2 processes of 1 worker
    each, net of start-up (the same command re-run on its finished output, timed alone);
    shards_2_vs_1_processes is their ratio (above 1: the second process helps on this machine).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import matmul_gflops, timed  # noqa: E402
from megatron_t2i.data.lmdb_store import TokenDataset, write_token_dataset  # noqa: E402
from megatron_t2i.tokenizers.layout import TokenLayout  # noqa: E402
from megatron_t2i.tokenizers.vqvae import VQVAE, ImageTokenizer, VQVAEConfig  # noqa: E402


@torch.no_grad()
def bench_encode(device: torch.device, seconds: float, batch: int = 32) -> dict:
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(VQVAE(VQVAEConfig())).to(device)
    s = tokenizer.image_size
    x = tokenizer.normalize(torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=device))
    with FlopCounterMode(display=False) as counter:
        tokenizer.encode_images(x, batch_size=batch)
    flops = counter.get_total_flops()  # per batch
    calls, elapsed = timed(lambda: tokenizer.encode_images(x, batch_size=batch), seconds, device)
    return {"vqvae_encode_images_per_s": batch * calls / elapsed,
            "vqvae_encode_gflops_per_s": flops * calls / elapsed / 1e9,
            "vqvae_image_size": s, "vqvae_grid": tokenizer.grid, "batch_size": batch}


def bench_lmdb(seconds: float, count: int = 2000) -> dict:
    layout = TokenLayout(num_image_codes=512, num_text_tokens=1000, image_grid=16, max_text_tokens=28)
    rng = np.random.default_rng(0)
    records = [(rng.integers(0, 1000, 20), rng.integers(0, 512, 256), f"{i:06d}.png")
               for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        write_token_dataset(os.path.join(tmp, "tokens"), records, layout)
        dataset = TokenDataset(os.path.join(tmp, "tokens"))
        order = rng.permutation(count)
        reads = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for i in order[:200]:
                dataset[int(i)]
            reads += 200
            order = np.roll(order, 200)
        elapsed = time.perf_counter() - start
    return {"lmdb_random_read_records_per_s": reads / elapsed, "lmdb_records": count}


def bench_shards(images: int = 600) -> dict:
    """preprocess of `images` in 6 shards with 1 and with 2 processes, in one run."""
    import io
    import subprocess
    import tarfile

    from PIL import Image

    from megatron_t2i.tokenizers.text import train_text_tokenizer

    rng = np.random.default_rng(0)
    captions = [f"a {c} {k} on a {b} background" for c in ("red", "blue", "green")
                for k in ("circle", "square") for b in ("white", "gray")]
    with tempfile.TemporaryDirectory() as tmp:
        text = train_text_tokenizer(captions * 4, os.path.join(tmp, "text"), vocab_size=300)
        torch.manual_seed(0)
        ImageTokenizer(VQVAE(VQVAEConfig())).save(os.path.join(tmp, "vq.pt"))
        for s in range(6):
            with tarfile.open(os.path.join(tmp, f"{s:05d}.tar"), "w") as tar:
                for i in range(s * images // 6, (s + 1) * images // 6):
                    buf = io.BytesIO()
                    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
                    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
                    for suffix, data in (("jpg", buf.getvalue()),
                                         ("txt", captions[i % len(captions)].encode())):
                        info = tarfile.TarInfo(f"{i:09d}.{suffix}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        result = {"shard_images": images}
        for nproc, name in ((1, "1_process"), (2, "2_processes")):
            out = os.path.join(tmp, f"tokens{nproc}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", "-m", "megatron_t2i.cli.preprocess",
                   "--input", os.path.join(tmp, "{00000..00005}.tar"), "--output", out,
                   "--text-tokenizer", text, "--image-tokenizer", os.path.join(tmp, "vq.pt"),
                   "--image-size", "64", "--workers", "1"]
            seconds = []
            for _ in range(2):  # the second run finds the output complete: start-up alone
                start = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
                seconds.append(time.perf_counter() - start)
            result[f"shards_seconds_{name}"] = seconds[0]
            result[f"shards_startup_seconds_{name}"] = seconds[1]
            result[f"shards_images_per_s_{name}"] = images / max(1e-9, seconds[0] - seconds[1])
        result["shards_2_vs_1_processes"] = (result["shards_images_per_s_2_processes"]
                                             / result["shards_images_per_s_1_process"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shard-images", type=int, default=600,
                        help="images tokenized with 1 and with 2 processes")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {"device": str(device), "torch_threads": torch.get_num_threads()}
    result["matmul_gflops_per_s"] = matmul_gflops(device, torch.float32, args.seconds)
    result.update(bench_encode(device, args.seconds))
    result["encode_flops_vs_matmul"] = (result["vqvae_encode_gflops_per_s"]
                                        / result["matmul_gflops_per_s"])
    result.update(bench_lmdb(args.seconds))
    result.update(bench_shards(args.shard_images))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
