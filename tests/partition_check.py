"""Compiles the CLIP and DiT training gradients on a 2 x 2 x 2 data x fsdp x tensor mesh.

Run as a script by tests/test_sharding.py with XLA's warnings on (the suite silences them), so
that the test can read what XLA's SPMD partitioner logs while partitioning the real losses.
"""

import os

from conftest import xla_flags  # this script runs from tests/, so conftest is importable

os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from diffusion import meshes, models, sharding  # noqa: E402
from diffusion.families import clip as clip_family
from diffusion.families import dit as dit_family

BATCH, LENGTH, SIZE = 16, 8, 16


def main():
    mesh = meshes.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    clip_config = models.clip_config("tiny", vocab_size=64, context_length=LENGTH, image_size=SIZE)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32),
        "tokens": rng.integers(1, 64, (BATCH, LENGTH)).astype(np.int32),
        "mask": np.ones((BATCH, LENGTH), bool),
    }
    batch = sharding.shard_batch(batch, mesh)
    clip_def, clip_state = sharding.create_sharded_state(
        lambda: models.CLIP(clip_config, rngs=nnx.Rngs(0)), mesh
    )
    dit_config = models.dit_config(  # conditioned on that CLIP, as families.dit.model_config does
        "tiny", context_dim=clip_config.text_width, pooled_dim=clip_config.embed_dim
    )
    dit_def, dit_state = sharding.create_sharded_state(
        lambda: models.DiT(dit_config, rngs=nnx.Rngs(0)), mesh
    )
    empty = np.zeros((1, LENGTH), np.int32), np.ones((1, LENGTH), bool)

    def clip_loss(state):
        return clip_family.clip_loss(nnx.merge(clip_def, state), None, batch, None)[0]

    def dit_loss(state, text_state):
        dit, text_encoder = nnx.merge(dit_def, state), nnx.merge(clip_def, text_state)
        objective = dit_family.DiffusionObjective()
        key = jax.random.key(0)
        return dit_family.text_conditional_loss(
            dit,
            text_encoder,
            batch,
            key,
            objective=objective,
            empty_tokens=empty[0],
            empty_mask=empty[1],
            cond_dropout=0.1,
        )[0]

    with sharding.activate(mesh):
        jax.jit(jax.grad(clip_loss)).lower(clip_state).compile()
        jax.jit(jax.grad(dit_loss)).lower(dit_state, clip_state).compile()
    print("compiled")


if __name__ == "__main__":
    main()
