"""Parallel layers: a TP=2 layer is exactly the slices of the TP=1 layer built from the same seed.

Each rank first builds and runs the TP=1 reference layers (model parallel not initialised yet, so they
are plain single-process layers), then initialises TP=2 and builds the parallel layers from the same
seed. Outputs, input gradients and the gathered weight/bias gradients must match within 1e-6.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_t2i import mpu
from tests.distributed import run_distributed

HIDDEN, FFN, VOCAB = 8, 12, 16  # FFN = 3 blocks of 4 rows: stride 3 splits like a fused QKV


def _xavier(weight):  # depends on the full shape (fans): must see the full weight, not the shard
    return torch.nn.init.xavier_uniform_(weight, gain=1.3)


LAYERS = {  # name: constructor, called once per TP size
    "column": lambda: mpu.ColumnParallelLinear(HIDDEN, FFN),
    "column_gather": lambda: mpu.ColumnParallelLinear(HIDDEN, FFN, gather_output=True),
    "column_qkv": lambda: mpu.ColumnParallelLinear(HIDDEN, FFN, stride=3, init_method=_xavier),
    "column_qkv_gather": lambda: mpu.ColumnParallelLinear(HIDDEN, FFN, stride=3, gather_output=True),
    "row": lambda: mpu.RowParallelLinear(FFN, HIDDEN, init_method=_xavier),
    "row_split_here": lambda: mpu.RowParallelLinear(FFN, HIDDEN, input_is_parallel=False),
    "embedding": lambda: mpu.VocabParallelEmbedding(VOCAB, HIDDEN),
}
SPLIT_OUTPUT = ("column", "column_qkv")  # each rank returns its columns only


def _build(seed):
    layers = {}
    for name, make in LAYERS.items():
        torch.manual_seed(seed)
        layers[name] = make()
    return layers


def _inputs(name):
    if name == "embedding":
        return torch.tensor([[0, 7, 8, 15], [3, 12, 8, 1]])  # ids in both halves of the vocabulary
    size = FFN if name.startswith("row") else HIDDEN
    return torch.randn(2, 5, size, generator=torch.Generator().manual_seed(size))


def _loss_weights(name):
    # weigh each output column differently, so any column mix-up shows in the gradients
    return torch.linspace(-1.0, 2.0, FFN if name.startswith("column") else HIDDEN)


def _forward_backward(layer, x, loss_weights):
    x = x.clone().requires_grad_(x.is_floating_point())
    y = layer(x)
    (y * loss_weights).sum().backward()
    return y.detach(), x.grad


def _gather(shard, dim, stride):
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, shard.contiguous())
    return mpu.gather_tensor_along_dim(shards, dim, stride)


def _run(rank, world_size):
    reference = _build(seed=123)
    with torch.no_grad():  # biases start at zero, which would hide a bias added twice or misplaced
        for layer in reference.values():
            if getattr(layer, "bias", None) is not None:
                layer.bias.normal_(generator=torch.Generator().manual_seed(7))
    expected = {name: _forward_backward(layer, _inputs(name), _loss_weights(name))
                for name, layer in reference.items()}

    mpu.initialize_model_parallel(tensor_model_parallel_size=world_size)
    parallel = _build(seed=123)
    for name, par in parallel.items():
        ref, (y_ref, dx_ref) = reference[name], expected[name]
        dim, stride = par.weight.partition_dim, par.weight.partition_stride
        assert par.weight.tensor_model_parallel
        torch.testing.assert_close(par.weight, mpu.split_tensor_along_dim(
            ref.weight, dim, world_size, rank, stride), rtol=0, atol=0, msg=f"{name} init")
        bias = getattr(par, "bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_(mpu.split_tensor_along_dim(ref.bias, 0, world_size, rank, stride)
                           if bias.tensor_model_parallel else ref.bias)

        x, loss_weights = _inputs(name), _loss_weights(name)
        if name == "row":  # input_is_parallel: the rank's slice, as a column-parallel layer makes it
            x, dx_ref = x.chunk(world_size, -1)[rank], dx_ref.chunk(world_size, -1)[rank]
        if name in SPLIT_OUTPUT:  # this rank's output columns get this rank's share of the loss
            loss_weights = mpu.split_tensor_along_dim(loss_weights, 0, world_size, rank, stride)
        y, dx = _forward_backward(par, x, loss_weights)
        if name in SPLIT_OUTPUT:
            y = _gather(y, -1, stride)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6, msg=f"{name} output")
        if dx_ref is not None:
            torch.testing.assert_close(dx, dx_ref, rtol=0, atol=1e-6, msg=f"{name} input grad")
        torch.testing.assert_close(_gather(par.weight.grad, dim, stride), ref.weight.grad, rtol=0,
                                   atol=1e-6, msg=f"{name} weight grad")
        if bias is not None:  # a replicated bias holds the full gradient on every rank
            bias_grad = (_gather(bias.grad, 0, bias.partition_stride) if bias.tensor_model_parallel
                         else bias.grad)
            torch.testing.assert_close(bias_grad, ref.bias.grad, rtol=0, atol=1e-6,
                                       msg=f"{name} bias grad")

    emb = parallel["embedding"]
    assert (emb.vocab_start_index, emb.vocab_end_index) == (rank * 8, rank * 8 + 8)
    with pytest.raises(ValueError, match="ColumnParallelLinear: output_size 12 is not divisible by "
                                         "the tensor parallel size 2 x stride 4"):
        mpu.ColumnParallelLinear(HIDDEN, FFN, stride=4)
    return "ok"


@pytest.mark.slow
def test_tp2_layers_are_slices_of_tp1_layers():
    assert run_distributed(_run, 2) == ["ok", "ok"]


def test_split_and_gather_with_stride_3_follow_the_qkv_layout():
    # rows [Q; K; V], 4 rows each; TP=2 rank r keeps [Q_r; K_r; V_r] (2 rows of each)
    q, k, v = (torch.arange(8.0).view(4, 2) + 100 * i for i in range(3))
    full = torch.cat([q, k, v])
    for rank in range(2):
        rows = slice(2 * rank, 2 * rank + 2)
        expected = torch.cat([q[rows], k[rows], v[rows]])
        torch.testing.assert_close(mpu.split_tensor_along_dim(full, 0, 2, rank, stride=3), expected,
                                   rtol=0, atol=0)
    shards = [mpu.split_tensor_along_dim(full, 0, 2, r, stride=3) for r in range(2)]
    torch.testing.assert_close(mpu.gather_tensor_along_dim(shards, 0, stride=3), full, rtol=0, atol=0)
    # along columns, 4 ranks, stride 1: plain contiguous chunks
    wide = torch.randn(3, 8)
    torch.testing.assert_close(mpu.split_tensor_along_dim(wide, 1, 4, 2), wide[:, 4:6], rtol=0, atol=0)
    with pytest.raises(ValueError, match="size 8 of dim 1 is not divisible by world 3 x stride 1"):
        mpu.split_tensor_along_dim(wide, 1, 3, 0)


def test_single_process_layers_without_distributed():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    column = mpu.ColumnParallelLinear(HIDDEN, FFN, stride=3)
    row = mpu.RowParallelLinear(FFN, HIDDEN)
    no_bias = mpu.RowParallelLinear(FFN, HIDDEN, bias=False)
    emb = mpu.VocabParallelEmbedding(VOCAB, HIDDEN)
    torch.manual_seed(0)  # the default init is N(0, 0.02) on the full weight, drawn on the CPU
    torch.testing.assert_close(column.weight, torch.empty(FFN, HIDDEN).normal_(0.0, 0.02),
                               rtol=0, atol=0)
    assert column.weight.partition_stride == 3 and column.weight.partition_dim == 0
    assert row.weight.partition_dim == 1 and no_bias.bias is None
    assert not row.bias.tensor_model_parallel and column.bias.tensor_model_parallel
    assert torch.equal(column.bias, torch.zeros(FFN)) and torch.equal(row.bias, torch.zeros(HIDDEN))
    with torch.no_grad():  # the plain F.linear reference below must see the biases
        column.bias.normal_()
        row.bias.normal_()
    ids = torch.tensor([[1, 15, 0]])
    x = emb(ids)
    torch.testing.assert_close(x, F.embedding(ids, emb.weight), rtol=0, atol=0)
    y = row(F.gelu(column(x)))
    hidden = F.gelu(F.linear(x, column.weight, column.bias))
    torch.testing.assert_close(y, F.linear(hidden, row.weight, row.bias))
    torch.testing.assert_close(no_bias(hidden), F.linear(hidden, no_bias.weight))
    half = mpu.ColumnParallelLinear(HIDDEN, FFN, params_dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16 and half.bias.dtype == torch.bfloat16
