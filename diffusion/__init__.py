"""CLIP towers and text-conditioned diffusion transformers in JAX/Flax."""
