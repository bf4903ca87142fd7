"""Loading checkpoints for generation: weights, dtypes, tokenizers, one-line errors, layer
offloading, and TP=2 generation equal to TP=1 (spawned gloo processes)."""
import os

import pytest
import torch

from distributed import run_distributed
from generation_toy import make_checkpoint, tiny_config
from megatron_t2i import mpu
from megatron_t2i.generation.scoring import score
from megatron_t2i.generation.state import Decoding, Prompt
from megatron_t2i.generation.strategies.raster import generate
from megatron_t2i.generation.vocab import image_vocab_mask, text_vocab_mask
from megatron_t2i.generation.loading import load_model, load_tokenizers, offload_layers
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.model.gpt import GPT
from megatron_t2i.training.checkpoint import CheckpointError
from megatron_t2i.training.manifest import write_manifest

torch.set_num_threads(1)
SAMPLING = SamplingConfig(temperature=1.0, top_k=10, top_p=0.9)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_tokenizers):
    root = tmp_path_factory.mktemp("toy")
    tokenizers = toy_tokenizers
    torch.manual_seed(0)
    state = GPT(tiny_config(tokenizers[2])).state_dict()
    return {"root": root, "tokenizers": tokenizers, "state": state,
            "tp1": make_checkpoint(str(root / "tp1"), tokenizers, state=state),
            "tp2": make_checkpoint(str(root / "tp2"), tokenizers, tp=2, state=state)}


def test_loads_weights_config_layout_and_tokenizers(toy):
    model, config, layout, paths = load_model(toy["tp1"])
    assert not model.training and config.hidden_dropout == 0.0 and layout.name == "toy"
    for key, value in model.state_dict().items():
        assert torch.equal(value, toy["state"][key]), key
    assert sorted(paths) == ["image", "text"]
    text, image = load_tokenizers(layout, None, None, stored=paths)
    assert text.vocab_size == layout.num_text_tokens and image.grid == layout.image_grid
    # one iteration folder works as well as the save folder
    again, *_ = load_model(os.path.join(toy["tp1"], "iter_0000000"))
    assert torch.equal(again.word_embeddings.weight, model.word_embeddings.weight)


def test_half_weights_become_fp32_on_cpu_unless_asked(toy, tmp_path):
    folder = make_checkpoint(str(tmp_path / "fp16"), toy["tokenizers"], state=toy["state"],
                             dtype=torch.float16)
    model, *_ = load_model(folder)
    weight = model.word_embeddings.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, toy["state"]["word_embeddings.weight"].half().float())
    model, *_ = load_model(folder, dtype=torch.bfloat16)
    assert model.word_embeddings.weight.dtype == torch.bfloat16


def test_wrong_tensor_parallel_size_names_the_fix(toy):
    with pytest.raises(CheckpointError, match=r"saved at tensor-parallel size 2, this run has 1 .*"
                                              r"convert_checkpoint.py reshard .* --tp 1"):
        load_model(toy["tp2"])


def test_damaged_checkpoints_are_one_line_errors(toy, tmp_path):
    folder = make_checkpoint(str(tmp_path / "bad"), toy["tokenizers"], state=toy["state"])
    path = os.path.join(folder, "iter_0000000", "mp_rank_00_model_states.pt")
    blob = torch.load(path, weights_only=True)
    del blob["module"]["transformer.final_layernorm.bias"]
    torch.save(blob, path)
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt: .* bytes, .* when saved"):
        load_model(folder)  # the manifest sees the file changed before anything is read
    write_manifest(os.path.dirname(path))  # as if saved that way: the shard itself is checked
    with pytest.raises(ValueError, match="missing key transformer.final_layernorm.bias"):
        load_model(folder)
    with open(path, "wb") as f:
        f.write(b"not a torch file")
    write_manifest(os.path.dirname(path))
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="no 'latest' file|not a megatron_t2i checkpoint"):
        load_model(str(tmp_path))


def test_tokenizer_mismatch_is_refused(toy):
    _, _, layout, paths = load_model(toy["tp1"])
    from dataclasses import replace
    with pytest.raises(ValueError, match="text ids, the checkpoint's token layout has 999"):
        load_tokenizers(replace(layout, num_text_tokens=999), None, None, stored=paths)
    with pytest.raises(FileNotFoundError, match="pass --text-tokenizer"):
        load_tokenizers(layout, None, None, stored={})


@torch.no_grad()
def test_offloaded_layers_compute_the_same(toy):
    model, _, layout, _ = load_model(toy["tp1"])
    seq = layout.text_to_image([1, 2, 3])
    expected = model(seq.tokens[None], seq.position_ids[None])
    moves = []
    offload_layers(model, torch.device("cpu"))  # the mechanism; on a GPU the copies cross devices
    model.transformer.layers[0].register_forward_pre_hook(lambda *a: moves.append(1))
    torch.testing.assert_close(model(seq.tokens[None], seq.position_ids[None]), expected)
    assert moves == [1]


def prompt_batch(layout, seeds):
    seq = layout.text_to_image([5, 6, 7])
    b = len(seeds)
    return seq.tokens.expand(b, -1), seq.position_ids.expand(b, -1)


def run_generation(folder, seeds):
    """Tokens with and without CFG, and caption scores, from the checkpoint in `folder`."""
    model, config, layout, _ = load_model(folder)
    tokens, pos = prompt_batch(layout, seeds)
    uncond = layout.text_to_image([])
    b = len(seeds)
    out = {}
    with torch.no_grad():
        mask = image_vocab_mask(layout, config.vocab_size)
        # vocab_size: the TP=2 checkpoint pads the vocabulary to more rows than the TP=1 one
        out["plain"] = generate(model, Prompt(tokens, pos), 20,
                                Decoding(SAMPLING, vocab_size=layout.vocab_size), mask,
                                [torch.Generator().manual_seed(s) for s in seeds]).numpy()
        out["cfg"] = generate(model, Prompt(tokens, pos), 20,
                              Decoding(SAMPLING, 2.0, vocab_size=layout.vocab_size), mask,
                              [torch.Generator().manual_seed(s) for s in seeds],
                              Prompt.of(uncond, b, "cpu")).numpy()
        seq = layout.image_to_text(torch.arange(layout.image_tokens) % 32, [3, 1, 4], pad=False)
        out["score"] = score(model, seq.tokens[None], seq.position_ids[None],
                             layout.is_text(seq.tokens)[None],
                             text_vocab_mask(layout, config.vocab_size)).numpy()
    return out


def _tensor_parallel_generation(rank, world_size, folder, seeds):
    mpu.initialize_model_parallel(world_size, 1)
    return run_generation(folder, seeds)


@pytest.mark.slow
def test_tensor_parallel_generation_equals_single_process(toy):
    seeds = [101, 202, 303]
    reference = run_generation(toy["tp1"], seeds)
    for result in run_distributed(_tensor_parallel_generation, 2, toy["tp2"], seeds):
        assert (result["plain"] == reference["plain"]).all()
        assert (result["cfg"] == reference["cfg"]).all()
        assert abs(result["score"] - reference["score"]).max() < 1e-4
