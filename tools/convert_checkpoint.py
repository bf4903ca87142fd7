"""Offline checkpoint conversion (one process, CPU).

    python tools/convert_checkpoint.py reshard SRC OUT --tp 2          another tensor-parallel size
    python tools/convert_checkpoint.py export-fp32 SRC OUT             fp32 masters of ZeRO 1/2
    python tools/convert_checkpoint.py import-cogview SRC OUT --tp 1   a CogView release -> ours
    python tools/convert_checkpoint.py export-cogview SRC OUT --mp 1   ours -> CogView's layout
    python tools/convert_checkpoint.py regrid SRC OUT --image-grid 12  another image grid
    python tools/convert_checkpoint.py info DIR                        what a checkpoint holds

SRC is a --save folder (its `latest` is read) or one iter_XXXXXXX folder. Every output is a
weights-only checkpoint that `pretrain.py --load OUT --finetune` and generation load (CogView's
layout for export-cogview). See megatron_t2i/training/convert.py.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_t2i.arguments import _Parser, _positive_int  # noqa: E402
from megatron_t2i.tokenizers.layout import TokenLayout  # noqa: E402
from megatron_t2i.training import convert  # noqa: E402
from megatron_t2i.training.regrid import regrid  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> _Parser:
    parser = _Parser(prog="convert_checkpoint.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text, source_help, output=True):
        p = commands.add_parser(name, help=help_text, description=help_text)
        p.add_argument("src", metavar="SRC", help=source_help)
        if output:
            p.add_argument("out", metavar="OUT", help="output folder (created; an existing "
                           "checkpoint of the same iteration is replaced)")
        return p

    ours = "our checkpoint: a --save folder (its `latest`) or one iter_XXXXXXX folder"
    trust = dict(action="store_true",
                 help="unpickle objects beyond the safe allowlist (runs code from the file: only "
                      "for files you trust)")

    p = command("reshard", "rewrite a checkpoint at another tensor-parallel size", ours)
    p.add_argument("--tp", type=_positive_int, required=True, help="tensor-parallel size to write")
    p.add_argument("--tag", help="checkpoint folder name inside SRC (default: `latest`)")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: as stored)")

    p = command("export-fp32", "the fp32 master weights of a ZeRO 1/2 checkpoint, as an fp32 "
                               "weights-only checkpoint", ours)
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size to write")
    p.add_argument("--tag", help="checkpoint folder name inside SRC (default: `latest`)")
    p.add_argument("--trust-checkpoint", **trust)

    p = command("import-cogview", "a CogView checkpoint (any model-parallel size) -> ours, "
                                  "fp16 as stored, CogView's token layout",
                "CogView folder with latest_checkpointed_iteration.txt")
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size to write")
    p.add_argument("--num-attention-heads", type=_positive_int,
                   help="attention heads (shapes do not tell; default 40 at hidden 2560, "
                        "else hidden / 64)")
    p.add_argument("--trust-checkpoint", **trust)

    p = command("export-cogview", "ours (CogView's token layout) -> CogView's layout, fp16, "
                                  "tracker 'release' (for fp32 masters of a ZeRO run, "
                                  "export-fp32 first)", ours)
    p.add_argument("--mp", type=_positive_int, default=1, help="model-parallel size to write")
    p.add_argument("--tag", help="checkpoint folder name inside SRC (default: `latest`)")

    p = command("regrid", "move a checkpoint to another image grid, to fine-tune at a higher "
                          "output resolution: the position table's image rows interpolated "
                          "(megatron_t2i/training/regrid.py)", ours)
    p.add_argument("--image-grid", type=_positive_int, required=True, metavar="SIDE",
                   help="codes per side of the new grid (preprocess the data at the matching "
                        "IMAGE_SIZE: SIDE x the tokenizer's downsampling)")
    p.add_argument("--tag", help="checkpoint folder name inside SRC (default: `latest`)")

    p = command("info", "describe a checkpoint (ours or CogView's)",
                "our checkpoint or a CogView folder", output=False)
    p.add_argument("--tag", help="checkpoint folder name inside SRC (default: `latest`)")
    p.add_argument("--num-attention-heads", type=_positive_int, help="for a CogView folder")
    p.add_argument("--trust-checkpoint", **trust)
    return parser


def describe_folder(folder: str) -> str:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return f"{folder} ({len(files)} .pt files, {size / 2 ** 20:.1f} MiB)"


def describe_model(config, vocab_ids: int) -> str:
    return (f"{config.num_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads, ffn {config.ffn_hidden_size}, "
            f"{config.max_position_embeddings} positions, {config.vocab_size} vocabulary rows "
            f"({vocab_ids} ids), {config.num_parameters() / 1e6:.1f} M parameters")


def info(args) -> None:
    if os.path.isfile(os.path.join(args.src, convert.COGVIEW_TRACKER)):
        folder, iteration, mp, config = convert.read_cogview_info(
            args.src, args.num_attention_heads, args.trust_checkpoint)
        print(f"CogView checkpoint {describe_folder(folder)}\n  iteration {iteration}, "
              f"model-parallel size {mp}\n  model: "
              f"{describe_model(config, TokenLayout.cogview().vocab_size)}")
        return
    folder, config, layout, meta = convert.read_info(args.src, args.tag)
    print(f"checkpoint {describe_folder(folder)}\n  iteration {meta.get('iteration')}, "
          f"TP {meta.get('tensor_model_parallel_size')} x PP "
          f"{meta.get('pipeline_model_parallel_size')} x DP {meta.get('data_parallel_size')}, "
          f"ZeRO stage {meta.get('zero_stage')}"
          f"{', weights only' if meta.get('weights_only') else ''}\n"
          f"  model: {describe_model(config, layout.vocab_size)}\n"
          f"  token layout {layout.name!r}: {layout.num_image_codes} image codes, "
          f"{layout.num_text_tokens} text ids, {layout.image_grid}x{layout.image_grid} grid")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            info(args)
            return 0
        if args.command == "reshard":
            written = convert.reshard(args.src, args.out, args.tp, args.tag,
                                      DTYPES.get(args.dtype))
        elif args.command == "regrid":
            written = regrid(args.src, args.out, args.image_grid, args.tag)
        elif args.command == "export-fp32":
            written = convert.export_fp32(args.src, args.out, args.tp, args.tag,
                                          args.trust_checkpoint)
        elif args.command == "import-cogview":
            written = convert.import_cogview(args.src, args.out, args.tp,
                                             args.num_attention_heads, args.trust_checkpoint)
        else:
            written = convert.export_cogview(args.src, args.out, args.mp, args.tag)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"convert_checkpoint.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written to a .partial folder, renamed when complete
        print(f"convert_checkpoint.py {args.command}: interrupted; a checkpoint is renamed into "
              f"place only when complete, so no partial one is left: run it again",
              file=sys.stderr)
        return 130
    if args.command == "export-cogview":
        print(f"wrote {describe_folder(written)}, tracker "
              f"{os.path.join(args.out, convert.COGVIEW_TRACKER)} -> {convert.COGVIEW_RELEASE}")
    else:
        _, config, layout, meta = convert.read_info(written)
        print(f"wrote {describe_folder(written)}: TP {meta['tensor_model_parallel_size']}, "
              f"iteration {meta['iteration']}, {describe_model(config, layout.vocab_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
