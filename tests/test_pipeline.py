"""The GPT as DeepSpeed pipeline stages is the same model: PP=2 trains exactly like PP=1 (with
dropout), like the plain GPT with a torch optimiser, and TP=2 x PP=2 like TP=1 x PP=1; checkpoint
layer files read back under GPT keys."""
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megatron_t2i import mpu
from megatron_t2i.config import ModelConfig
from megatron_t2i.model import GPT, language_model_loss
from megatron_t2i.model.pipeline import (build_pipeline_model, check_ds_config,
                                         check_pipeline_model, gpt_key,
                                         gpt_state_dict, gpt_state_dict_from_layer_files,
                                         layer_prefixes, load_gpt_state_dict, pipeline_key)
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow  # multi-process / end-to-end runs: see conftest.py

torch.set_num_threads(2)
CFG = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=256,
                  max_position_embeddings=16, hidden_dropout=0.1, attention_dropout=0.1)
NO_DROPOUT = replace(CFG, hidden_dropout=0.0, attention_dropout=0.0)
# attention-probability dropout draws from the per-TP-rank stream and cannot match TP=1; hidden and
# embedding dropout (default stream) must. With checkpointing: the recompute must replay the masks.
TP_CFG = replace(CFG, attention_dropout=0.0, checkpoint_activations=True)
STEPS, MICRO, GAS, SEQ = 4, 2, 2, 16
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.01, 0.5


def micro_batches():
    """STEPS x GAS micro-batches (labels, loss weights incl. a text-loss-like scale), the same
    on every rank."""
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS * GAS):
        data = torch.randint(0, CFG.vocab_size, (MICRO, SEQ + 1), generator=g)
        loss_mask = torch.ones(MICRO, SEQ)
        loss_mask[:, :3] = 0
        loss_mask[:, 3:6] = 5.0
        # the engine's data: (first stage's inputs, what the last stage's loss_fn reads)
        yield (data[:, :-1], torch.arange(SEQ).expand(MICRO, SEQ)), (data[:, 1:], loss_mask)


def ds_config(zero_stage):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY,
                                                      "torch_adam": True}},
            "gradient_clipping": CLIP, "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}


def full_weights(module, cfg):
    """This stage's parameters under GPT keys, TP shards gathered into full tensors (numpy)."""
    out, tp = {}, mpu.get_tensor_model_parallel_world_size()
    for name, param in module.named_parameters():
        p = param.detach().contiguous()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(p) for _ in range(tp)]
            dist.all_gather(shards, p, group=mpu.get_tensor_model_parallel_group())
            p = mpu.gather_tensor_along_dim(shards, param.partition_dim, param.partition_stride)
        out[gpt_key(name, cfg)] = p.numpy().copy()
    return out


def seeded_gpt(cfg):
    torch.manual_seed(0)
    return GPT(cfg)


def train_pipeline(cfg, tp, pp, zero_stage=1, save_dir=None, from_gpt=False):
    """-> (losses per step, initial weights, final weights) of this rank's stage. from_gpt: start
    from seeded_gpt's weights (loaded by key mapping) instead of the pipeline's own init."""
    import deepspeed

    model = build_pipeline_model(cfg, tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp)
    if from_gpt:
        load_gpt_state_dict(model, seeded_gpt(cfg).state_dict(), cfg)
    initial = full_weights(model, cfg)
    check_ds_config(ds_config(zero_stage), pp)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(zero_stage))
    batches = micro_batches()
    losses = [engine.train_batch(batches).item() for _ in range(STEPS)]
    if save_dir:
        engine.save_checkpoint(save_dir, tag="step4")
    return losses, initial, full_weights(model, cfg)


def _single(rank, world_size):
    return [train_pipeline(cfg, 1, 1, zero_stage=0) for cfg in (CFG, TP_CFG, NO_DROPOUT)]


def _two_stages(rank, world_size, save_dir):
    with_dropout = train_pipeline(CFG, 1, 2, save_dir=save_dir)
    model = build_pipeline_model(CFG, pipeline_model_parallel_size=2)
    wrong = {k: v[:, :8] if k == "word_embeddings.weight" else v
             for k, v in seeded_gpt(CFG).state_dict().items()}
    with pytest.raises(ValueError, match=r"word_embeddings.weight has shape \[256, 8\]"):
        load_gpt_state_dict(model, wrong, CFG)
    with pytest.raises(ValueError, match="lacks"):
        load_gpt_state_dict(model, {}, CFG)
    # stages cut between transformer layers: embeddings first, final LayerNorm and head last
    reference = seeded_gpt(CFG).state_dict()
    load_gpt_state_dict(model, reference, CFG)
    mine = gpt_state_dict(model, CFG)
    layers = {k.split(".")[2] for k in mine if k.startswith("transformer.layers.")}
    assert layers == ({"0", "1"} if rank == 0 else {"2", "3"})
    assert ("transformer.position_embeddings.weight" in mine) == (rank == 0)
    assert ("transformer.final_layernorm.weight" in mine) == (rank == 1)
    assert "word_embeddings.weight" in mine  # tied: on both stages
    for key, value in mine.items():
        assert torch.equal(value, reference[key]), key
    return with_dropout, train_pipeline(NO_DROPOUT, 1, 2, from_gpt=True)


def _tp2_pp2(rank, world_size):
    result = train_pipeline(TP_CFG, 2, 2)
    # mpu's groups are the topology's: ranks [0,1] [2,3] share a stage, [0,2] [1,3] a pipeline
    assert mpu.get_tensor_model_parallel_rank() == rank % 2
    assert mpu.get_pipeline_model_parallel_rank() == rank // 2
    return result


def merged(results):
    """Stage results of all ranks -> one GPT state dict per kind (initial, final)."""
    return [{k: torch.from_numpy(v) for r in results for k, v in r[kind].items()}
            for kind in (1, 2)]


def assert_weights_close(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def plain_gpt_losses():
    """The non-pipeline GPT trained with torch's AdamW on the same micro-batches."""
    model = seeded_gpt(NO_DROPOUT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    batches, losses = micro_batches(), []
    for _ in range(STEPS):
        total = 0.0
        for _ in range(GAS):
            (tokens, position_ids), (labels, loss_mask) = next(batches)
            loss, _ = language_model_loss(model(tokens, position_ids), labels, loss_mask)
            (loss / GAS).backward()
            total += loss.item() / GAS
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def test_key_mapping_round_trip():
    keys = GPT(CFG).state_dict().keys()
    pipe_keys = {pipeline_key(k, CFG) for k in keys}
    assert {gpt_key(k, CFG) for k in pipe_keys} == set(keys)
    assert pipeline_key("word_embeddings.weight", CFG) == "tied_modules.word_embeddings.weight"
    assert pipeline_key("transformer.layers.3.mlp.dense_4h_to_h.bias", CFG) == \
        "5.mlp.dense_4h_to_h.bias"
    assert pipeline_key("transformer.final_layernorm.weight", CFG) == "6.weight"
    assert layer_prefixes(CFG)[1] + "position_embeddings.weight" in keys
    for bad in ("7.weight", "0.weight", "tied_modules.other.weight"):
        with pytest.raises(ValueError, match="no GPT key"):
            gpt_key(bad, CFG)
    with pytest.raises(ValueError, match="no pipeline layer"):
        pipeline_key("transformer.layers.4.mlp.dense_h_to_4h.bias", CFG)
    # a conditioned model: its ConditionPipe is layer 1, everything after it one index later
    conditioned = replace(CFG, condition_dim=8, condition_slots=2, slot_token=3)
    keys = GPT(conditioned).state_dict().keys()
    assert {gpt_key(pipeline_key(k, conditioned), conditioned) for k in keys} == set(keys)
    assert pipeline_key("conditioning.proj.weight", conditioned) == "1.proj.weight"
    assert pipeline_key("transformer.position_embeddings.weight", conditioned) == \
        "2.position_embeddings.weight"
    assert pipeline_key("transformer.layers.0.mlp.dense_4h_to_h.bias", conditioned) == \
        "3.mlp.dense_4h_to_h.bias"
    assert pipeline_key("transformer.final_layernorm.weight", conditioned) == "7.weight"
    # a language-free denoiser: LatentPipe after ConditionPipe, and a head with weights at the end
    denoiser = replace(conditioned, head="denoise", latent_channels=6, latent_scale=1.0,
                       latent_token=4, noise_token=5)
    keys = GPT(denoiser).state_dict().keys()
    assert {gpt_key(pipeline_key(k, denoiser), denoiser) for k in keys} == set(keys)
    assert pipeline_key("latent_inputs.patch_in.weight", denoiser) == "2.patch_in.weight"
    assert pipeline_key("transformer.layers.0.mlp.dense_4h_to_h.bias", denoiser) == \
        "4.mlp.dense_4h_to_h.bias"
    assert pipeline_key("head.proj.weight", denoiser) == "9.proj.weight"
    assert layer_prefixes(denoiser)[-1] == "head." and layer_prefixes(CFG)[-1] is None
    with pytest.raises(ValueError, match="--mlp-conv: a denoiser's grid convolution trains "
                                         "without pipeline parallelism"):
        check_pipeline_model(replace(denoiser, mlp_conv=True))


def test_ds_config_check():
    fp32_zero0 = {"zero_optimization": {"stage": 0}}
    with pytest.raises(ValueError, match="ZeRO stage 0 clips gradients by a wrong norm"):
        check_ds_config(fp32_zero0, 2)
    check_ds_config(fp32_zero0, 1)
    check_ds_config({**fp32_zero0, "gradient_clipping": 0.0}, 2)
    check_ds_config({**fp32_zero0, "bf16": {"enabled": True}}, 2)
    check_ds_config({"zero_optimization": {"stage": 1}}, 2)
    with pytest.raises(ValueError, match="activation_checkpoint_interval"):
        check_ds_config({"pipeline": {"activation_checkpoint_interval": 1}}, 1)


@pytest.fixture(scope="module")
def single_stage():
    """PP=1 TP=1 runs from the pipeline's own initial weights: with dropout (CFG), with hidden
    dropout and checkpointing (TP_CFG), without dropout."""
    runs = run_distributed(_single, 1)[0]
    no_dropout_losses = runs[2][0]
    for losses, _, _ in runs[:2]:  # dropout is really on, or the comparisons below prove less
        assert max(abs(a - b) for a, b in zip(losses, no_dropout_losses)) > 1e-3
    return runs


def max_difference(losses, reference):
    return max(abs(a - b) for a, b in zip(losses, reference))


def test_two_stages_equal_one_stage_and_plain_gpt(single_stage, tmp_path):
    one = single_stage[0]
    two = run_distributed(_two_stages, 2, str(tmp_path))
    two_dropout, two_plain = [r[0] for r in two], [r[1] for r in two]

    # seed_layers: PP=2 starts from PP=1's weights, and with dropout ends at the same ones
    initial1, final1 = merged([one])
    initial2, final2 = merged(two_dropout)
    # GPT(seed=) builds each component from the seed of its pipeline layer index: the same weights
    assert_weights_close(initial1, GPT(CFG, seed=1234).state_dict(), atol=0)
    assert_weights_close(initial2, initial1, atol=0)
    for rank_losses in (r[0] for r in two_dropout):
        assert max_difference(rank_losses, one[0]) < 1e-4, (rank_losses, one[0])
    assert_weights_close(final2, final1, atol=1e-5)

    # the pipeline is the plain GPT: from its weights (loaded by key mapping), the same losses and
    # weights as with a plain torch optimiser
    initial_plain, final_plain = merged(two_plain)
    assert_weights_close(initial_plain, seeded_gpt(NO_DROPOUT).state_dict(), atol=0)
    losses, final_gpt = plain_gpt_losses()
    assert max_difference(two_plain[1][0], losses) < 1e-4, (two_plain[1][0], losses)
    assert_weights_close(final_plain, final_gpt, atol=1e-5)

    # DeepSpeed's per-layer checkpoint files, read back under GPT keys, are the trained weights
    files = sorted(os.listdir(tmp_path / "step4"))
    assert "layer_05-model_00-model_states.pt" in files, files
    from_files = gpt_state_dict_from_layer_files(str(tmp_path / "step4"), CFG)
    assert_weights_close(from_files, final2, atol=0)
    with pytest.raises(FileNotFoundError, match="layer_00-model_01"):
        gpt_state_dict_from_layer_files(str(tmp_path / "step4"), CFG, tp_rank=1)


def test_tensor_and_pipeline_parallel_equal_single_process(single_stage):
    """TP=2 x PP=2 (ZeRO 1, hidden dropout, activation checkpointing) trains like TP=1 x PP=1."""
    one_tp = single_stage[1]
    four = run_distributed(_tp2_pp2, 4)
    initial4, final4 = merged(four)
    assert_weights_close(initial4, merged([one_tp])[0], atol=0)
    for rank_losses in (r[0] for r in four):
        assert max_difference(rank_losses, one_tp[0]) < 1e-4, (rank_losses, one_tp[0])
    assert_weights_close(final4, merged([one_tp])[1], atol=1e-5)
