"""Train the SentencePiece text tokenizer (megatron_t2i/tokenizers/text.py).

    python -m megatron_t2i.cli.text_tokenizer --help
"""
from __future__ import annotations

import sys

from megatron_t2i.arguments import parse_args
from megatron_t2i.data.sources import all_examples, is_shards
from megatron_t2i.tokenizers.text import TextTokenizer, train_text_tokenizer


def main(argv=None) -> None:
    prog = "python -m megatron_t2i.cli.text_tokenizer"
    args = parse_args(argv, groups=("data", "tokenizers"), prog=prog, outputs=("text_tokenizer",),
                      description="Train a SentencePiece text tokenizer on captions "
                                  "(--input: a caption file, a folder of .txt captions or "
                                  "webdataset shards; "
                                  "default: the embedded data set in --synthetic-dir).")
    if not args.text_tokenizer or not args.text_tokenizer.endswith(".model"):
        sys.exit(f"{prog}: error: --text-tokenizer OUT.model is required (got {args.text_tokenizer!r})")
    source = args.input or args.synthetic_dir
    try:
        if is_shards(source):  # webdataset shards: their captions, streamed
            source = [s.caption for s in all_examples(source)]
        path = train_text_tokenizer(source, args.text_tokenizer[:-len(".model")], args.text_vocab_size)
        tokenizer = TextTokenizer(path)
    except (ValueError, OSError) as e:
        sys.exit(f"{prog}: error: {e}")
    print(f"text tokenizer: {tokenizer.vocab_size} ids (asked {args.text_vocab_size}) in {path}")


if __name__ == "__main__":
    main()
