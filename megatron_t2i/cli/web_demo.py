"""Serve the web demo (megatron_t2i/generation/web_demo.py) over one or more checkpoints.

    python -m megatron_t2i.cli.web_demo [--load CKPT ...] [--host 127.0.0.1] [--port 7860]

Without --load: every quickstart checkpoint there is (checkpoints/demo, the paired-caption model;
checkpoints/clip-gen, the language-free one), so the two can be compared side by side. It listens
on 127.0.0.1 only unless --host says otherwise (e.g. 0.0.0.0 to expose it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from megatron_t2i.generation.config import LoadConfig
from megatron_t2i.generation.loading import build_context
from megatron_t2i.generation.web_demo import DemoLimits, build_app

PROG = "./scripts/web_demo.sh"
QUICKSTART_CHECKPOINTS = ("checkpoints/demo", "checkpoints/clip-gen")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--load", action="append", metavar="CKPT",
                   help="a checkpoint folder, repeatable (default: the quickstart's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [%(default)s]")
    p.add_argument("--port", type=int, default=7860, help="[%(default)s]")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N [%(default)s]")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoints and tokenizers fully (only files you trust)")
    p.add_argument("--max-samples", type=int, default=DemoLimits.max_samples,
                   help="samples per prompt at most [%(default)s]")
    p.add_argument("--concurrency", type=int, default=DemoLimits.concurrency,
                   help="requests drawing at once [%(default)s]")
    p.add_argument("--queue-size", type=int, default=DemoLimits.queue_size,
                   help="requests waiting at most [%(default)s]")
    p.add_argument("--max-inference-batch-size", type=int, default=8,
                   help="samples drawn together [%(default)s]")
    p.add_argument("--output-dir", help="where the PNGs of each request go [a temporary folder]")
    args = p.parse_args(argv)
    for flag in ("max_samples", "concurrency", "queue_size", "max_inference_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def checkpoints(loads: list[str] | None, root: str) -> list[str]:
    if loads:
        return loads
    found = [os.path.join(root, c) for c in QUICKSTART_CHECKPOINTS
             if os.path.isfile(os.path.join(root, c, "latest"))]
    if not found:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(root, QUICKSTART_CHECKPOINTS[0])}:"
                                f" make one with ./scripts/quickstart.sh, or pass --load DIR")
    return found


def main(argv=None) -> int:
    args = parse(argv)
    try:
        folders = checkpoints(args.load, os.getcwd())
        contexts = {}
        for folder in folders:
            name = os.path.basename(os.path.normpath(folder))
            while name in contexts:
                name += "'"
            contexts[name] = build_context(LoadConfig(folder, device=args.device,
                                                        trust_checkpoint=args.trust_checkpoint))
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    limits = DemoLimits(args.max_samples, DemoLimits.max_prompt_chars, args.concurrency,
                        args.queue_size)
    output = args.output_dir or tempfile.mkdtemp(prefix="megatron_t2i_demo_")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    app = build_app(contexts, limits, output, args.max_inference_batch_size)
    print(f"{PROG}: serving {', '.join(contexts)} on http://{args.host}:{args.port} "
          f"(PNGs under {output})", flush=True)
    app.launch(server_name=args.host, server_port=args.port, show_error=True,
               allowed_paths=[output])
    return 0


if __name__ == "__main__":
    sys.exit(main())
