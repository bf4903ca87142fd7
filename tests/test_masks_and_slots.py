"""Masks that travel and embedding slots: block ids for each attention kind of the task registry,
a non-causal task's batches carry them from the loader to the model (and trimming stays exact),
the pipeline stages attend by them like the plain GPT, and a float slot is read in place of a
token's embedding."""
import dataclasses

import pytest
import torch

from megatron_t2i import mpu
from megatron_t2i import tasks as registry
from megatron_t2i.config import ModelConfig, model_config
from megatron_t2i.data.loader import SequenceBuilder, collate, trim_padding
from megatron_t2i.model import GPT, Slots, block_causal_mask, language_model_loss
from megatron_t2i.tokenizers.layout import TokenLayout, block_ids
from megatron_t2i.training.loop import attention_mask
from tests.distributed import run_distributed

torch.set_num_threads(1)
LAYOUT = TokenLayout(num_image_codes=32, num_text_tokens=40, image_grid=4, max_text_tokens=6)


def test_block_ids_of_each_kind_keep_padding_out_of_sight():
    assert block_ids("causal", 5).tolist() == [0, 1, 2, 3, 4]
    assert block_ids("prefix-visible", 6, prefix=3).tolist() == [0, 0, 0, 1, 2, 3]
    assert block_ids("bidirectional", 4).tolist() == [0, 0, 0, 0]
    padded = block_ids("bidirectional", 6, real=4)       # two trailing pads
    assert padded.tolist() == [0, 0, 0, 0, 1, 2]
    mask = block_causal_mask(padded)[0, 0]
    assert not mask[:4, 4:].any() and mask[4:, :4].all()   # real tokens never see the pads
    with pytest.raises(ValueError, match="block-causal.*come from the template"):
        block_ids("block-causal", 4)


@pytest.fixture
def prefix_task(monkeypatch):
    """A text->image task whose caption attends to itself both ways (registered for the test)."""
    task = dataclasses.replace(registry.get("text2image"), name="prefix-t2i",
                               attention="prefix-visible", aliases=())
    monkeypatch.setitem(registry.REGISTRY, task.name, task)
    monkeypatch.setitem(registry._BY_ALIAS, task.name, task)
    return task.name


def test_a_non_causal_task_carries_its_mask_to_the_model(prefix_task):
    build = SequenceBuilder(LAYOUT, {prefix_task: 1.0, "text2image": 1.0})
    seqs = [build([1 + i, 2, 3][:2 + i % 2], list(range(16)), sample_seed=i) for i in range(6)]
    batch = collate(seqs)
    assert "block_ids" in batch and batch["block_ids"].shape == batch["tokens"].shape
    prefix = [s for s in seqs if s.block_ids is not None]
    causal = [s for s in seqs if s.block_ids is None]
    assert prefix and causal  # both tasks drawn
    seq = prefix[0]
    caption = seq.image_start  # [ROI1] text [size] [BOI1]: one block
    assert (seq.block_ids[:caption] == 0).all() and (seq.block_ids[caption:].diff() == 1).all()
    # the model sees exactly block_causal_mask(block ids): logits equal a forward given the mask
    torch.manual_seed(0)
    model = GPT(model_config("tiny", LAYOUT, hidden_dropout=0.0, attention_dropout=0.0)).eval()
    with torch.no_grad():
        via_batch = model(batch["tokens"], batch["position_ids"], attention_mask(batch))
        by_hand = model(batch["tokens"], batch["position_ids"],
                        block_causal_mask(batch["block_ids"]))
        plain = model(batch["tokens"], batch["position_ids"])
    torch.testing.assert_close(via_batch, by_hand)
    rows = [i for i, s in enumerate(seqs) if s.block_ids is not None]
    assert not torch.allclose(via_batch[rows], plain[rows])  # the caption saw its own end
    others = [i for i, s in enumerate(seqs) if s.block_ids is None]
    torch.testing.assert_close(via_batch[others], plain[others], atol=1e-5, rtol=1e-5)
    # trimming the padding off stays exact: no real token attends to it
    trimmed = trim_padding(batch)
    assert trimmed["tokens"].shape[1] < batch["tokens"].shape[1]  # the mixture's padding went
    with torch.no_grad():
        short = model(trimmed["tokens"], trimmed["position_ids"], attention_mask(trimmed))
        full_loss = language_model_loss(via_batch, batch["labels"], batch["loss_mask"])[0]
        trim_loss = language_model_loss(short, trimmed["labels"], trimmed["loss_mask"])[0]
    torch.testing.assert_close(trim_loss, full_loss, atol=1e-6, rtol=1e-5)


def test_slots_replace_the_embedding_of_their_positions():
    torch.manual_seed(0)
    model = GPT(model_config("tiny", LAYOUT, hidden_dropout=0.0, attention_dropout=0.0)).eval()
    tokens = torch.randint(0, LAYOUT.special_offset, (2, 10))  # codes and text, not the placeholder
    positions = torch.arange(10).expand(2, -1)
    vector = torch.randn(model.config.hidden_size)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 3] = True
    slots = Slots(vector.expand(2, 10, -1), mask)
    # the reference: a token whose embedding row is the vector (the trunk's output is compared:
    # the tied head would also read that row)
    reference = GPT(model.config).eval()
    reference.load_state_dict(model.state_dict())
    placeholder = LAYOUT["[MASK]"]
    with torch.no_grad():
        reference.word_embeddings.weight[placeholder] = vector
        with_placeholder = tokens.clone()
        with_placeholder[:, 3] = placeholder
        want = reference.hidden(with_placeholder, positions)
        got = model.hidden(tokens, positions, slots=slots)
        plain = model.hidden(tokens, positions)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[:, :3], plain[:, :3])  # causal: what comes before is unchanged
    assert not torch.allclose(got[:, 3:], plain[:, 3:])


CFG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256,
                  max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)


def _pipeline_with_block_ids(rank, world_size):
    import deepspeed

    from megatron_t2i.model.pipeline import build_pipeline_model, load_gpt_state_dict

    torch.manual_seed(0)
    gpt = GPT(CFG)
    model = build_pipeline_model(CFG, pipeline_model_parallel_size=2)
    load_gpt_state_dict(model, gpt.state_dict(), CFG)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9})
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, CFG.vocab_size, (2, 17), generator=g)
    positions = torch.arange(16).expand(2, -1)
    ids = torch.stack([block_ids("prefix-visible", 16, prefix=5),
                       block_ids("bidirectional", 16, real=12)])
    loss_mask = torch.ones(2, 16)
    got = engine.eval_batch(iter([((data[:, :-1], positions, ids), (data[:, 1:], loss_mask))]),
                            num_micro_batches=1)
    with torch.no_grad():
        want = language_model_loss(gpt(data[:, :-1], positions, block_causal_mask(ids)),
                                   data[:, 1:], loss_mask)[0]
        causal = language_model_loss(gpt(data[:, :-1], positions), data[:, 1:], loss_mask)[0]
    mpu.destroy_model_parallel()
    return float(got), float(want), float(causal)


@pytest.mark.slow
def test_pipeline_stages_attend_by_the_block_ids_like_the_gpt():
    for got, want, causal in run_distributed(_pipeline_with_block_ids, 2):
        assert got == pytest.approx(want, rel=1e-5) and abs(want - causal) > 1e-4
