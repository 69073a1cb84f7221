"""Installable package `diffusion`: CLIP and text-conditioned DiT training and sampling in JAX."""

from setuptools import find_packages, setup

setup(
    name="diffusion",
    version="0.1.0",
    description="Contrastive CLIP towers and text-conditioned diffusion transformers in JAX/Flax, "
    "from a 2-core CPU to TPU pods.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["diffusion", "diffusion.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.8,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.21,<0.13",  # 0.11.21: min_slice_bytes_for_replica_parallel
        "tensorflow-datasets>=4.9.8,<5",
        "grain>=0.2.12,<0.3",
        "array-record>=0.7,<0.9",
        "transformers>=4.50,<6",
        "tokenizers>=0.21,<0.24",
        "safetensors>=0.5,<0.9",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "numpy>=2.0,<3",
        "pillow>=10,<14",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "scipy>=1.13,<2",  # matrix square root of the Frechet distance
        "matplotlib>=3.9,<4",  # plots of the evaluation report
        "dm-pix>=0.4.3,<0.5",  # PSNR and SSIM of an autoencoder's reconstructions
        "imageio>=2.38,<3",  # reads sampled MP4s back (evaluation, tests)
        # writes sampled clips as MP4; its bundled ffmpeg and x264 fix the files' bytes
        "imageio-ffmpeg>=0.8,<0.9",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",  # make test: files spread over the cores
            "torch==2.13.0",  # CPU reference for HF CLIP parity and the PyTorch DiT benchmark
            "diffusers>=0.35,<0.43",  # reference AutoencoderKL for the autoencoder parity tests
            "peft>=0.17,<0.22",  # diffusers loads our exported LoRA adapters through it (tests)
            "ruff>=0.8,<0.18",
            "import-linter>=2.1,<3",  # make lint: the package's layers (pyproject.toml)
        ],
        "tpu": ["jax[tpu]>=0.8,<0.13"],
        # scripts/render_report.py: opens evaluate.py's HTML report in headless Chromium.
        "browser": ["playwright>=1.40,<2"],
    },
)
