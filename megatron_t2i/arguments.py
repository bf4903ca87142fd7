"""The one argparse core of every entry point.

Each entry point asks for the groups it needs:

    args = parse_args(argv, groups=("model", "data", "training", "distributed"), description=...)

Flags are validated after parsing; any problem is one line on stderr (`<prog>: error: ...`) and
exit status 2 -- never a traceback from deep inside.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from megatron_t2i import tasks as registry
from megatron_t2i.config import MODEL_SIZES
from megatron_t2i.data.synthetic import CAPTION_ORDERS
from megatron_t2i.generation.config import METHODS, GenerationConfig, LoadConfig
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.tokenizers.layout import IMAGE_ORDERS, IMAGE_POSITIONS
from megatron_t2i.tokenizers.vqvae import KINDS
from megatron_t2i.training.config import TrainConfig

GROUPS = ("model", "data", "tokenizers", "training", "distributed", "generation", "evaluation")
# A query's samples are all drawn before the next query is read, and with --rerank-top held
# until the best are chosen: more than this is better asked for as the same query repeated.
MAX_SAMPLES_PER_QUERY = 1024


class ArgumentError(ValueError):
    """A flag combination that cannot work; the message names the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _float_list(text):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") \
            from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _beta_pair(text):
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A,B (two positive numbers), got {text!r}") \
            from None
    if not (a > 0 and b > 0):
        raise argparse.ArgumentTypeError(f"expected two positive numbers A,B, got {text!r}")
    return a, b


def _box(text):
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1, fractions of the image's width "
                                         f"and height with X0 < X1 and Y0 < Y1, got {text!r}")
    return box


def _task_weights(text):
    try:
        return registry.parse_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(parser):
    g = parser.add_argument_group("model", "transformer shape; --model-size picks a named size")
    g.add_argument("--model-size", default="demo", choices=list(MODEL_SIZES), metavar="NAME",
                   help=f"named size: {', '.join(MODEL_SIZES)} (default: %(default)s)")
    g.add_argument("--num-layers", type=_positive_int, help="override the size's layer count")
    g.add_argument("--hidden-size", type=_positive_int, help="override the size's hidden size")
    g.add_argument("--num-attention-heads", type=_positive_int, help="override the size's heads")
    g.add_argument("--hidden-dropout", type=_fraction, default=0.1)
    g.add_argument("--attention-dropout", type=_fraction, default=0.1)
    g.add_argument("--sandwich-ln", action=argparse.BooleanOptionalAction,
                   help="extra LayerNorms after attention and MLP (default: the size's; "
                        "CogView's sizes have them, demo not)")
    g.add_argument("--pb-relax", action=argparse.BooleanOptionalAction,
                   help="precision-bottleneck relaxation of attention and LayerNorm "
                        "(default: the size's, as --sandwich-ln)")
    g.add_argument("--decoder-layers", type=int, default=0, metavar="N",
                   help="a denoiser's mask decoder (MaskDiT): N layers after the trunk that read "
                        "every patch, the hidden ones as a mask token; needed by --mask-ratio, "
                        "give the unmasked run you compare with the same (default: %(default)s)")
    g.add_argument("--mlp-conv", action="store_true",
                   help="a denoiser's MLPs convolve each channel over the 3x3 neighbourhood of "
                        "its latent patch (TLD's depth-wise convolution against patchy images)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute layer activations in the backward pass to save memory")


def add_data_args(parser):
    g = parser.add_argument_group("data", "data sets, the embedded default and preprocessing")
    g.add_argument("--data-path", nargs="+", metavar="PATH",
                   help="token data sets (LMDB folders written by preprocess, or CogView .bin)")
    g.add_argument("--input", metavar="PATH",
                   help="images with captions: a folder (caption in a .txt beside each image), "
                        "a TSV (path<TAB>caption), a JSONL file, or webdataset / img2dataset "
                        "shards (a .tar, a brace pattern such as 'shards/{00000..00099}.tar', "
                        "or a folder of .tar files)")
    g.add_argument("--output", metavar="PATH", help="where to write the result")
    g.add_argument("--synthetic-dir", default="data/synthetic",
                   help="folder of the embedded default data set (default: %(default)s)")
    g.add_argument("--synthetic-count", type=_positive_int, default=2000,
                   help="images in the embedded default data set (default: %(default)s)")
    g.add_argument("--chinese-fraction", type=_fraction, default=0.2,
                   help="share of Chinese captions in the embedded default (default: %(default)s)")
    g.add_argument("--caption-order", choices=CAPTION_ORDERS, default="reading",
                   help="the embedded default's captions name their shapes in reading order, or in "
                        "any order (harder: see megatron_t2i/data/synthetic.py) (default: %(default)s)")
    g.add_argument("--image-size", type=_positive_int, default=64,
                   help="image side in pixels after resize and centre crop (default: %(default)s)")
    g.add_argument("--workers", type=_positive_int,
                   default=max(1, min(8, (os.cpu_count() or 1)
                                      // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))),
                   help="parallel worker processes (of each process a launcher starts) "
                        "(default: %(default)s)")
    g.add_argument("--encode-batch-size", type=_positive_int, default=32,
                   help="images per VQ-VAE batch when preprocessing (default: %(default)s)")
    g.add_argument("--image-fit", choices=("crop", "pad"), default="crop",
                   help="preprocess: how an image becomes a square: crop (short side to "
                        "--image-size, centre crop) or pad (long side to --image-size, centred "
                        "on white, nothing cut off) (default: %(default)s)")
    g.add_argument("--max-image-pixels", type=_positive_int, default=64_000_000,
                   help="preprocess: images of more pixels are skipped, read from the header "
                        "before decoding (decompression bombs) (default: %(default)s)")
    g.add_argument("--min-image-side", type=int, default=None, metavar="PIXELS",
                   help="preprocess: images with a shorter side are skipped (0 keeps all; "
                        "default: a quarter of --image-size, past which upscaling is mostly blur)")
    g.add_argument("--sr-low-res", action="store_true",
                   help="preprocess: also store the codes of each image at half resolution, the "
                        "training data of super-resolution (pretrain.py --tasks super-resolution)")
    g.add_argument("--seed", type=int, default=1234, help="random seed (default: %(default)s)")


def add_tokenizer_args(parser):
    g = parser.add_argument_group("tokenizers", "text (SentencePiece) and image (VQ-VAE) tokenizers")
    g.add_argument("--text-tokenizer", metavar="FILE.model", help="SentencePiece model")
    g.add_argument("--text-vocab-size", type=_positive_int, default=1000,
                   help="text vocabulary size when training a tokenizer (default: %(default)s)")
    g.add_argument("--max-text-tokens", type=_positive_int, default=40,
                   help="text ids kept per caption; longer ones are truncated with a warning "
                        "(default: %(default)s)")
    g.add_argument("--image-positions", choices=IMAGE_POSITIONS, default="fixed",
                   help="position ids of the image after a caption: the same for every caption "
                        "length (fixed), or numbered on from the text as CogView does (after_text); "
                        "stored in the data set's layout (default: %(default)s)")
    g.add_argument("--image-order", choices=IMAGE_ORDERS, default="raster",
                   help="the order text->image sequences generate an image in: raster (one code "
                        "per step) or lshape (Lformer: an h x h grid in h L-shaped blocks); "
                        "stored in the data set's layout, so a model trained on it generates "
                        "in that order (records keep raster codes) (default: %(default)s)")
    g.add_argument("--image-tokenizer", metavar="FILE.pt", help="VQ-VAE or VQGAN checkpoint")
    g.add_argument("--image-tokenizer-kind", choices=KINDS, default=None,
                   help="train_vqvae: what to train (default vqvae; vqgan adds a patch-GAN and an "
                        "optional perceptual loss, for real photographs); elsewhere: the kind the "
                        "given tokenizer must be (default: any)")
    g.add_argument("--tensorboard-dir", metavar="DIR", help="write TensorBoard logs here")
    # training the VQ-VAE (tokenizers/train_vqvae.py); the defaults are the demo tokenizer
    # (36-pixel images: 9x9 codes, one 3x3 block per cell of the synthetic images' grid)
    g.add_argument("--vqvae-steps", type=_positive_int, default=6000)
    g.add_argument("--vqvae-batch-size", type=_positive_int, default=8)
    g.add_argument("--vqvae-lr", type=float, default=2e-3)
    g.add_argument("--vqvae-codebook-size", type=_positive_int, default=1024)
    g.add_argument("--vqvae-downsample", type=int, choices=(2, 4, 8, 16), default=4,
                   help="pixels per code along a side (default: %(default)s)")
    g.add_argument("--vqvae-channels", type=_positive_int, default=32)
    g.add_argument("--vqvae-encoder", choices=("patch", "conv"), default="patch",
                   help="patch: each code depends on its own patch only; conv: on the pixels "
                        "around it too, as CogView's (default: %(default)s)")
    g.add_argument("--vqvae-embed-dim", type=_positive_int, default=32)
    g.add_argument("--vqvae-l2-codes", action="store_true",
                   help="LlamaGen's codes: encoder outputs and codebook entries l2-normalised "
                        "(with a small --vqvae-embed-dim such as 8: high codebook usage)")
    g.add_argument("--vqvae-upsample", choices=("transposed", "nearest"), default="transposed",
                   help="the decoder's 2x steps: transposed convolutions (CogView's) or nearest "
                        "neighbour + 3x3 convolution (no checkerboard; what a VQGAN wants) "
                        "(default: %(default)s)")
    g.add_argument("--vqvae-res-blocks", type=int, choices=range(0, 9), metavar="0..8", default=2)
    g.add_argument("--vqvae-save-every", type=_positive_int, default=500,
                   help="steps between training states written beside the output (<out>.resume.pt),"
                        " from which the same command resumes (default: %(default)s)")
    # the VQGAN's losses (tokenizers/vqgan.py); taming's defaults where they fit a CPU
    g.add_argument("--vqgan-disc-start", type=int, default=None, metavar="STEPS",
                   help="steps before the discriminator counts (default: a third of --vqvae-steps)")
    g.add_argument("--vqgan-disc-weight", type=float, default=0.8,
                   help="scale of the adaptive GAN weight (default: %(default)s)")
    g.add_argument("--vqgan-disc-channels", type=_positive_int, default=64)
    g.add_argument("--vqgan-disc-layers", type=_positive_int, default=3)
    g.add_argument("--vqgan-disc-lr", type=float, default=None,
                   help="discriminator learning rate (default: --vqvae-lr)")
    g.add_argument("--vqgan-perceptual-weight", type=float, default=0.0,
                   help="weight of a perceptual loss from a feature network trained first on the "
                        "same images (tokenizers/feature_net.py; 0: none) (default: %(default)s)")
    # the CLIP trained here (tokenizers/clip.py, cli/train_clip.py); defaults: the demo's
    g.add_argument("--clip", metavar="FILE.pt",
                   help="a CLIP checkpoint trained here (default for generation: the one stored "
                        "with the checkpoint, if any)")
    g.add_argument("--clip-steps", type=_positive_int, default=3000)
    g.add_argument("--clip-batch-size", type=_positive_int, default=128)
    g.add_argument("--clip-lr", type=float, default=1e-3)
    g.add_argument("--clip-width", type=_positive_int, default=64,
                   help="width of both towers and of the embedding (default: %(default)s)")
    g.add_argument("--clip-layers", type=_positive_int, default=3,
                   help="layers of each tower (default: %(default)s)")
    g.add_argument("--clip-patch-size", type=_positive_int, default=12,
                   help="pixels per side of an image patch, a divisor of --image-size (default: "
                        "%(default)s: the 3x3 cells of the embedded default's 36-pixel images)")


def add_training_args(parser):
    g = parser.add_argument_group("training", "optimisation, schedule and checkpoints")
    g.add_argument("--train-iters", type=_positive_int, default=1000)
    g.add_argument("--micro-batch-size", type=_positive_int, default=8)
    g.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1)
    g.add_argument("--lr", type=float, default=4e-4)
    g.add_argument("--min-lr-ratio", type=_fraction, default=0.1)
    g.add_argument("--warmup", type=_fraction, default=0.1, help="warm-up share of --train-iters")
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--txt-loss-scale", type=float, default=1.0,
                   help="weight of the caption's targets in text->image and super-resolution "
                        "sequences (CogView's tutorial used 5); the caption direction's text "
                        "keeps weight 1")
    g.add_argument("--save", metavar="DIR", help="checkpoint folder")
    g.add_argument("--load", metavar="DIR", help="checkpoint to resume from")
    g.add_argument("--save-interval", type=_positive_int, default=500)
    g.add_argument("--log-interval", type=_positive_int, default=10)
    g.add_argument("--eval-interval", type=_positive_int, default=200)
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2),
                   help="ZeRO stage (default: the DeepSpeed JSON's, else 0; at most 1 with PP)")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: take the weights only (fresh optimiser, schedule, data)")
    g.add_argument("--init-trunk", metavar="DIR",
                   help="start the shared trunk (word and position embeddings, transformer "
                        "layers, final LayerNorm) from another checkpoint of the same size and "
                        "vocabulary, e.g. an autoregressive model's, and the task's own parts "
                        "(a denoiser's patch inputs and head) from scratch; a fresh run only "
                        "(re-running resumes from --save as usual)")
    g.add_argument("--resume-fallback", action="store_true",
                   help="when the newest checkpoint is damaged (its files differ from its "
                        "manifest), resume from the newest intact one before it")
    g.add_argument("--keep-checkpoints", type=int, default=3, metavar="N",
                   help="keep the newest N checkpoints and the best by held-out loss, remove "
                        "older ones after each save (0: keep all) (default: %(default)s)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle checkpoint files fully: only for files whose origin you trust "
                        "(by default only tensors and plain data are read; a pickle could run "
                        "code)")
    g.add_argument("--tasks", type=_task_weights, default={"text2image": 1.0},
                   metavar="TASK:W,...",
                   help=f"training tasks and their weights, e.g. text2image:3,image2text:1 "
                        f"(trainable: {', '.join(registry.trainable())}; default: text2image)")
    g.add_argument("--text-dropout", type=_fraction, default=0.0,
                   help="probability of dropping a t2i caption, for classifier-free guidance")
    g.add_argument("--condition-slots", type=_positive_int, default=4,
                   help="embedding slots a conditioned task (clip2image) projects its CLIP "
                        "embedding into (default: %(default)s)")
    g.add_argument("--clip-noise", type=_fraction, default=0.0, dest="condition_noise",
                   help="LAFITE's xi: the CLIP image embedding of a language-free task is "
                        "normalise((1-xi) f + xi normalise(noise)) (default: %(default)s)")
    g.add_argument("--cvae-latent-dim", type=int, default=0, metavar="D",
                   help="Lformer's CVAE global latent of D dimensions for text->image (0: none): "
                        "its posterior reads each record's CLIP image embedding (preprocess "
                        "with --clip FILE), its prior the caption (default: %(default)s)")
    g.add_argument("--cvae-kl-weight", type=float, default=1.0,
                   help="beta of CE + beta * KL, per token (default: %(default)s)")
    g.add_argument("--cvae-kl-warmup", type=int, default=500, metavar="ITERS",
                   help="iterations over which beta rises from 0 (default: %(default)s)")
    g.add_argument("--noise-beta", type=_beta_pair, default=(0.75, 0.75), metavar="A,B",
                   help="a denoiser's (--tasks diffusion) noise levels sigma ~ Beta(A, B), "
                        "x_t = (1 - sigma) x0 + sigma noise (default: TLD's 0.75,0.75)")
    g.add_argument("--mask-ratio", type=_fraction, default=0.0,
                   help="a denoiser's masked-patch training (MaskDiT): the share of latent "
                        "patches hidden from the trunk in each sample, e.g. 0.5 (needs "
                        "--decoder-layers; default: %(default)s)")
    g.add_argument("--mask-loss-weight", type=float, default=0.1,
                   help="the weight of the hidden patches' reconstruction loss (MaskDiT's 0.1, "
                        "the default)")
    g.add_argument("--unmask-finetune-iters", type=int, default=0, metavar="ITERS",
                   help="the last ITERS iterations of --train-iters train with every patch "
                        "visible (MaskDiT's unmasked fine-tune; default: %(default)s)")
    g.add_argument("--inpaint-masks", type=_fraction, default=0.0, metavar="SHARE",
                   help="in/outpainting (TLD's mask channel): each patch of a denoiser also "
                        "reads its known latent and a 0/1 mask through new zero-initialised "
                        "weights, and this share of the samples is given a random part of "
                        "its patches (a box to repaint, or the box kept), e.g. 0.75; fine-tune "
                        "a trained denoiser with it (--load DIR --finetune) (default: off)")
    g.add_argument("--ema-decay", type=_fraction, default=0.0,
                   help="keep an exponential moving average of the weights with this decay "
                        "(e.g. 0.999; 0: none); saved with every checkpoint, and what generation "
                        "samples with (default: %(default)s)")
    g.add_argument("--holdout-fraction", type=_fraction, default=0.02,
                   help="records held out for evaluation, never trained on (default: %(default)s)")
    g.add_argument("--eval-iters", type=int, default=10, help="micro-batches per evaluation")
    g.add_argument("--peak-flops", type=float, metavar="FLOP/S",
                   help="the FLOP/s per device that MFU divides by, e.g. a GPU's datasheet bf16 "
                        "peak (989e12 for an H100 SXM); default: the best matmul measured in the "
                        "run, probed again as it goes")


def add_distributed_args(parser):
    g = parser.add_argument_group("distributed", "parallel layout and launcher")
    g.add_argument("--tensor-model-parallel-size", "--mp-size", type=_positive_int, default=1,
                   dest="tensor_model_parallel_size")
    g.add_argument("--pipeline-model-parallel-size", "--pp-size", type=_positive_int, default=1,
                   dest="pipeline_model_parallel_size")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"),
                   help="default: nccl on GPUs, gloo on CPU")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the launcher")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   metavar="JSON", help="DeepSpeed JSON config")


def add_generation_args(parser):
    g = parser.add_argument_group("generation", "sampling and inputs")
    g.add_argument("--input-source", default="interactive",
                   help="'interactive' or a file with one query per line")
    g.add_argument("--output-path", default="samples")
    g.add_argument("--batch-size", type=_positive_int, default=4,
                   help=f"samples per query, at most {MAX_SAMPLES_PER_QUERY} (default: %(default)s)")
    g.add_argument("--max-inference-batch-size", type=_positive_int, default=8)
    g.add_argument("--temperature", type=float,
                   help="default: the task's (1.0; 1.02 for super-resolution)")
    g.add_argument("--top-k", type=int, default=200)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--with-id", action="store_true", help="input lines are id<TAB>query")
    g.add_argument("--debug", action="store_true", help="write one grid per query")
    g.add_argument("--task", default="text2image", choices=list(registry.REGISTRY),
                   help="generation task (default: %(default)s)")
    g.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance: logits + s * (logits - unconditional logits); "
                        "0 disables it (default: the scale chosen on held-out captions for the "
                        "checkpoint, recorded in its guidance.json by python -m "
                        "megatron_t2i.cli.choose_guidance, which pretrain_single_node.sh runs; "
                        "else 0)")
    g.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                   help="which checkpoint of a --load save folder: the newest, or the best by "
                        "held-out loss (default: %(default)s)")
    g.add_argument("--decoding", choices=("auto", *IMAGE_ORDERS), default="auto",
                   help="text->image decoding: raster (one code per step, KV-cached) or lshape "
                        "(Lformer: an h x h grid in h block-parallel steps); it must be the order "
                        "the checkpoint was trained in, which auto takes (default: %(default)s)")
    g.add_argument("--method", choices=METHODS, default="auto",
                   help="what the checkpoint must be: autoregressive (codes drawn by --decoding) "
                        "or diffusion (a denoiser, --tasks diffusion); auto takes what it is "
                        "(default: %(default)s)")
    g.add_argument("--diffusion-steps", type=_positive_int, default=15,
                   help="a denoiser's sampler steps (default: TLD's %(default)s)")
    g.add_argument("--sampler", choices=("dpm-solver++", "ddim"), default="dpm-solver++",
                   help="a denoiser's sampler, diffusers' DPMSolverMultistepScheduler (flow "
                        "sigmas) or DDIMScheduler (default: %(default)s)")
    g.add_argument("--guidance-scales", type=_float_list, default=(0.0, 1.0, 2.0, 3.0, 5.0),
                   metavar="S,S,...",
                   help="choose_guidance: the scales tried (default: 0,1,2,3,5)")
    g.add_argument("--no-ema", dest="ema", action="store_false",
                   help="sample with the trained weights, not their moving average (saved by "
                        "--ema-decay)")
    g.add_argument("--keep-rows", type=_positive_int,
                   help="completion: rows of the input image's codes kept (default: half); of "
                        "an L-shape model, its first K blocks (the top-left K x K square)")
    g.add_argument("--mask-box", type=_box, metavar="X0,Y0,X1,Y1",
                   help="completion by a denoiser: repaint this box (fractions of the width and "
                        "height, e.g. 0.25,0.25,0.75,0.75) and keep the rest (inpainting); "
                        "without it the top --keep-rows rows are kept")
    g.add_argument("--mask-outside", action="store_true",
                   help="with --mask-box: keep the box and repaint the rest (outpainting)")
    g.add_argument("--rerank-top", type=int, default=0, metavar="K",
                   help="keep the K of --batch-size samples whose image best explains the text "
                        "(post-selection scores; 0: keep all)")
    g.add_argument("--rerank", choices=("auto", "caption", "clip"), default="auto",
                   help="what --rerank-top scores by: the caption likelihood, the CLIP's cosine "
                        "similarity, or auto: clip for a CLIP-conditioned model, else caption "
                        "(default: %(default)s)")
    g.add_argument("--beam-size", type=int, default=0, metavar="N",
                   help="image2text: beam search with N beams (1: greedy); 0 samples --batch-size "
                        "captions per image (default: %(default)s)")
    g.add_argument("--top", type=int, default=0, metavar="K",
                   help="post-selection: copy the K best images of each query into "
                        "{output-path}/{id or text}/ (default: %(default)s, none)")
    g.add_argument("--clip-model", metavar="NAME",
                   help="post-selection: also score with this open_clip architecture (a built-in "
                        "name such as ViT-B-32, or a model config .json); needs --clip-checkpoint")
    g.add_argument("--clip-checkpoint", metavar="FILE",
                   help="local weights of --clip-model (nothing is downloaded)")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (this process's GPU if any) (default: auto)")
    g.add_argument("--offload", action="store_true",
                   help="keep the layers' weights on the CPU, each moved to the GPU only while it "
                        "runs (for GPUs too small for the model)")
    g.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole sequence at every step (the slow reference)")
    if "--seed" not in parser._option_string_actions:  # the data group's --seed serves both
        g.add_argument("--seed", type=int, default=1234,
                       help="seed of the per-sample random streams (default: %(default)s)")


def add_evaluation_args(parser):
    g = parser.add_argument_group("evaluation", "evaluate.py: caption alignment, diversity, "
                                                "tokenizer figures, held-out loss")
    g.add_argument("--num-prompts", type=_positive_int, default=16,
                   help="held-out captions to generate from (default: %(default)s)")
    g.add_argument("--samples-per-prompt", type=_positive_int, default=4,
                   help="images generated per caption (default: %(default)s)")
    g.add_argument("--images", metavar="DIR",
                   help="score the images of DIR (listed in DIR/attributes.jsonl) instead of "
                        "generating; on the embedded default this checks the attribute reader")
    g.add_argument("--reader-cache", metavar="DIR",
                   help="where the trained attribute reader is kept (default: attribute_reader/ "
                        "beside --synthetic-dir)")


ADDERS = {"model": add_model_args, "data": add_data_args, "tokenizers": add_tokenizer_args,
          "training": add_training_args, "distributed": add_distributed_args,
          "generation": add_generation_args, "evaluation": add_evaluation_args}


def build_parser(groups=GROUPS, description=None, prog=None) -> argparse.ArgumentParser:
    unknown = set(groups) - set(ADDERS)
    if unknown:
        raise ValueError(f"unknown argument groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
    parser = _Parser(prog=prog, description=description)
    for name in GROUPS:
        if name in groups:
            ADDERS[name](parser)
    return parser


def validate(args, outputs=()) -> None:
    """Cross-flag checks; raises ArgumentError naming the flag. File flags named in `outputs` are
    written, not read, so they need not exist."""
    a = vars(args)
    if "model_size" in a:
        shape = MODEL_SIZES[args.model_size]
        layers = shape.num_layers
        hidden = args.hidden_size or shape.hidden_size
        heads = args.num_attention_heads or shape.num_attention_heads
        if hidden % heads:
            raise ArgumentError(f"--num-attention-heads {heads} does not divide --hidden-size {hidden}")
        tp = a.get("tensor_model_parallel_size", 1)
        if heads % tp:
            raise ArgumentError(f"--tensor-model-parallel-size {tp} does not divide the "
                                f"{heads} attention heads")
        pp = a.get("pipeline_model_parallel_size", 1)
        if pp > (args.num_layers or layers):
            raise ArgumentError(f"--pipeline-model-parallel-size {pp} exceeds the "
                                f"{args.num_layers or layers} layers")
    for path in a.get("data_path") or []:
        if not os.path.exists(path):
            raise ArgumentError(f"--data-path {path}: no such file or folder")
    for flag in ("text_tokenizer", "image_tokenizer", "deepspeed_config", "clip_checkpoint",
                 "clip"):
        path = a.get(flag)
        if path and flag not in outputs and not os.path.isfile(path):
            raise ArgumentError(f"--{flag.replace('_', '-')} {path}: no such file")
    if a.get("fp16") and a.get("bf16"):
        raise ArgumentError("--fp16 and --bf16 exclude each other")
    if "top_p" in a and not 0.0 <= args.top_p < 1.0:
        raise ArgumentError(f"--top-p must be in [0, 1), got {args.top_p}")
    if "temperature" in a and args.temperature is None:  # the task's default
        args.temperature = registry.get(a.get("task", "text2image")).temperature
    if "temperature" in a and args.temperature <= 0:
        raise ArgumentError(f"--temperature must be positive, got {args.temperature}")
    if a.get("clip_model") and not a.get("clip_checkpoint"):
        raise ArgumentError("--clip-model needs --clip-checkpoint FILE (weights are never "
                            "downloaded)")
    for flag in ("top_k", "cfg_scale", "rerank_top", "beam_size", "top", "keep_checkpoints"):
        if (a.get(flag) or 0) < 0:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be >= 0, got {a[flag]}")
    if a.get("batch_size", 0) > MAX_SAMPLES_PER_QUERY:
        raise ArgumentError(f"--batch-size {args.batch_size}: at most {MAX_SAMPLES_PER_QUERY} "
                            f"samples per query (they are all drawn before the next query is "
                            f"read, and with --rerank-top kept until the best are chosen); for "
                            f"more, list the query several times: each line has its own seeds")
    source = a.get("input_source")
    if source and source != "interactive" and not os.path.isfile(source):
        raise ArgumentError(f"--input-source {source}: no such file (or use 'interactive')")


# ---- flags -> config objects (the library below takes these, never a namespace) -------------------
def model_overrides(args) -> dict:
    """ModelConfig fields the model flags set over the named size's."""
    overrides = {k: v for k, v in {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
                                   "num_attention_heads": args.num_attention_heads}.items() if v}
    overrides.update({k: v for k, v in {"sandwich_ln": args.sandwich_ln,
                                        "pb_relax": args.pb_relax}.items() if v is not None})
    return {**overrides, "hidden_dropout": args.hidden_dropout,
            "attention_dropout": args.attention_dropout,
            "checkpoint_activations": args.checkpoint_activations,
            **({"decoder_layers": args.decoder_layers} if args.decoder_layers else {}),
            **({"mlp_conv": True} if args.mlp_conv else {})}


def train_config(args) -> TrainConfig:
    """pretrain.py's flags (groups model, data, tokenizers, training, distributed)."""
    names = {f.name for f in fields(TrainConfig)} - {"model_overrides", "data_path"}
    return TrainConfig(data_path=tuple(args.data_path or ()), model_overrides=model_overrides(args),
                       **{name: getattr(args, name) for name in names})


def load_config(args) -> LoadConfig:
    return LoadConfig(args.load, args.device, "fp16" if args.fp16 else "bf16" if args.bf16 else None,
                      args.offload, args.trust_checkpoint, args.text_tokenizer, args.image_tokenizer,
                      args.clip, args.ema, args.checkpoint, args.image_tokenizer_kind)


def generation_config(args, **changes) -> GenerationConfig:
    """The generation group's flags (plus `changes`, e.g. samples=16) as a GenerationConfig."""
    fields = dict(
        samples=args.batch_size, max_inference_batch_size=args.max_inference_batch_size,
        sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
        cfg_scale=args.cfg_scale, seed=args.seed, use_cache=not args.no_kv_cache,
        rerank_top=args.rerank_top, rerank_by=args.rerank, beam_size=args.beam_size,
        keep_rows=args.keep_rows, mask_box=args.mask_box, mask_outside=args.mask_outside,
        decoding_order=args.decoding, method=args.method,
        diffusion_steps=args.diffusion_steps, sampler=args.sampler,
        top=args.top, clip_model=args.clip_model, clip_checkpoint=args.clip_checkpoint,
        input_source=args.input_source, with_id=args.with_id, output_path=args.output_path,
        debug=args.debug)
    return GenerationConfig(**{**fields, **changes})


def parse_args(argv=None, groups=GROUPS, description=None, prog=None, outputs=()):
    """Parse and validate. `outputs` names file flags that are written, not read (no existence
    check), e.g. outputs=("text_tokenizer",) when training a tokenizer."""
    parser = build_parser(groups, description, prog)
    args = parser.parse_args(argv)
    try:
        validate(args, outputs)
    except ArgumentError as e:
        parser.error(str(e))
    return args


if __name__ == "__main__":
    build_parser(prog="arguments.py").print_help(sys.stdout)
