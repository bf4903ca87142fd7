"""Decoding strategies, each a small loop over a DecodingState (megatron_t2i/generation/state.py):

    raster   one token per step, in order (text->image, completion, sampled captions); KV cache,
             classifier-free guidance, per-step allowed vocabulary
    beam     beam search over captions (image->text)
    fill     complete a sequence whose some entries are given (super-resolution windows)

A new strategy is a new module here taking (model, Prompt, ..., Decoding) and working on a
DecodingState; the task that uses it names it (megatron_t2i/tasks.py, generation/tasks/).
"""
