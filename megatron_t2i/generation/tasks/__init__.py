"""Generation tasks: the mains that generate_samples.py --task NAME runs (megatron_t2i/tasks.py),
each `main_<task>(ctx, config)` with a GenerationContext and a GenerationConfig."""
