"""Training: the loop (`train`), its inputs, preemption and FLOP counting."""

from diffusion.training.loop import (
    Callback,
    RunContext,
    build_model,
    build_on,
    reads_text_tower,
    train,
)
from diffusion.training.preemption import PreemptionGuard

__all__ = [
    "Callback",
    "PreemptionGuard",
    "RunContext",
    "build_model",
    "build_on",
    "reads_text_tower",
    "train",
]
