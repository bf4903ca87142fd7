"""Tensor/pipeline/data-parallel primitives (Megatron style). Imports nothing from the model.

    state          process groups and rank getters (TP innermost, PP outermost)
    mappings       autograd communication at the borders of TP regions
    layers         ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding (+ shard helpers)
    cross_entropy  vocab-parallel cross entropy
    random         seeds, the TP RNG tracker, RNG-replaying activation checkpointing
"""
from megatron_t2i.mpu.cross_entropy import vocab_parallel_cross_entropy
from megatron_t2i.mpu.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                     gather_tensor_along_dim, normal_init_method,
                                     set_tensor_model_parallel_attributes, split_tensor_along_dim)
from megatron_t2i.mpu.mappings import (copy_to_tensor_model_parallel_region,
                                       gather_from_tensor_model_parallel_region,
                                       reduce_from_tensor_model_parallel_region,
                                       scatter_to_tensor_model_parallel_region)
from megatron_t2i.mpu.random import (MODEL_PARALLEL_RNG, RNGStatesTracker, checkpoint,
                                     get_rng_tracker, model_parallel_seed)
from megatron_t2i.mpu.state import (destroy_model_parallel, get_data_parallel_group,
                                    get_data_parallel_rank, get_data_parallel_world_size,
                                    get_embedding_group, get_model_parallel_group,
                                    get_pipeline_model_parallel_group,
                                    get_pipeline_model_parallel_rank,
                                    get_pipeline_model_parallel_world_size,
                                    get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                    get_tensor_model_parallel_src_rank,
                                    get_tensor_model_parallel_world_size, global_rank_world,
                                    initialize_model_parallel,
                                    is_pipeline_first_stage, is_pipeline_last_stage,
                                    model_parallel_is_initialized, parallel_group_ranks)
