"""Offline checkpoint conversion: TP merge/reshard, ZeRO -> fp32, CogView import/export.

Real checkpoints come from pretrain.py under torchrun (gloo); references are independent of the
code under test: a TP=2 model loading its own shards, DeepSpeed's zero_to_fp32, and CogView files
sliced by hand here."""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed import free_port, run_distributed
from megatron_t2i import mpu
from megatron_t2i.config import ModelConfig, model_config
from megatron_t2i.model.gpt import GPT
from megatron_t2i.model.pipeline import layer_prefixes
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.training import convert
from megatron_t2i.training.checkpoint import CheckpointError, check_compatible
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # multi-process / end-to-end runs: see conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--model-size", "tiny", "--micro-batch-size", "2", "--log-interval", "1",
         "--eval-iters", "0", "--distributed-backend", "gloo", "--seed", "3",
         "--hidden-dropout", "0", "--attention-dropout", "0"]


def pretrain(flags, nproc=2) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), os.path.join(ROOT, "pretrain.py"), *TRAIN, *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_T2I_DIST_TIMEOUT_MINUTES="2")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def module(folder, rank=0) -> dict:
    path = os.path.join(folder, f"mp_rank_{rank:02d}_model_states.pt")
    return torch.load(path, weights_only=True, map_location="cpu")["module"]


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def fixed_batch(layout, batch=2, seq=16):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, layout.vocab_size, (batch, seq), generator=g)
    return tokens, torch.arange(seq).expand(batch, seq)


@torch.no_grad()
def logits_of(folder, state=None):
    """TP=1 GPT of the folder's config with `state` (default: its own weights) -> logits."""
    config = ModelConfig.load(os.path.join(folder, "model_config.json"))
    layout = TokenLayout.load(os.path.join(folder, "token_layout.json"))
    model = GPT(config).eval()
    model.load_state_dict(state if state is not None else module(folder))
    return model(*fixed_batch(layout))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "toy.lmdb"), count=32)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, data):
    """A real TP=2 fp32 run with ZeRO-1 -> its checkpoint folder."""
    save = str(tmp_path_factory.mktemp("tp2"))
    pretrain(["--data-path", data, "--train-iters", "3", "--save", save,
              "--tensor-model-parallel-size", "2", "--zero-stage", "1"])
    return os.path.join(save, "iter_0000003")


@pytest.fixture(scope="module")
def tp1(tmp_path_factory, tp2):
    return convert.reshard(tp2, str(tmp_path_factory.mktemp("tp1")), tp=1)


# ----------------------------------------------------------------------------------------------
# Tensor-parallel merge and reshard

def _tp2_logits(rank, world_size, folder):
    """Reference: a TP=2 model loads its own rank's shard (no conversion code involved)."""
    torch.manual_seed(0)
    mpu.initialize_model_parallel(2)
    config = ModelConfig.load(os.path.join(folder, "model_config.json"))
    model = GPT(config).eval()
    model.load_state_dict(module(folder, rank))
    layout = TokenLayout.load(os.path.join(folder, "token_layout.json"))
    with torch.no_grad():
        return model(*fixed_batch(layout), gather_logits=True).numpy()


def test_tp2_resharded_to_tp1_gives_the_same_logits(tp2, tp1):
    reference = run_distributed(_tp2_logits, 2, tp2)[0]
    layout = TokenLayout.load(os.path.join(tp1, "token_layout.json"))
    assert reference.shape[-1] == 256 and module(tp1)["word_embeddings.weight"].shape[0] == 128
    ours = logits_of(tp1)  # 128 vocabulary rows at TP=1: the unused ones were trimmed
    np.testing.assert_allclose(ours[..., :layout.vocab_size].numpy(),
                               reference[..., :layout.vocab_size], rtol=0, atol=1e-5)
    assert convert.read_info(tp1)[3]["iteration"] == 3


def test_tp1_to_tp2_and_tp4_and_back_is_bitwise(tp2, tp1, tmp_path):
    original, wide = module(tp1), {}
    for tp in (2, 4):
        wide[tp] = convert.reshard(tp1, str(tmp_path / f"tp{tp}"), tp=tp)
        assert len([f for f in os.listdir(wide[tp]) if f.startswith("mp_rank_")]) == tp
        back = convert.reshard(wide[tp], str(tmp_path / f"back{tp}"), tp=1)
        assert_same(module(back), original)
    # TP=1 -> TP=2 rebuilds the training run's own shards, bar the unused vocabulary rows (zero)
    again = wide[2]
    for rank in range(2):
        trained, rebuilt = module(tp2, rank), module(again, rank)
        for key in trained:
            if key != "word_embeddings.weight":
                assert torch.equal(rebuilt[key], trained[key]), (rank, key)
    assert torch.equal(module(again, 0)["word_embeddings.weight"],
                       module(tp2, 0)["word_embeddings.weight"])  # rows 0..127
    assert not module(again, 1)["word_embeddings.weight"].any()  # rows 128..255: no ids


def test_pipeline_layer_files_merge_like_rank_files(tp2, tmp_path):
    """Per-layer files as DeepSpeed's PipelineModule writes them (layer_XX-model_YY), PP=2."""
    folder = tmp_path / "iter_0000003"
    folder.mkdir()
    config = ModelConfig.load(os.path.join(tp2, "model_config.json"))
    prefixes = layer_prefixes(config)
    for rank in range(2):
        layers = {}
        for key, value in module(tp2, rank).items():  # a key belongs to its longest prefix
            index = max((i for i, p in enumerate(prefixes) if p and key.startswith(p)),
                        key=lambda i: len(prefixes[i]))
            layers.setdefault(index, {})[key[len(prefixes[index]):]] = value
        for index, layer in layers.items():
            torch.save(layer, folder / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
    for name in ("model_config.json", "token_layout.json"):
        shutil.copy(os.path.join(tp2, name), folder / name)
    (folder / "meta.json").write_text('{"iteration": 3, "tensor_model_parallel_size": 2, '
                                      '"pipeline_model_parallel_size": 2}')
    merged, *_ = convert.load_full_state_dict(str(folder))
    expected, *_ = convert.load_full_state_dict(tp2)
    assert_same(merged, expected)


def test_zero1_tp2_fp32_masters_equal_the_trained_weights(tp2):
    masters = convert.merge_zero_to_fp32(tp2)  # fp32 training: the module holds the masters
    weights, *_ = convert.load_full_state_dict(tp2)
    assert_same(masters, weights)


# ----------------------------------------------------------------------------------------------
# Fine-tuning from a converted checkpoint; ZeRO-2 -> fp32

def test_finetune_from_resharded_refreshes_bf16_masters_and_zero2_exports_them(tp1, data,
                                                                                tmp_path):
    save = str(tmp_path / "finetune")
    # lr 0: the one step changes nothing, so what is saved is what loading produced
    out = pretrain(["--data-path", data, "--train-iters", "1", "--save", save, "--load",
                    os.path.dirname(tp1), "--finetune", "--lr", "0", "--bf16",
                    "--zero-stage", "2"])
    assert f"fine-tuning from {os.path.dirname(tp1)}" in out
    folder = os.path.join(save, "iter_0000001")
    masters = convert.merge_zero_to_fp32(save)

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    reference = get_fp32_state_dict_from_zero_checkpoint(save, tag="iter_0000001")
    assert_same(masters, {k: reference[k] for k in masters})
    loaded = module(tp1)  # not stale: the masters are the loaded weights (as bf16 holds them)
    assert_same(masters, {k: v.bfloat16().float() for k, v in loaded.items()})
    trained = module(folder)  # bf16 module weights are the masters rounded
    assert trained["word_embeddings.weight"].dtype == torch.bfloat16
    assert_same(trained, {k: v.bfloat16() for k, v in masters.items()})

    exported = convert.export_fp32(save, str(tmp_path / "fp32"))
    assert_same(module(exported), masters)
    bf16_logits = logits_of(folder, {k: v.float() for k, v in trained.items()})
    assert torch.equal(logits_of(exported), bf16_logits)


# ----------------------------------------------------------------------------------------------
# CogView's layout, written here by hand: QKV per rank [Q_r; K_r; V_r], rows split by rank

HIDDEN, LAYERS, HEADS, POSITIONS = 32, 2, 2, 20
COGVIEW_ROWS = {1: 58240, 2: 58368}  # CogView pads its 58,219 ids to a multiple of 128 x mp


def cogview_shapes(rows, hidden=HIDDEN, layers=LAYERS, positions=POSITIONS) -> dict:
    """Key -> shape at mp=1, as REFERENCE.md lists them."""
    shapes = {"word_embeddings.weight": (rows, hidden),
              "transformer.position_embeddings.weight": (positions, hidden)}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm", "third_layernorm",
                   "fourth_layernorm"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (hidden,)
        shapes.update({p + "attention.query_key_value.weight": (3 * hidden, hidden),
                       p + "attention.query_key_value.bias": (3 * hidden,),
                       p + "attention.dense.weight": (hidden, hidden),
                       p + "attention.dense.bias": (hidden,),
                       p + "mlp.dense_h_to_4h.weight": (4 * hidden, hidden),
                       p + "mlp.dense_h_to_4h.bias": (4 * hidden,),
                       p + "mlp.dense_4h_to_h.weight": (hidden, 4 * hidden),
                       p + "mlp.dense_4h_to_h.bias": (hidden,)})
    shapes["transformer.final_layernorm.weight"] = (hidden,)
    shapes["transformer.final_layernorm.bias"] = (hidden,)
    return shapes


def cogview_weights(seed=0, rows=COGVIEW_ROWS[2]) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g).half() for k, shape in cogview_shapes(rows).items()}


def cogview_rank(full: dict, mp: int, r: int) -> dict:
    def rows(t):
        return t.chunk(mp, 0)[r].clone()

    shard = {}
    for key, t in full.items():
        if key == "word_embeddings.weight" or "dense_h_to_4h" in key:
            shard[key] = rows(t)
        elif "query_key_value" in key:
            shard[key] = torch.cat([rows(block) for block in t.chunk(3, 0)])
        elif key.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            shard[key] = t.chunk(mp, 1)[r].clone()
        else:
            shard[key] = t.clone()
    return shard


def write_cogview(folder, full: dict, mp: int, tracker="release", extra=None) -> str:
    os.makedirs(os.path.join(folder, tracker))
    with open(os.path.join(folder, convert.COGVIEW_TRACKER), "w") as f:
        f.write(tracker + "\n")
    full = {**full, "word_embeddings.weight": full["word_embeddings.weight"][:COGVIEW_ROWS[mp]]}
    for r in range(mp):
        torch.save({"module": cogview_rank(full, mp, r), **(extra or {})},
                   os.path.join(folder, tracker, f"mp_rank_{r:02d}_model_states.pt"))
    return str(folder)


@pytest.mark.parametrize("mp", [1, 2])
def test_cogview_import_export_round_trip_is_bitwise(tmp_path, mp):
    full = cogview_weights()
    src = write_cogview(tmp_path / "cogview", full, mp, tracker="1500")
    # at TP=mp the vocabulary padding is CogView's, so even its unused rows survive
    ours = convert.import_cogview(src, str(tmp_path / "ours"), tp=mp, num_attention_heads=HEADS)
    imported, config, layout, meta = convert.load_full_state_dict(ours)
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size,
            config.max_position_embeddings, meta["iteration"], meta["weights_dtype"]) == \
        (LAYERS, HIDDEN, 4 * HIDDEN, POSITIONS, 1500, "float16")
    rows = COGVIEW_ROWS[mp]
    assert layout.name == "cogview" and config.vocab_size == rows
    assert_same(imported, {k: (v[:rows] if k == "word_embeddings.weight" else v).float()
                           for k, v in full.items()})
    back = convert.export_cogview(ours, str(tmp_path / "back"), mp=mp)
    assert open(tmp_path / "back" / convert.COGVIEW_TRACKER).read() == "release"
    for r in range(mp):
        assert_same(module(back, r), module(os.path.join(src, "1500"), r))


def test_cogview_mp2_imports_like_mp1(tmp_path):
    full = cogview_weights()
    one = convert.import_cogview(write_cogview(tmp_path / "mp1", full, 1), str(tmp_path / "o1"),
                                 num_attention_heads=HEADS)
    two = convert.import_cogview(write_cogview(tmp_path / "mp2", full, 2), str(tmp_path / "o2"),
                                 num_attention_heads=HEADS)
    assert_same(module(two), module(one))


def test_cogview_import_at_tp2_equals_resharding_the_tp1_import(tmp_path):
    src = write_cogview(tmp_path / "cv", cogview_weights(), 1)
    direct = convert.import_cogview(src, str(tmp_path / "tp2"), tp=2, num_attention_heads=HEADS)
    one = convert.import_cogview(src, str(tmp_path / "tp1"), tp=1, num_attention_heads=HEADS)
    via = convert.reshard(one, str(tmp_path / "via"), tp=2)
    for r in range(2):
        assert_same(module(direct, r), module(via, r))


@pytest.mark.parametrize("damage, message", [
    (lambda w: w.pop("transformer.layers.1.mlp.dense_4h_to_h.bias"),
     "missing key transformer.layers.1.mlp.dense_4h_to_h.bias"),
    (lambda w: w.update({"transformer.layers.0.attention.rotary.weight": torch.zeros(2)}),
     "unexpected key transformer.layers.0.attention.rotary.weight"),
    (lambda w: w.update({"transformer.layers.1.attention.dense.weight": torch.zeros(HIDDEN, 8)}),
     r"transformer.layers.1.attention.dense.weight has shape \[32, 8\], expected \[32, 32\]"),
    (lambda w: w.update({"word_embeddings.weight": torch.zeros(50048, HIDDEN)}),
     "another vocabulary"),
])
def test_bad_cogview_checkpoint_is_one_clear_line(tmp_path, damage, message):
    full = cogview_weights()
    full["word_embeddings.weight"] = full["word_embeddings.weight"][:58240]
    damage(full)
    src = write_cogview(tmp_path / "cv", full, 1)
    with pytest.raises(ValueError, match=message) as e:
        convert.import_cogview(src, str(tmp_path / "out"), num_attention_heads=HEADS)
    assert "\n" not in str(e.value) and "mp_rank_00_model_states.pt" in str(e.value)


def test_released_4b_shapes_infer_the_cogview_4b_config():
    """The 4B release's keys and shapes (REFERENCE.md) on the meta device, mp=1."""
    shard = {k: torch.empty(shape, dtype=torch.float16, device="meta")
             for k, shape in cogview_shapes(58240, 2560, 48, 1089).items()}
    config = convert.cogview_config(shard, 1, "release")
    assert config == model_config("cogview-4b")
    assert len(convert.merge_shards([shard], convert.parameter_specs(config), ["release"])) == \
        len(shard)


def test_untrusted_objects_are_refused_unless_trusted(tmp_path):
    src = write_cogview(tmp_path / "cv", cogview_weights(), 1,
                        extra={"args": argparse.Namespace(lr=1e-4)})  # Megatron saves its args
    with pytest.raises(ValueError, match="refused by the safe loader .*argparse.Namespace"):
        convert.import_cogview(src, str(tmp_path / "out"), num_attention_heads=HEADS)
    convert.import_cogview(src, str(tmp_path / "out"), num_attention_heads=HEADS, trust=True)


# ----------------------------------------------------------------------------------------------
# Our layout: clear refusals

def test_not_a_checkpoint_missing_shard_and_misfit_shapes(tp2, tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: not a megatron_t2i checkpoint"):
        convert.load_full_state_dict(str(tmp_path))
    cogview = write_cogview(tmp_path / "cv", cogview_weights(), 1)
    with pytest.raises(CheckpointError, match="use import-cogview"):
        convert.load_full_state_dict(cogview)

    broken = tmp_path / "iter_0000003"
    shutil.copytree(tp2, broken)
    os.remove(broken / "mp_rank_01_model_states.pt")
    with pytest.raises(ValueError, match=r"mp_rank_01_model_states.pt: missing \(listed in manifest"):
        convert.load_full_state_dict(str(broken))
    # the checks behind the manifest, as a checkpoint saved before manifests meets them
    os.remove(broken / "manifest.json")
    with pytest.raises(ValueError, match="mp_rank_01_model_states.pt: missing"):
        convert.load_full_state_dict(str(broken))
    os.remove(broken / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="missing zero_pp_rank_0_mp_rank_00_optim_states"):
        convert.merge_zero_to_fp32(str(broken))

    shutil.copy(os.path.join(tp2, "mp_rank_01_model_states.pt"), broken)
    with open(broken / "mp_rank_00_model_states.pt", "wb") as f:
        f.write(b"\x80\x02half a checkpoint")
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt: not a readable"):
        convert.load_full_state_dict(str(broken))

    shutil.copy(os.path.join(tp2, "mp_rank_00_model_states.pt"), broken)
    config = ModelConfig.load(broken / "model_config.json")
    ModelConfig(**{**config.to_dict(), "ffn_hidden_size": 128}).save(broken / "model_config.json")
    with pytest.raises(ValueError,
                       match=r"mp_rank_00_model_states.pt: transformer.layers.0.mlp.dense_h_to_4h"
                             r".weight has shape \[128, 64\], expected \[64, 64\]"):
        convert.load_full_state_dict(str(broken))


def test_checkpoint_of_another_size_vocabulary_or_tp_is_refused(tp2, tp1, tmp_path):
    config = ModelConfig.load(os.path.join(tp1, "model_config.json"))
    layout = TokenLayout.load(os.path.join(tp1, "token_layout.json"))
    save_dir = os.path.dirname(tp1)
    check_compatible(save_dir, config, layout)  # as pretrain.py at TP=1 sees it
    wider = ModelConfig(**{**config.to_dict(), "hidden_size": 128})
    with pytest.raises(CheckpointError, match="model hidden_size is 64, this run's is 128"):
        check_compatible(save_dir, wider, layout)
    other = TokenLayout(num_image_codes=64, num_text_tokens=40, image_grid=8, max_text_tokens=6)
    with pytest.raises(CheckpointError, match="token layout mismatch in num_image_codes"):
        check_compatible(save_dir, config, other)
    with pytest.raises(CheckpointError, match="saved at tensor-parallel size 2, this run uses 1; "
                                              "convert it first"):
        check_compatible(os.path.dirname(tp2), config, layout)
    with pytest.raises(CheckpointError, match="zero_stage 0 in meta.json"):
        convert.merge_zero_to_fp32(tp1)
    with pytest.raises(CheckpointError, match="export to CogView.*num_image_codes"):
        convert.export_cogview(tp1, str(tmp_path / "cv"))


def test_cli(tp2, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / "out")
    assert cli.main(["reshard", tp2, out, "--tp", "1", "--dtype", "bf16"]) == 0
    assert "wrote " + os.path.join(out, "iter_0000003") in capsys.readouterr().out
    assert module(os.path.join(out, "iter_0000003"))["word_embeddings.weight"].dtype == \
        torch.bfloat16
    assert cli.main(["info", out]) == 0
    assert "TP 1 x PP 1 x DP 1, ZeRO stage 0, weights only" in capsys.readouterr().out
    assert cli.main(["export-fp32", out, str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint.py export-fp32: error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        cli.main(["reshard", tp2, out])  # --tp is required
    assert e.value.code == 2
