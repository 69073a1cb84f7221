"""Latent text-to-video on the embedded moving_shapes clips, as Wan 2.1 is built, in miniature: a
per-frame autoencoder, CLIP on the clips, the clips encoded into latent clips, a video DiT on
those, then evaluate.py and the clip grid on the decoded samples.

    make train CONFIG=configs/moving_shapes_latent.py  # -> runs/moving_shapes_latent/...

Wan's autoencoder is causal in time (4x fewer latent frames); this one encodes each frame on its
own (as the image autoencoder of configs/shapes_latent.py does), so a clip of 8 frames of 32x32
becomes 8 latent frames of 8x8x4, 12x fewer values than its pixels. Each stage writes its own
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
    # Three levels (32 -> 8: f = 4) and 4 latent channels, as configs/shapes_latent.py: a latent
    # frame of 8x8x4, which a DiT reads in patches of 2 frames x 2 x 2.
    config.autoencoder.model.block_out_channels = (16, 32, 64)
    config.autoencoder.model.latent_channels = 4
    # Clips per step: each is 8 frames, so 2 clips are 16 images (base_autoencoder: 8 images).
    config.autoencoder.training.global_batch_size = 2
    config.autoencoder.training.num_steps = 3000
    config.autoencoder.training.eval_every = 0  # The evaluate stage measures it.

    # Stage 2 is CLIP on the pixel clips, as configs/moving_shapes.py.
    config.encode = ml_collections.ConfigDict()  # Stage 3: encode.py into WORKDIR/latents.
    config.encode.batch_size = 16  # Clips per encoder call (128 frames).
    config.encode.examples_per_shard = 4096  # Clips per file: the unit of resumption.
    # The video DiT runs its text tower in its step (only the image DiT reads cached features).
    config.encode.text_features = False

    # Stage 4: the video DiT on 8x8x8x4 latent clips. Patches of (2, 2, 2) give the 64 tokens of
    # the pixel recipe's (2, 8, 8) patches, each of 32 values instead of 384. The DiT predicts
    # the velocity, as the latent image DiT of configs/shapes_latent.py.
    config.video_dit.model.patch_size = (2, 2, 2)
    config.video_dit.diffusion.flow_prediction_type = "flow_velocity"
    config.video_dit.diffusion.flow_loss_space = "prediction"

    if arg == "runlocal":  # every stage a few steps (base_autoencoder's and moving_shapes.py's)
        config.autoencoder.training.num_steps = 10
        config.autoencoder.training.checkpoint_every = 5
        config.encode.batch_size = 8
        config.video_dit.model.patch_size = (2, 2, 2)
    return config
