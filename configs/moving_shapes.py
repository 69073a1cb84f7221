"""Text-to-video in miniature (`make train CONFIG=configs/moving_shapes.py`): CLIP on clips, then
a video DiT (Wan 2.1's shape) on its frozen text tower, on the embedded moving_shapes dataset.

Everything runs on clips the project generates itself (8 frames of 32x32), on a 2-core CPU. Each
stage writes into its own subdirectory of --workdir and resumes when rerun.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import base_clip, base_video_dit, common

# `--config=configs/moving_shapes.py:runlocal` shrinks every stage to a seconds-long smoke run.
ARGS = ("runlocal",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = "pipeline"  # Runs the stages below in order, each in WORKDIR/<stage>.
    # Text encoder, the video DiT on it, evaluate.py on both, the README's clip grid.
    config.stages = ("clip", "video_dit", "evaluate", "samples")
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
    # 8 frames of 32x32 in (2, 8, 8) patches: 4 x 4 x 4 = 64 tokens a clip, four times the clips
    # per second of (2, 4, 4) patches, spent on more steps and clips; the step count fills the
    # 30-minute end-to-end budget of this 2-core CPU (docs/experiments/), it is not tuned.
    config.video_dit.model.patch_size = (2, 8, 8)
    config.video_dit.training.num_steps = 3400
    config.video_dit.training.global_batch_size = 32
    # As configs/shapes.py: the DiT predicts the clean clip, the loss is on the velocity it
    # implies, and the time shift is 3 (colour 0.63 -> 0.84 at guidance 3 on test_unseen against
    # Wan's velocity prediction and shift 5 at equal steps, docs/experiments/).
    config.video_dit.diffusion.flow_prediction_type = "sample"
    config.video_dit.diffusion.flow_loss_space = "velocity"
    config.video_dit.diffusion.shift = 3.0
    config.video_dit.optimizer.schedule = "constant"  # Far from converged: every step at full rate.
    config.video_dit.optimizer.warmup_steps = 30

    config.evaluate = ml_collections.ConfigDict()  # Stage 3: evaluate.py on both runs.
    config.evaluate.num_samples = 128  # Captions (and sampled clips) per held-out split.
    config.evaluate.splits = ("test", "test_unseen")  # test_unseen: held-out (shape, motion).
    config.evaluate.guidance_scales = (1.0, 3.0)  # The guidance sweep.
    config.evaluate.samplers = "euler:10"  # NAME:STEPS,... of the sweep.
    config.evaluate.batch_size = 32  # Clips per sampling program.
    config.evaluate.negative_prompt = ""  # The negative-prompt and diversity checks read
    config.evaluate.negative_color = ""  # images; the video evaluation has neither.
    config.evaluate.diversity_captions = 0
    config.evaluate.diversity_samples = 8
    common.add_sampler_options(config.evaluate)

    config.samples = ml_collections.ConfigDict()  # Stage 4: the clip grid of the README.
    config.samples.prompts = (  # Seen and held-out (shape, motion) pairs (data/moving_shapes.py).
        "a small red circle moves from left to right slowly on a black background",
        "a large blue square grows quickly on a white background",
        "a large green star moves up quickly on a black background",
        "a small yellow circle moves up slowly on a gray background",  # unseen: circle, up
        "a large purple square moves from right to left quickly on a black background",  # unseen
        "a large orange triangle grows slowly on a white background",  # unseen: triangle, grow
    )
    config.samples.negative_examples = ()  # (prompt, negative prompt) pairs.
    config.samples.num_per_prompt = 2  # Seeds 0..n-1 per prompt (one strip row each).
    config.samples.sampler = "euler"  # Sampler of the grid.
    config.samples.steps = 20  # Its steps.
    config.samples.guidance_scale = placeholder(float)  # None: the evaluation's best scale.
    config.samples.batch_size = 12  # Clips per sampling program.
    common.add_sampler_options(config.samples)

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
        config.evaluate.num_samples = 8
        config.evaluate.samplers = "euler:4"
        config.evaluate.batch_size = 8
        config.samples.prompts = config.samples.prompts[:2]
        config.samples.num_per_prompt = 1
        config.samples.steps = 4
    return config
