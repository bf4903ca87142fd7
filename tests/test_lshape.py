"""L-shape (Lformer) order, template and block-parallel decoding, against brute-force loops and
the teacher-forced template: h steps for an h x h grid, cached = uncached, completion keeps its
blocks, TP=2 = TP=1."""
import dataclasses

import pytest
import torch

from distributed import run_distributed
from megatron_t2i.config import model_config
from megatron_t2i.data.loader import SequenceBuilder, collate
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.generation.scoring import image_log_likelihood
from megatron_t2i.generation.state import Decoding, Prompt
from megatron_t2i.generation.strategies.lshape import block_inputs, generate_lshape
from megatron_t2i.generation.vocab import image_vocab_mask
from megatron_t2i.model.attention import block_causal_mask
from megatron_t2i.model.gpt import GPT
from megatron_t2i.tokenizers.layout import (LayoutMismatchError, TokenLayout, lshape_blocks,
                                            lshape_inputs, lshape_order, lshape_rank)

torch.set_num_threads(1)
RASTER = TokenLayout(num_image_codes=32, num_text_tokens=40, image_grid=6, max_text_tokens=6)
LAYOUT = dataclasses.replace(RASTER, image_order="lshape")
CONFIG = model_config("tiny", LAYOUT, hidden_dropout=0.0, attention_dropout=0.0)
IMAGE = image_vocab_mask(LAYOUT, CONFIG.vocab_size)
PAD = LAYOUT["[PAD]"]


def brute_force_order(side):
    """Raster indices in L order, from the definition: block t down its right column, then right
    to left along its bottom row."""
    cells = []
    for t in range(side):
        cells += [(r, t) for r in range(t + 1)] + [(t, c) for c in range(t - 1, -1, -1)]
    return [r * side + c for r, c in cells], [max(r, c) for r, c in cells]


def test_l_order_and_its_inverse_match_the_brute_force_loop_for_every_side():
    for side in range(1, 65):
        order, blocks = brute_force_order(side)
        assert lshape_order(side).tolist() == order, side
        assert lshape_blocks(side).tolist() == blocks, side
        rank = lshape_rank(side)
        assert rank[torch.tensor(order)].tolist() == list(range(side * side)), side
        raster = torch.randperm(side * side)
        layout = dataclasses.replace(LAYOUT, image_grid=side)
        assert torch.equal(layout.from_lshape(layout.to_lshape(raster)), raster)
        assert torch.equal(layout.to_lshape(raster), raster[torch.tensor(order)])


def test_slot_inputs_are_the_up_left_neighbours():
    for side in (1, 2, 5, 9):
        grid = torch.randint(0, 32, (side, side))
        order, _ = brute_force_order(side)
        codes = grid.flatten()[torch.tensor(order)]
        expected = []
        for index in order:
            r, c = divmod(index, side)
            expected.append(int(grid[r - 1, c - 1]) if r and c else PAD)
        assert lshape_inputs(codes, PAD).tolist() == expected, side
        for t in range(1, side):  # what decoding feeds block by block is the same
            assert block_inputs(codes[None, (t - 1) ** 2:t * t], PAD)[0].tolist() == \
                expected[t * t:(t + 1) * (t + 1)]


def test_the_lshape_template_predicts_every_cell_once_from_its_neighbour_at_its_position():
    codes = torch.randint(0, 32, (36,))
    raster, seq = RASTER.text_to_image([3, 4], codes), LAYOUT.text_to_image([3, 4], codes)
    s = seq.image_start
    assert seq.tokens.shape == raster.tokens.shape  # one padded length for both orders
    order = lshape_order(6)
    # position i - 1 predicts targets[i]: slot k (index s - 1 + k) predicts the k-th L cell
    assert torch.equal(seq.targets[s:s + 36], codes[order])
    assert torch.equal(seq.position_ids[s - 1:s + 35], raster.position_ids[s - 1] + order)
    assert torch.equal(seq.tokens[s - 1:s + 35][1:], lshape_inputs(codes[order], PAD)[1:])
    assert seq.tokens[s - 1] == LAYOUT["[BOI1]"]
    assert seq.loss_mask[1:s + 36].eq(1).all() and seq.loss_mask[s + 36:].eq(0).all()
    # block-causal: a slot sees the caption, every earlier block and its own whole block
    mask = block_causal_mask(seq.block_ids)[0, 0]
    blocks = lshape_blocks(6)
    for i in range(36):
        for j in range(36):
            assert mask[s - 1 + i, s - 1 + j] == (blocks[j] <= blocks[i])
        assert mask[s - 1 + i, :s - 1].all()
    assert not mask[:s + 35, s + 35:].any()  # nothing real sees the end token or padding


def test_a_data_set_of_the_other_order_is_refused_in_one_line():
    with pytest.raises(LayoutMismatchError, match="image_order: expected lshape, found raster"):
        LAYOUT.check_compatible(RASTER, "--data-path d")
    assert TokenLayout.from_dict(LAYOUT.to_dict()) == LAYOUT
    old = {k: v for k, v in RASTER.to_dict().items() if k != "image_order"}
    assert TokenLayout.from_dict(old).image_order == "raster"
    bad = {**LAYOUT.to_dict(), "image_order": "spiral"}
    with pytest.raises(LayoutMismatchError, match="^ckpt/token_layout.json: .*image_order"):
        TokenLayout.from_dict(bad, source="ckpt/token_layout.json")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def prompt_of(texts):
    seqs = [LAYOUT.text_to_image(t) for t in texts]
    return Prompt(torch.stack([s.tokens for s in seqs]), torch.stack([s.position_ids for s in seqs]))


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


TEXTS = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
SAMPLING = SamplingConfig(temperature=1.1, top_k=12, top_p=0.95)


def test_an_h_by_h_grid_takes_exactly_h_forward_steps(model):
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    try:
        generate_lshape(model, prompt_of(TEXTS), 6, PAD, Decoding(SAMPLING), IMAGE, gens([1, 2, 3]))
    finally:
        hook.remove()
    prompt = prompt_of(TEXTS).tokens.shape[1]
    assert calls == [prompt] + [2 * t + 1 for t in range(1, 6)]


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_block_cached_decoding_equals_uncached_recomputation(model, cfg_scale):
    uncond = prompt_of([[]] * 3)
    out = [generate_lshape(model, prompt_of(TEXTS), 6, PAD, Decoding(SAMPLING, cfg_scale, cache),
                           IMAGE, gens([1, 2, 3]), uncond) for cache in (True, False)]
    assert torch.equal(out[0], out[1])
    assert out[0].max() < 32


def test_greedy_decoding_returns_the_argmax_of_the_teacher_forced_template(model):
    """The strategy and the training template agree: fed the codes it drew, a plain forward over
    the L-shape training sequence predicts exactly those codes at every slot (top-k 1)."""
    codes = generate_lshape(model, prompt_of(TEXTS), 6, PAD, Decoding(SamplingConfig(top_k=1)),
                            IMAGE, gens([1, 2, 3]))
    seqs = [LAYOUT.text_to_image(t, c) for t, c in zip(TEXTS, codes)]
    batch = collate(seqs)
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"],
                       block_causal_mask(batch["block_ids"]))
    s = seqs[0].image_start
    predicted = logits[:, s - 1:s + 35, :32].argmax(-1)
    assert torch.equal(predicted, LAYOUT.to_lshape(codes))
    # and the scorer reads the same template: log p(image | text) of greedy codes is the sum of
    # the per-slot maxima of the renormalised logits
    expected = logits[:, s - 1:s + 35, :32].log_softmax(-1).max(-1).values.sum(-1)
    torch.testing.assert_close(image_log_likelihood(model, LAYOUT, codes, TEXTS), expected)


def test_per_sample_seeds_do_not_depend_on_the_batch(model):
    both = generate_lshape(model, prompt_of(TEXTS[:2]), 6, PAD, Decoding(SAMPLING), IMAGE,
                           gens([5, 6]))
    alone = generate_lshape(model, prompt_of(TEXTS[1:2]), 6, PAD, Decoding(SAMPLING), IMAGE,
                            gens([6]))
    assert torch.equal(both[1:], alone)


def test_completion_keeps_the_first_blocks_and_draws_the_rest(model):
    """Given the first k blocks of a greedy image, greedy completion returns that image, reading
    the prompt and the given blocks with the first block it draws; sampled, it keeps them."""
    full = generate_lshape(model, prompt_of(TEXTS), 6, PAD, Decoding(SamplingConfig(top_k=1)),
                           IMAGE, gens([1, 2, 3]))
    square = full.view(3, 6, 6)[:, :3, :3].reshape(3, 9)
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    try:
        done = generate_lshape(model, prompt_of(TEXTS), 6, PAD, Decoding(SamplingConfig(top_k=1)),
                               IMAGE, gens([1, 2, 3]), given=square)
    finally:
        hook.remove()
    assert torch.equal(done, full)  # greedy: the same image, however the blocks were read
    assert len(calls) == 3  # blocks 3, 4, 5 (the prompt and blocks 1-3 read with block 3)
    sampled = generate_lshape(model, prompt_of(TEXTS), 6, PAD, Decoding(SAMPLING), IMAGE,
                              gens([1, 2, 3]), given=square)
    assert torch.equal(sampled.view(3, 6, 6)[:, :3, :3].reshape(3, 9), square)
    with pytest.raises(ValueError, match="k x k square"):
        generate_lshape(model, prompt_of(TEXTS), 6, PAD, given=full[:, :8])


def test_training_sequences_of_an_lshape_data_set_carry_targets_and_blocks():
    builder = SequenceBuilder(LAYOUT, {"text2image": 3, "image2text": 1}, text_dropout=0.0)
    codes = torch.randint(0, 32, (36,))
    seqs = [builder([1, 2], codes, seed) for seed in range(8)]
    batch = collate(seqs)
    for seq, labels in zip(seqs, batch["labels"]):
        if seq.targets is not None:  # text->image in L order
            s = seq.image_start
            assert torch.equal(labels[s - 1:s + 35], codes[lshape_order(6)])
        else:                        # the caption direction reads the image in raster order
            assert torch.equal(labels[1:37], codes)
    assert "block_ids" in batch


def _tp_decode(rank, world):
    from megatron_t2i import mpu
    mpu.initialize_model_parallel(world, 1)
    config = model_config("tiny", LAYOUT, max_tensor_parallel=2, hidden_dropout=0.0,
                          attention_dropout=0.0)
    torch.manual_seed(0)  # the same full weights whatever the TP size
    model = GPT(config).eval()
    uncond = prompt_of([[]] * 3)
    codes = generate_lshape(model, prompt_of(TEXTS), 6, PAD,
                            Decoding(SAMPLING, 1.5, vocab_size=LAYOUT.vocab_size),
                            image_vocab_mask(LAYOUT, config.vocab_size), gens([1, 2, 3]), uncond)
    seqs = [LAYOUT.text_to_image(t, c) for t, c in zip(TEXTS, codes)]
    batch = collate(seqs)
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"],
                       block_causal_mask(batch["block_ids"]), gather_logits=True)
    return codes.numpy(), logits.numpy()


@pytest.mark.slow
def test_lshape_decoding_and_training_forward_at_tp2_equal_tp1():
    one = run_distributed(_tp_decode, 1)[0]
    two = run_distributed(_tp_decode, 2)
    assert (two[0][0] == one[0]).all() and (two[1][0] == one[0]).all()
    torch.testing.assert_close(torch.from_numpy(two[0][1]), torch.from_numpy(one[1]), rtol=1e-4,
                               atol=1e-4)
