"""Latent text-to-video on the embedded moving_shapes clips, as Wan 2.1 is built, in miniature: a
per-frame autoencoder, CLIP on the clips, the clips encoded into latent clips, a video DiT on
those, then evaluate.py and the clip grid on the decoded samples.

    make train CONFIG=configs/moving_shapes_latent.py  # -> runs/moving_shapes_latent/...

Wan's autoencoder is causal in time (4x fewer latent frames); this one encodes each frame on its
own (as the image autoencoder of configs/shapes_latent.py does), so a clip of 8 frames of 32x32
becomes 8 latent frames of 16x16x4. Each stage writes its own
subdirectory of the work directory and resumes when rerun; the video DiT's run directory records
the autoencoder (latents.json), so sample.py and evaluate.py decode its samples to clips.
"""

import ml_collections

from configs import base_autoencoder, moving_shapes

ARGS = moving_shapes.ARGS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = moving_shapes.get_config(arg)
    config.stages = ("autoencoder", "clip", "encode", "video_dit", "evaluate", "samples")

    config.autoencoder = base_autoencoder.get_config(arg)  # Stage 1: on the frames of the clips.
    config.autoencoder.data = config.data  # The same object: overrides reach every stage.
    config.autoencoder.seed = config.get_ref("seed")
    # Two levels (32 -> 16: f = 2) and 4 latent channels: a latent frame of 16x16x4, 3x fewer
    # values than its pixels. f = 4 (three levels, 8x8x4) rounds the small shapes off: the oracle
    # read the shape of 0.48 of its reconstructed clips against 0.77 at f = 2
    # (docs/experiments/2026-12-07-moving-shapes-latent.md).
    config.autoencoder.model.block_out_channels = (16, 32)
    config.autoencoder.model.latent_channels = 4
    # One random frame of each of 8 clips a step: 8 scenes a step, as base_autoencoder's 8
    # images. All 8 frames of 2 clips (2 scenes a step) cost twice as much and learn less.
    config.autoencoder.training.global_batch_size = 8
    config.autoencoder.loss.frames_per_clip = 1
    config.autoencoder.training.num_steps = 3000
    config.autoencoder.training.eval_every = 0  # The evaluate stage measures it.

    # Stage 2 is CLIP on the pixel clips, as configs/moving_shapes.py.
    config.encode = ml_collections.ConfigDict()  # Stage 3: encode.py into WORKDIR/latents.
    config.encode.batch_size = 16  # Clips per encoder call (128 frames).
    config.encode.examples_per_shard = 4096  # Clips per file: the unit of resumption.
    # The video DiT runs its text tower in its step (only the image DiT reads cached features).
    config.encode.text_features = False

    # Stage 4: the video DiT on 8x16x16x4 latent clips. Patches of (2, 4, 4) give the 64 tokens
    # of the pixel recipe's (2, 8, 8) patches, each of 128 values instead of 384. The DiT
    # predicts the velocity, as the latent image DiT of configs/shapes_latent.py.
    config.video_dit.model.patch_size = (2, 4, 4)
    config.video_dit.diffusion.flow_prediction_type = "flow_velocity"
    config.video_dit.diffusion.flow_loss_space = "prediction"

    if arg == "runlocal":  # every stage a few steps (base_autoencoder's and moving_shapes.py's)
        config.autoencoder.training.num_steps = 10
        config.autoencoder.training.checkpoint_every = 5
        config.encode.batch_size = 8
    return config
