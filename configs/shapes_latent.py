"""Latent diffusion on the embedded shapes at 64x64, as one command: an autoencoder, CLIP on the
images, the dataset encoded with the autoencoder and each caption with CLIP's frozen text tower,
a DiT on the latents and those cached text features, then evaluate.py and the prompt grid on the
decoded samples.

    make train CONFIG=configs/shapes_latent.py    # -> runs/shapes_latent/{autoencoder,latents,...}

Each stage writes its own subdirectory of the work directory and resumes when rerun; the DiT's
run directory records the autoencoder (latents.json), so sample.py and evaluate.py on
runs/shapes_latent/dit decode its samples to 64x64 images. README ("Latent diffusion") has its
measured time and accuracy.
"""

import ml_collections

from configs import base_autoencoder, shapes

ARGS = shapes.ARGS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = shapes.get_config(arg)
    # CLIP trains on the source images and their captions, not on the latents, so it runs
    # before encode, whose text features of each caption are the ones of its tower.
    config.stages = ("autoencoder", "clip", "encode", "dit", "evaluate", "samples")
    config.data.builder_config = "64"  # Shapes at 64x64: 8x more pixels than latents here.

    config.autoencoder = base_autoencoder.get_config(arg)  # Stage 1: the KL autoencoder.
    config.autoencoder.data = config.data  # The same object: overrides reach every stage.
    config.autoencoder.seed = config.get_ref("seed")
    # Three levels (64 -> 16: f = 4) and 4 latent channels (SD's): 16x16x4 latents, 12x fewer
    # values than the image, which a DiT of 64 tokens (patch 2) reads.
    config.autoencoder.model.block_out_channels = (16, 32, 64)
    config.autoencoder.model.latent_channels = 4
    # 3000 steps: the oracle reads 99.2 % of reconstructed `test` shapes right (2000: 97.5 %,
    # small stars rounded into circles), and the DiT on these latents draws as well or better
    # (docs/experiments/2026-12-08-shapes-latent-autoencoder-3000.md).
    config.autoencoder.training.num_steps = 3000

    # Stage 2 is CLIP, as in configs/shapes.py.
    config.encode = ml_collections.ConfigDict()  # Stage 3: encode.py into WORKDIR/latents.
    config.encode.batch_size = 64  # Images per encoder call.
    config.encode.examples_per_shard = 4096  # Examples per file: the unit of resumption.
    # Also store each caption's features under the DiT's frozen text tower (the CLIP stage's;
    # with its word embeddings, which the DiT's word_conditioning reads): encode.py
    # --text_encoder. The DiT's step then reads them instead of running the tower, which gives
    # the same losses (tests/test_text_features.py) for the tower's forward once per record
    # instead of once per step. False: latents only, the tower in the DiT's step.
    config.encode.text_features = True

    # Stage 4: the DiT on 16x16x4 latents. Patch 2 gives the 64 tokens of the pixel default's
    # 32x32 images at patch 4, each of 16 values: a latent token is cheap to carry, so the DiT
    # predicts the velocity, as latent DiTs do.
    config.dit.model.patch_size = 2
    config.dit.diffusion.flow_prediction_type = "flow_velocity"
    config.dit.diffusion.flow_loss_space = "prediction"

    # Evaluation and the grid sample with noise (stochastic Euler, eta 1, 32 steps) and guide
    # only below t = 0.7, as Kynkaanniemi et al. 2024: the deterministic Euler 8 of
    # configs/shapes.py drew the backgrounds that captions leave open 0.25 in total variation
    # from the data's (this DiT: 0.05 this way, guidance 1 or 3 alike), and guidance at every
    # step cut the per-caption diversity to 0.62 of the data's
    # (docs/experiments/2026-12-07-shapes-latent-sampling.md).
    for section in (config.evaluate, config.samples):
        section.eta = 1.0
        section.guidance_interval = "0,0.7"
    config.evaluate.samplers = "euler_stochastic:32"
    config.samples.sampler = "euler_stochastic"
    config.samples.steps = 32

    if arg == "runlocal":  # every stage a few steps (base_autoencoder's and shapes.py's)
        config.autoencoder.training.num_steps = base_autoencoder.get_config(arg).training.num_steps
        config.autoencoder.training.eval_every = 0
        config.encode.batch_size = 16
    return config
