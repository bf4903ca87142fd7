import subprocess
import sys

import pytest

from megatron_t2i.arguments import parse_args
from megatron_t2i.config import MODEL_SIZES, ModelConfig, model_config
from megatron_t2i.tokenizers.layout import TokenLayout


def error_of(argv, **kw):
    with pytest.raises(SystemExit) as e:
        parse_args(argv, prog="prog", **kw)
    assert e.value.code == 2
    return e


@pytest.mark.parametrize("argv, message", [
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3 does not divide"),
    (["--hidden-size", "100", "--num-attention-heads", "8"], "does not divide --hidden-size 100"),
    (["--model-size", "huge"], "invalid choice: 'huge'"),
    (["--data-path", "/no/such/data"], "--data-path /no/such/data: no such file"),
    (["--text-tokenizer", "/no/such.model"], "--text-tokenizer /no/such.model: no such file"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
    (["--top-p", "1.5"], "--top-p must be in [0, 1)"),
    (["--micro-batch-size", "0"], "expected a positive integer"),
    (["--pipeline-model-parallel-size", "8", "--model-size", "tiny"], "exceeds the 2 layers"),
    (["--batch-size", "100000"], "--batch-size 100000: at most 1024 samples per query"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0"),
])
def test_bad_flags_give_one_line_errors(argv, message, capsys):
    error_of(argv)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_outputs_need_not_exist():
    args = parse_args(["--text-tokenizer", "/tmp/new.model"], groups=("tokenizers",),
                      outputs=("text_tokenizer",))
    assert args.text_tokenizer == "/tmp/new.model"


def test_groups_select_flags():
    args = parse_args([], groups=("data",))
    assert not hasattr(args, "model_size") and args.image_size == 64


def test_help_lists_every_group():
    out = subprocess.run([sys.executable, "arguments.py", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for group in ("model:", "data:", "tokenizers:", "training:", "distributed:", "generation:"):
        assert group in out


def test_named_sizes_and_registry():
    lay = TokenLayout()
    for name in MODEL_SIZES:
        cfg = model_config(name, lay if name != "cogview-4b" else None)
        assert cfg.hidden_size % cfg.num_attention_heads == 0
    big = model_config("cogview-4b")
    assert (big.num_layers, big.hidden_size, big.num_attention_heads) == (48, 2560, 40)
    assert big.vocab_size == 58240 and big.max_position_embeddings == 1089
    assert big.ffn_hidden_size == 10240
    assert 3.85e9 < big.num_parameters() < 4.0e9
    with pytest.raises(ValueError, match="unknown model size 'nope'"):
        model_config("nope")
    with pytest.raises(ValueError, match="tensor-parallel size 3 does not divide"):
        big.check_tensor_parallel(3)


def test_model_config_json_round_trip(tmp_path):
    cfg = model_config("tiny", TokenLayout(), max_tensor_parallel=2)
    assert cfg.vocab_size % 256 == 0
    cfg.save(str(tmp_path / "model.json"))
    assert ModelConfig.load(str(tmp_path / "model.json")) == cfg


def test_corrupt_or_missing_config_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "model.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"model config .*model.json: not valid JSON"):
        ModelConfig.load(str(bad))
    with pytest.raises(FileNotFoundError, match=r"model config .*absent.json: no such file"):
        ModelConfig.load(str(tmp_path / "absent.json"))


def test_a_deepspeed_config_that_is_not_an_object_is_one_line(tmp_path):
    from megatron_t2i.training.engine import load_ds_config
    path = tmp_path / "ds.json"
    path.write_text("[1, 2]")
    args = parse_args(["--deepspeed_config", str(path)], groups=("training", "distributed"))
    with pytest.raises(ValueError, match=f"--deepspeed_config {path}: expected a JSON object "
                                         r"\{...\}, found a JSON list"):
        load_ds_config(args)
