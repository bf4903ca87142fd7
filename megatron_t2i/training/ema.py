"""An exponential moving average of the weights (what diffusion models sample with: TLD keeps one
at 0.999), kept beside the DeepSpeed engine and saved in its checkpoints.

Each rank averages its own shard (tensor-parallel slices, pipeline stage), in fp32 whatever the
training precision. The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the
average of a short run is not dominated by its random initialisation. The state rides in the
checkpoint's client state ("ema": {decay, updates, shadow: {name: tensor}}), per model-parallel
rank like the weights, so resuming is exact; generation and the offline converters read the
shadow in place of the weights when it is there (`module_weights`).
"""
from __future__ import annotations

import torch

EMA_KEY = "ema"


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay {decay}: must be in (0, 1)")
        self.decay, self.updates = decay, 0
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        rate = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), rate)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {n: t.detach().cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict, source: str) -> None:
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if not isinstance(shadow, dict) or set(shadow) != set(self.shadow):
            raise ValueError(f"{source}: its EMA state does not match this model's parameters")
        for name, t in shadow.items():
            if tuple(t.shape) != tuple(self.shadow[name].shape):
                raise ValueError(f"{source}: EMA entry {name} has shape {tuple(t.shape)}, the "
                                 f"model's is {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(t)
        self.updates = int(state.get("updates", 0))


def module_weights(file_state: dict, path: str, ema: bool = True) -> dict:
    """The weights of a DeepSpeed model file: its 'module', with the EMA shadow in place of the
    averaged parameters when `ema` and the file holds one (cast to the stored dtype)."""
    module = file_state.get("module") if isinstance(file_state, dict) else None
    if not isinstance(module, dict):
        from megatron_t2i.training.checkpoint import CheckpointError
        raise CheckpointError(f"{path}: no 'module' entry with the model weights")
    shadow = (file_state.get(EMA_KEY) or {}).get("shadow") if ema else None
    if not shadow:
        return module
    return {k: shadow[k].to(v.dtype) if k in shadow else v for k, v in module.items()}
