"""Text-to-video in miniature (`make train CONFIG=configs/moving_shapes.py`): CLIP on clips, then
a video DiT (Wan 2.1's shape) on its frozen text tower, on the embedded moving_shapes dataset.

Everything runs on clips the project generates itself (8 frames of 32x32), on a 2-core CPU. Each
stage writes into its own subdirectory of --workdir and resumes when rerun.
"""

import ml_collections

from configs import base_clip, base_video_dit, common

# `--config=configs/moving_shapes.py:runlocal` shrinks every stage to a seconds-long smoke run.
ARGS = ("runlocal",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = "pipeline"  # Runs the stages below in order, each in WORKDIR/<stage>.
    config.stages = ("clip", "video_dit")  # Text encoder, then the video DiT on it.
    config.seed = 0  # The one seed of the run, shared by all stages.
    config.data = common.data_config()  # One dataset for all stages.
    config.data.name = "moving_shapes"  # Generated under data_dir when missing.
    config.data.builder_config = "32_8"  # resolution_frames: 8 frames of 32x32.
    config.data.image_key = "video"  # The uint8 (T, H, W, 3) clip feature.
    config.data.num_train_examples = 20_000  # Clips of the train split.
    config.data.num_eval_examples = 1_000  # Clips of test and of test_unseen.
    config.tokenizer = common.tokenizer_config()  # One tokenizer for all stages.
    # The longest moving_shapes caption is 22 tokens (start and end included) under the BPE
    # trained on the train split; train.py warns if a context cuts captions.
    config.tokenizer.context_length = 24

    # Stage 1: contrastive text and image towers; the image tower sees each clip's first and
    # last frames on its channels (config.clip.model.video_frames).
    config.clip = base_clip.get_config(arg)
    config.video_dit = base_video_dit.get_config(arg)  # Stage 2: on the frozen text tower.
    for stage in (config.clip, config.video_dit):
        # The same objects, so an override of config.data.* reaches every stage.
        stage.data = config.data
        stage.tokenizer = config.tokenizer
        stage.seed = config.get_ref("seed")
        stage.training.eval_every = 0  # Clip evaluation is a later stage's work.
        stage.optimizer.name = "muon"  # As configs/shapes.py: more learnt per step on this CPU.
        stage.optimizer.learning_rate = 2e-3
    config.clip.model.vision_stem = "conv"  # Edges across patch borders (configs/shapes.py).
    config.clip.training.num_steps = 300
    # 8 frames of 32x32 in (2, 4, 4) patches: 4 x 8 x 8 = 256 tokens a clip. Measured on this
    # shared 2-core CPU (2026-12-06, other jobs running): 0.9 to 1.4 s a step of 16 clips, so
    # 1000 steps take 15 to 25 minutes (CLIP's 300 steps: 2 to 6). Patches of (2, 8, 8) with
    # x-prediction (configs/shapes.py's choice for images) ran 3.6x more clips a second, but are
    # untested on clips. Sized, not tuned.
    config.video_dit.model.patch_size = (2, 4, 4)
    config.video_dit.training.num_steps = 1000
    config.video_dit.training.global_batch_size = 16
    config.video_dit.optimizer.schedule = "constant"  # Far from converged: every step at full rate.
    config.video_dit.optimizer.warmup_steps = 30

    if arg == "runlocal":
        config.data.num_train_examples = 500
        config.data.num_eval_examples = 50
        config.tokenizer.vocab_size = 512
        for stage in (config.clip, config.video_dit):
            stage.training.num_steps = 10
            stage.training.log_every = 2
            stage.training.checkpoint_every = 5
            stage.training.global_batch_size = 8
            stage.optimizer.warmup_steps = 2
        config.clip.model.vision_stem = "patch"
        config.video_dit.model.patch_size = (2, 8, 8)
    return config
