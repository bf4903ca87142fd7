"""The CLIP trained here and language-free (CLIP-conditioned) generation: the text tower reads
SentencePiece ids pooled at their end, training learns and resumes bitwise, CLIP reranking puts
the matching image first, LAFITE's xi = 0 is the embedding itself, a conditioned GPT at TP=2
equals TP=1, KV-cached decoding with condition slots equals recomputation, and bad input is one
line."""
import dataclasses

import numpy as np
import pytest
import torch

from megatron_t2i import mpu
from megatron_t2i.config import ModelConfig
from megatron_t2i.data.loader import SequenceBuilder, collate, perturb
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.generation.state import Decoding, Prompt
from megatron_t2i.generation.strategies.raster import generate
from megatron_t2i.generation.vocab import image_vocab_mask
from megatron_t2i.model import GPT, language_model_loss
from megatron_t2i.tokenizers.clip import END, OFFSET, PAD, Clip, ClipConfig, ClipTextTokens
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.tokenizers.text import TextTokenizer, train_text_tokenizer
from megatron_t2i.tokenizers.train_clip import retrieval, train_clip
from tests.distributed import run_distributed

torch.set_num_threads(1)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220),
           "yellow": (230, 220, 30), "black": (10, 10, 10), "white": (245, 245, 245),
           "purple": (140, 40, 170), "orange": (240, 140, 20)}
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "black": "黑色",
      "white": "白色", "purple": "紫色", "orange": "橙色"}
LAYOUT = TokenLayout(num_image_codes=32, num_text_tokens=40, image_grid=4, max_text_tokens=6)


def toy_pairs(n: int, seed: int = 0):
    """Pictures half one colour and half another (left / right), captioned in English or
    Chinese: a CLIP must read both colours and their order."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    pixels, captions = [], []
    for i in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        img = np.zeros((12, 12, 3), np.uint8)
        img[:, :6], img[:, 6:] = COLOURS[names[a]], COLOURS[names[b]]
        pixels.append(torch.from_numpy(img).permute(2, 0, 1))
        captions.append(f"{names[a]} left {names[b]} right" if i % 3 else
                        f"左边{ZH[names[a]]}右边{ZH[names[b]]}")
    return torch.stack(pixels), captions


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    _, captions = toy_pairs(300)
    return TextTokenizer(train_text_tokenizer(captions * 2, str(tmp_path_factory.mktemp("t") / "t"),
                                              vocab_size=320))


TINY = dict(image_size=12, patch_size=6, vision_width=32, vision_layers=2, text_width=32,
            text_layers=2, heads=2, embed_dim=32)


def tiny_config(text):
    return ClipConfig(text_ids=text.vocab_size, max_text_tokens=8, **TINY)


@pytest.fixture(scope="module")
def trained(text, tmp_path_factory):
    pixels, captions = toy_pairs(300)
    ids = [text.encode(c, 8) for c in captions]
    out = str(tmp_path_factory.mktemp("clip") / "clip.pt")
    figures = train_clip(pixels, ids, out, tiny_config(text), text, steps=150, batch_size=64,
                         lr=3e-3, holdout=60, progress=False)
    return {"path": out, "figures": figures, "clip": Clip.load(out, text), "pixels": pixels,
            "captions": captions}


def test_text_tokens_are_ids_shifted_then_ended_and_padded(text):
    tokens = ClipTextTokens(text, tiny_config(text))
    ids = text.encode("左边红色右边蓝色", 8)
    row = tokens(["左边红色右边蓝色"])[0]
    assert row.tolist() == [i + OFFSET for i in ids] + [END] + [PAD] * (9 - len(ids) - 1)
    long = tokens(["red left blue right " * 10])[0]
    assert long[-1] == END and (long[:-1] >= OFFSET).all()  # cut to 8 ids, then the end


def test_the_text_feature_is_pooled_at_the_end_token(trained):
    clip = trained["clip"]
    ids = clip.tokens(["red left blue right"])
    after_end = ids.clone()
    after_end[0, (ids[0] == END).nonzero()[0, 0] + 1:] = 7  # junk after the end, not padding
    with torch.no_grad():
        a = clip.model.encode_text(ids, normalize=True)
        b = clip.model.encode_text(after_end, normalize=True)
        other = clip.model.encode_text(clip.tokens(["blue left red right"]), normalize=True)
    torch.testing.assert_close(a, b)  # causal, pooled at the end: what follows is not read
    assert not torch.allclose(a, other, atol=1e-3)


def test_training_learns_retrieval_of_held_out_pairs(trained):
    f = trained["figures"]
    assert f["pairs"] == 60 and f["train_pairs"] == 240
    assert f["text_to_image_r1_all"] > 0.3 and f["image_to_text_r1_all"] > 0.3  # chance 1/60
    assert f["cosine_gap"] > 0.1


def test_retrieval_of_known_embeddings():
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 1, 3, 2]]  # texts 2 and 3 point at each other's image
    r = retrieval(images, texts)
    assert r["text_to_image_r1"] == 0.5 and r["image_to_text_r1"] == 0.5
    assert r["text_to_image_r5"] == 1.0


def test_clip_reranking_puts_the_matching_image_first(trained):
    from megatron_t2i.generation.scoring import clip_scores

    clip, pixels, captions = trained["clip"], trained["pixels"], trained["captions"]

    class Decoder:  # stands for the image tokenizer: "codes" index the toy pictures
        def decode_to_tensor(self, codes):
            return pixels[codes[:, 0]].float() / 255

    ctx = type("Ctx", (), {"clip": clip, "is_writer": True, "image_tokenizer": Decoder(),
                           "device": torch.device("cpu")})()
    right = 0
    for query in range(240, 300):  # held-out-like pairs: the last ones of the toy set
        candidates = torch.tensor([[query]] + [[(query + 7 * j) % 300] for j in range(1, 8)])
        scores = clip_scores(ctx, captions[query], candidates)
        right += int(scores.argmax()) == 0
    assert right >= 45, f"{right}/60 matching images ranked first"


def test_resume_after_an_interruption_is_bitwise(text, tmp_path, monkeypatch):
    import open_clip

    pixels, captions = toy_pairs(120, seed=1)
    ids = [text.encode(c, 8) for c in captions]
    config = tiny_config(text)
    whole = str(tmp_path / "whole.pt")
    train_clip(pixels, ids, whole, config, text, steps=20, batch_size=16, save_interval=8,
               holdout=24, progress=False)
    calls = {"n": 0}
    forward = open_clip.ClipLoss.forward

    def crash_at_step_13(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    resumed = str(tmp_path / "resumed.pt")
    monkeypatch.setattr(open_clip.ClipLoss, "forward", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train_clip(pixels, ids, resumed, config, text, steps=20, batch_size=16, save_interval=8,
                   holdout=24, progress=False)
    assert (tmp_path / "resumed.pt.state").exists() and not (tmp_path / "resumed.pt").exists()
    monkeypatch.setattr(open_clip.ClipLoss, "forward", forward)
    train_clip(pixels, ids, resumed, config, text, steps=20, batch_size=16, save_interval=8,
               holdout=24, progress=False)
    a = torch.load(whole, weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.pt.state").exists()


def test_a_clip_of_another_vocabulary_is_refused(trained, tmp_path):
    other = TextTokenizer(train_text_tokenizer(["a b c d e f g"] * 20, str(tmp_path / "o"),
                                               vocab_size=280))
    with pytest.raises(ValueError, match="trained with another text tokenizer.*another vocabulary"):
        Clip.load(trained["path"], other)
    (tmp_path / "junk.pt").write_bytes(b"not a clip")
    with pytest.raises(ValueError, match="junk.pt: not a readable torch file"):
        Clip.load(str(tmp_path / "junk.pt"), other)


def test_lafite_noise_zero_is_the_embedding_and_more_noise_moves_away():
    rng = np.random.default_rng(0)
    f = rng.standard_normal(32)
    f /= np.linalg.norm(f)
    assert np.array_equal(perturb(f, 0.0, np.random.default_rng(1)), f)
    for xi, least in ((0.1, 0.9), (0.5, 0.3)):
        h = perturb(f, xi, np.random.default_rng(1))
        assert abs(np.linalg.norm(h) - 1) < 1e-9 and least < h @ f < 1


# ---- the CLIP-conditioned GPT --------------------------------------------------------------------
CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256,
                  num_tokens=LAYOUT.vocab_size, max_position_embeddings=64, hidden_dropout=0.0,
                  attention_dropout=0.0, condition_dim=16, condition_slots=3,
                  slot_token=LAYOUT["[MASK]"])


def conditioned_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    records = [(torch.randint(0, 32, (16,), generator=g), torch.randn(16, generator=g))
               for _ in range(4)]
    build = SequenceBuilder(LAYOUT, {"clip2image": 1.0}, text_dropout=0.5, condition_slots=3)
    seqs = [build([], codes, sample_seed=i, arrays={"clip_image": f.numpy()})
            for i, (codes, f) in enumerate(records)]
    return collate(seqs)


def test_records_become_slot_sequences_and_dropped_rows_read_the_null_embedding():
    batch = conditioned_batch()
    assert batch["condition"].shape == (4, 16) and batch["condition_mask"].dtype == torch.bool
    assert not batch["condition_mask"].all() and batch["condition_mask"].any()  # 0.5 dropout
    assert ((batch["tokens"] == LAYOUT["[MASK]"]).sum(1) == 3).all()
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    with torch.no_grad():
        got = model(batch["tokens"], batch["position_ids"], condition=batch["condition"],
                    condition_mask=batch["condition_mask"])
        null = model(batch["tokens"], batch["position_ids"], condition=torch.randn(4, 16),
                     condition_mask=torch.zeros(4, dtype=torch.bool))
    dropped = ~batch["condition_mask"]
    torch.testing.assert_close(got[dropped], null[dropped])  # the condition itself is not read
    with pytest.raises(ValueError, match="needs the array 'clip_image' in every record"):
        SequenceBuilder(LAYOUT, {"clip2image": 1.0}, condition_slots=3)([], list(range(16)), 0)


def _conditioned_tp2(rank, world_size):
    mpu.initialize_model_parallel(world_size, 1)
    return as_numpy(conditioned_step())


def conditioned_step():
    torch.manual_seed(0)
    model = GPT(CFG).train()
    batch = conditioned_batch()
    logits = model(batch["tokens"], batch["position_ids"], condition=batch["condition"],
                   condition_mask=batch["condition_mask"])
    loss, _ = language_model_loss(logits, batch["labels"], batch["loss_mask"])
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                            if n.startswith("conditioning")}


def as_numpy(step):
    logits, loss, grads = step
    return logits.numpy(), loss.item(), {n: g.numpy() for n, g in grads.items()}


@pytest.mark.slow
def test_conditioned_gpt_at_tp2_equals_tp1():
    logits, loss, grads = conditioned_step()
    assert set(grads) == {"conditioning.proj.weight", "conditioning.proj.bias", "conditioning.null"}
    ranks = run_distributed(_conditioned_tp2, 2)
    for _, rank_loss, rank_grads in ranks:
        assert abs(rank_loss - loss.item()) < 1e-5
        for name, grad in grads.items():  # replicated: every rank holds the whole gradient
            torch.testing.assert_close(torch.from_numpy(rank_grads[name]), grad, atol=1e-6,
                                       rtol=1e-5)
    halves = [torch.from_numpy(r[0]) for r in ranks]  # each rank: its half of the vocabulary
    torch.testing.assert_close(torch.cat(halves, -1), logits, atol=1e-5, rtol=1e-5)


def _reference_training(steps: int, lr: float):
    """GPT(seed=1234) trained by torch's AdamW on conditioned_batch: (losses, final state)."""
    model = GPT(CFG, seed=1234)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    batch, losses = conditioned_batch(), []
    for _ in range(steps):
        logits = model(batch["tokens"], batch["position_ids"], condition=batch["condition"],
                       condition_mask=batch["condition_mask"])
        loss = language_model_loss(logits, batch["labels"], batch["loss_mask"])[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


STEPS_PP = 2


def _conditioned_pipeline(rank, world_size):
    import deepspeed

    from megatron_t2i.model.pipeline import build_pipeline_model, gpt_state_dict
    from megatron_t2i.training.loop import pipeline_inputs

    model = build_pipeline_model(CFG, pipeline_model_parallel_size=2, base_seed=1234)
    initial = gpt_state_dict(model, CFG)  # this stage's own initialisation
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01,
                                                 "torch_adam": True}},
        "gradient_clipping": 0.5, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9})
    batch = conditioned_batch()
    data = (pipeline_inputs(batch, CFG), (batch["labels"], batch["loss_mask"]))
    losses = [engine.train_batch(iter([data])).item() for _ in range(STEPS_PP)]
    final = gpt_state_dict(model, CFG)
    mpu.destroy_model_parallel()
    return [{k: v.numpy() for k, v in d.items()} for d in (initial, final)], losses


@pytest.mark.slow
def test_conditioned_gpt_in_two_pipeline_stages_trains_like_the_gpt():
    """PP=2 of a conditioned model (the ConditionPipe on the first stage): built with the GPT's
    weights from the same seed, and two AdamW steps give the GPT's losses and weights."""
    initial = GPT(CFG, seed=1234).state_dict()
    losses, final = _reference_training(2, 1e-3)
    stages = run_distributed(_conditioned_pipeline, 2)
    assert "conditioning.proj.weight" in stages[0][0][0] and \
        "conditioning.proj.weight" not in stages[1][0][0]
    for (start, end), got in stages:
        for key, value in start.items():
            np.testing.assert_array_equal(value, initial[key].numpy(), err_msg=key)
            np.testing.assert_allclose(end[key], final[key].numpy(), atol=2e-6, err_msg=key)
    np.testing.assert_allclose(stages[1][1], losses, rtol=1e-5)  # the last stage's losses
    assert losses[1] < losses[0]


def test_cached_decoding_with_condition_slots_equals_recomputation():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    seq = LAYOUT.condition_to_image(3)
    seq.condition = torch.randn(16)
    prompt = Prompt.of(seq, 2, "cpu")
    uncond = Prompt.of(dataclasses.replace(seq, condition_present=False), 2, "cpu")
    mask = image_vocab_mask(LAYOUT, CFG.vocab_size)
    runs = {}
    for cache in (True, False):
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        runs[cache] = generate(model, prompt, 16, Decoding(SamplingConfig(top_k=10), 1.5, cache,
                                                           LAYOUT.vocab_size), mask, gens, uncond,
                               return_logits=True)
    assert torch.equal(runs[True][0], runs[False][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=1e-5, rtol=1e-5)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    other = generate(model, Prompt.of(dataclasses.replace(seq, condition=torch.randn(16)), 2,
                                      "cpu"), 16, Decoding(SamplingConfig(top_k=10), 1.5, True,
                                                           LAYOUT.vocab_size), mask, gens, uncond)
    assert not torch.equal(other, runs[True][0])  # the condition is read


def test_a_condition_the_model_does_not_take_says_so():
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, condition_dim=0, condition_slots=0, slot_token=-1))
    seq = LAYOUT.condition_to_image(3)
    with pytest.raises(ValueError, match="model without condition slots"):
        model(seq.tokens[None], seq.position_ids[None], condition=torch.randn(1, 16))
    with pytest.raises(ValueError, match=r"shape \(1, 8\), this model's takes \[batch, 16\]"):
        GPT(CFG)(seq.tokens[None], seq.position_ids[None], condition=torch.randn(1, 8))


def _clip_dp2(rank, world_size, text_path, out_dir):
    text = TextTokenizer(text_path)
    pixels, captions = toy_pairs(120, seed=2)
    ids = [text.encode(c, 8) for c in captions]
    out = f"{out_dir}/dp{world_size}.pt"
    train_clip(pixels, ids, out, tiny_config(text), text, steps=6, batch_size=32, holdout=24,
               progress=False)
    return {k: v.numpy() for k, v in torch.load(out, weights_only=True)["state_dict"].items()}


@pytest.mark.slow
def test_data_parallel_clip_training_equals_one_process_with_the_whole_batch(text, tmp_path):
    """ClipLoss over features gathered from both ranks, gradients averaged by DDP: two ranks of
    16 pairs train like one process of 32 (up to float rounding)."""
    one = _clip_dp2(0, 1, text.model_path, str(tmp_path))
    two = run_distributed(_clip_dp2, 2, text.model_path, str(tmp_path))[0]
    for key, value in one.items():
        if key.endswith("in_proj_bias"):
            # Softmax is blind to a key bias: its true gradient is zero, what reaches AdamW is
            # rounding noise, normalised to full-size steps. Compare the query and value parts.
            width = value.shape[0] // 3
            value, two[key] = (np.concatenate([v[:width], v[2 * width:]]) for v in (value, two[key]))
        np.testing.assert_allclose(two[key], value, atol=2e-5, rtol=1e-4, err_msg=key)


def test_a_conditioned_checkpoint_reshards_and_loads_back(tmp_path):
    from megatron_t2i.generation.loading import load_model
    from megatron_t2i.training.convert import load_full_state_dict, save_model_checkpoint

    torch.manual_seed(0)
    config = dataclasses.replace(CFG, vocab_size=128)
    state = GPT(config).state_dict()
    tp2 = save_model_checkpoint(str(tmp_path / "tp2"), state, config, LAYOUT, tp=2)
    full, saved_config, _, _ = load_full_state_dict(tp2)
    assert saved_config.condition_slots == 3 and "conditioning.null" in full
    for key, value in state.items():
        assert torch.equal(full[key][:value.shape[0]], value), key
    save_model_checkpoint(str(tmp_path / "tp1"), full, saved_config, LAYOUT, tp=1)
    model = load_model(str(tmp_path / "tp1"))[0]
    assert torch.equal(model.conditioning.null, state["conditioning.null"])
