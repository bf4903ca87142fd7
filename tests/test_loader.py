import numpy as np
import pytest
import torch

from megatron_t2i.data.loader import (ResumableSampler, SequenceBuilder, collate, split_indices,
                                      trim_padding)
from megatron_t2i.tokenizers.layout import TokenLayout


def test_split_is_disjoint_complete_and_stable():
    train, held = split_indices(1000, 0.05, seed=3)
    assert len(held) == 50 and len(train) == 950
    assert not set(train) & set(held) and set(train) | set(held) == set(range(1000))
    again, held2 = split_indices(1000, 0.05, seed=3)
    assert np.array_equal(train, again) and np.array_equal(held, held2)
    assert split_indices(10, 0.01, seed=0)[1].size == 1  # a held-out split is never empty


def test_data_parallel_ranks_see_the_single_rank_stream():
    idx = np.arange(37)
    one = ResumableSampler(idx, micro_batch_size=4, seed=1)
    two = [ResumableSampler(idx, 2, dp_rank=r, dp_size=2, seed=1) for r in range(2)]
    for _ in range(25):  # crosses several epochs
        assert one.next_micro_batch() == two[0].next_micro_batch() + two[1].next_micro_batch()


def test_resume_continues_exactly_and_epochs_cover_everything():
    idx = np.arange(10, 30)
    ref = ResumableSampler(idx, 3, seed=7)
    full = [ref.next_micro_batch() for _ in range(20)]
    first = ResumableSampler(idx, 3, seed=7)
    part = [first.next_micro_batch() for _ in range(8)]
    resumed = ResumableSampler(idx, 3, seed=7)
    resumed.load_state_dict(first.state_dict())
    part += [resumed.next_micro_batch() for _ in range(12)]
    assert part == full
    flat = [i for b in full for i, _ in b]
    assert sorted(flat[:20]) == list(range(10, 30))  # the first epoch is a permutation
    with pytest.raises(ValueError, match="--seed 8"):
        ResumableSampler(idx, 3, seed=8).load_state_dict(first.state_dict())


def test_sequence_builder_mixes_tasks_and_drops_text():
    lay = TokenLayout(num_image_codes=64, num_text_tokens=50, max_text_tokens=8)
    codes = torch.randint(0, 64, (lay.image_tokens,))
    build = SequenceBuilder(lay, {"text2image": 1.0, "image2text": 1.0}, text_dropout=0.5)
    seqs = [build([1, 2, 3], codes, seed) for seed in range(400)]
    first = [s.tokens[0].item() for s in seqs]
    share_i2t = np.mean([f == lay.size_token for f in first])
    assert 0.4 < share_i2t < 0.6
    t2i = [s for s, f in zip(seqs, first) if f == lay["[ROI1]"]]
    dropped = np.mean([lay.decode_text_ids(s.tokens) == [] for s in t2i])
    assert 0.4 < dropped < 0.6
    assert {s.tokens.numel() for s in seqs} == {build.length}
    assert [build([1, 2, 3], codes, 5).tokens.tolist()] == [seqs[5].tokens.tolist()]  # seeded
    batch = collate(seqs[:3])
    assert batch["tokens"].shape == (3, build.length - 1)
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])


def test_trimmed_batches_give_the_same_loss_and_gradients():
    """trim_padding drops the columns after the longest sequence; for a causal model the loss and
    its gradients are those of the padded batch."""
    from megatron_t2i.config import ModelConfig
    from megatron_t2i.model import GPT, language_model_loss
    lay = TokenLayout(num_image_codes=64, num_text_tokens=50, max_text_tokens=12, image_grid=3)
    build = SequenceBuilder(lay, {"text2image": 1.0, "image2text": 1.0}, text_dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    seqs = [build(torch.randint(0, 50, (n,), generator=gen).tolist(),
                  torch.randint(0, 64, (lay.image_tokens,), generator=gen), seed)
            for seed, n in enumerate((3, 7, 5, 2))]
    full = collate(seqs)
    trimmed = trim_padding(full)
    real = max(int((s.tokens != lay["[PAD]"]).sum()) for s in seqs)  # the longest sequence
    kept = trimmed["tokens"].shape[1]  # (+1 where a caption's end, a [PAD], is a target)
    assert real - 1 <= kept < full["tokens"].shape[1] and trimmed["tokens"].shape[0] == 4
    assert (full["tokens"][:, kept:] == lay["[PAD]"]).all() and (full["loss_mask"][:, kept:] == 0).all()
    assert (trimmed["loss_mask"][:, -1] != 0).any()  # nothing more could go
    for k in full:
        assert torch.equal(trimmed[k], full[k][:, :kept])

    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                         vocab_size=lay.padded_vocab_size(), num_tokens=lay.vocab_size,
                         max_position_embeddings=lay.max_positions("image_to_text"), hidden_dropout=0.0,
                         attention_dropout=0.0)
    model = GPT(config, seed=1)
    losses, grads = [], []
    for batch in (full, trimmed):
        model.zero_grad()
        logits = model(batch["tokens"], batch["position_ids"])
        loss = language_model_loss(logits, batch["labels"], batch["loss_mask"])[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    no_target = trim_padding({**full, "loss_mask": torch.zeros_like(full["loss_mask"])})
    assert no_target["tokens"].shape == (4, 1)  # never an empty batch


def test_bad_task_weights():
    with pytest.raises(ValueError, match="unknown task 'x2y'; known: text2image, image2text"):
        SequenceBuilder(TokenLayout(), {"x2y": 1.0})
    with pytest.raises(ValueError, match=r"tasks \['completion'\] are not trained on their own"):
        SequenceBuilder(TokenLayout(), {"completion": 1.0})
    with pytest.raises(ValueError, match="not all zero"):
        SequenceBuilder(TokenLayout(), {"text2image": 0.0})
