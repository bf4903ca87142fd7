"""The tools' entry points: flags -> config objects -> the library, as pretrain.py,
generate_samples.py and evaluate.py do at the root. Only here and in megatron_t2i/arguments.py is an
argparse namespace read.

    python -m megatron_t2i.cli.synthetic        the embedded default data set
    python -m megatron_t2i.cli.text_tokenizer   SentencePiece on captions
    python -m megatron_t2i.cli.train_vqvae      the VQ-VAE image tokenizer
    python -m megatron_t2i.cli.preprocess       images + captions -> LMDB token data set
"""
