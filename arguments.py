"""The one argparse core lives in megatron_t2i/arguments.py (importable from every entry point and
`python -m` tool); `python arguments.py` prints every flag of every group."""
from megatron_t2i.arguments import build_parser, parse_args, validate  # noqa: F401

if __name__ == "__main__":
    build_parser(prog="arguments.py").print_help()
