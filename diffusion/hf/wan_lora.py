"""Export a video DiT's low-rank adapters (diffusion/models/lora.py) as the safetensors file
diffusers' Wan pipelines load: `WanPipeline.load_lora_weights(dir, weight_name=...)`, or
`WanTransformer3DModel.load_lora_adapter(state_dict, prefix="transformer", metadata=...)`.

Keys are PEFT's, under diffusers' `transformer.` prefix, one pair per adapted projection:
    transformer.blocks.{i}.attn1.to_q.lora_A.weight   (r, in)   A transposed
    transformer.blocks.{i}.attn1.to_q.lora_B.weight   (out, r)  B transposed
(our A (*in, r) and B (r, *out) flattened to torch Linear layouts). The scale alpha / r travels
as diffusers writes it in `save_lora_weights`: the safetensors metadata
`lora_adapter_metadata` holds the PEFT LoraConfig fields (r, lora_alpha, target_modules) under
the same prefix. A loader that ignores the metadata reads alpha = r (scale 1): diffusers before
0.35 does, and so would get a wrong scale unless lora_alpha equals lora_rank.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from diffusion.errors import UserError
from diffusion.models import lora

PREFIX = "transformer"  # WanLoraLoaderMixin.transformer_name
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def _target_of(adapter_path: tuple) -> tuple[int | None, str]:
    """('blocks', 'blocks', i, 'self_attn', 'query_adapter') -> (i, 'self_attn.query');
    ('blocks', 'blocks', 'ffn', 'fc1', 'adapter') (scanned) -> (None, 'ffn.fc1')."""
    rest = adapter_path[2:]
    index = None
    if rest and isinstance(rest[0], int):
        index, rest = rest[0], rest[1:]
    names = [str(n) for n in rest]
    names[-1] = names[-1].removesuffix(lora.ADAPTER_SUFFIX).removesuffix("_")
    return index, ".".join(n for n in names if n)


def lora_state_dict(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict]:
    """({diffusers key: float32 array}, PEFT LoraConfig fields) of the adapters of `model`."""
    config = model.config
    if config.lora_rank == 0:
        raise UserError(
            "the model has no LoRA adapters (lora_rank=0), so there is nothing to export; "
            "build it with lora_rank > 0 (config.lora.rank in a recipe)"
        )
    tensors: dict[str, np.ndarray] = {}
    modules = set()
    for path, adapter in lora.adapters_of(model).items():
        if tuple(path[:2]) != ("blocks", "blocks"):
            raise ValueError(f"adapter outside the blocks at {path}: no diffusers name for it")
        index, target = _target_of(tuple(path))
        module = lora.TARGETS[target]
        modules.add(module)
        a = np.asarray(adapter.a[...], np.float32)
        b = np.asarray(adapter.b[...], np.float32)
        layers = [(index, (a, b))] if index is not None else list(enumerate(zip(a, b, strict=True)))
        for i, (a_i, b_i) in layers:
            rank = a_i.shape[-1]
            name = f"{PREFIX}.blocks.{i}.{module}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, rank).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(rank, -1).T)
    alpha = config.lora_rank if config.lora_alpha is None else config.lora_alpha
    peft_config = {"r": config.lora_rank, "lora_alpha": alpha, "target_modules": sorted(modules)}
    return tensors, peft_config


def save_lora_safetensors(model: nnx.Module, path: str) -> str:
    """Writes the adapters of `model` to the safetensors file `path` (diffusers' Wan LoRA
    format, see the module docstring), atomically; returns `path`."""
    tensors, peft_config = lora_state_dict(model)
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in peft_config.items()}),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    staging = f"{path}.partial"
    save_file(tensors, staging, metadata=metadata)
    os.replace(staging, path)  # a reader never sees half a file
    return path
