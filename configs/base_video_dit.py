"""Base recipe of the video DiT family: a Wan-2.1-style DiT over clips (or images as one-frame
clips), flow matching, conditioned on a frozen CLIP text tower's token states.

Recipes import this and override fields; arg "runlocal" shrinks it to a laptop run.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common
from diffusion.models import lora


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = "video_dit"  # Model family trained by train.py.
    config.seed = 0  # The one seed; keys are split by purpose and folded with the step.
    config.data = common.data_config()
    config.data.name = "moving_shapes"  # The embedded clips, generated when missing.
    config.data.builder_config = "32_8"  # resolution_frames: 8 frames of 32x32.
    config.data.image_key = "video"  # The uint8 (T, H, W, 3) clip feature.
    config.data.num_train_examples = 20_000  # Clips generated for the train split.
    config.data.num_eval_examples = 1_000  # Clips of each held-out split.
    config.tokenizer = common.tokenizer_config()
    config.mesh = common.mesh_config()
    config.optimizer = common.optimizer_config()
    config.training = common.training_config()
    config.training.eval_every = 0  # No check during training: clips are evaluated after it.

    config.model = ml_collections.ConfigDict()
    config.model.variant = "tiny"  # Row of diffusion.models.video_dit's variant table.
    # (frames, rows, columns) of a 3-D patch; None: the variant's. Images need frames = 1.
    config.model.patch_size = placeholder(tuple)
    config.model.width = placeholder(int)  # Hidden size D; None: the variant's.
    config.model.depth = placeholder(int)  # Number of blocks; None: the variant's.
    config.model.num_heads = placeholder(int)  # Attention heads; None: the variant's.
    config.model.ffn_dim = placeholder(int)  # Feed-forward hidden units; None: the variant's.
    # Also cross-attend to the text tower's word embeddings (VideoDiTConfig.word_conditioning);
    # None: off, or the pretrained weights' choice (config.model.weights).
    config.model.word_conditioning = placeholder(bool)
    # "patch" (Wan's linear 3-D patches) or "conv" (stride-2 convolutions on each frame first,
    # VideoDiTConfig.input_stem); None: the variant's, or the pretrained weights' choice.
    config.model.input_stem = placeholder(str)
    config.model.dtype = "float32"  # Compute dtype ("bfloat16" on TPU); parameters stay float32.
    config.model.remat = "none"  # Rematerialisation policy of the blocks.
    config.model.scan_layers = (
        False  # Scan over the block stack (compile time independent of depth).
    )
    # Pretrained weights to start from: a video_dit run directory or a diffusers
    # WanTransformer3DModel directory, whose config then sets the sizes; None: random init.
    config.model.weights = placeholder(str)

    # Low-rank adapters (LoRA) on the pretrained weights, trained alone (the base frozen) and
    # written as lora.safetensors (diffusers' Wan LoRA format) when the run finishes.
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 0  # Rank r of every adapter; 0: no adapters, the whole model trains.
    config.lora.alpha = placeholder(float)  # Updates scale by alpha / r; None: alpha = r.
    config.lora.targets = tuple(lora.TARGETS)  # Projections adapted (diffusion.models.lora).

    config.text_encoder = ml_collections.ConfigDict()
    config.text_encoder.checkpoint = placeholder(str)  # CLIP run dir (a pipeline: its clip stage).

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.objective = "flow"  # Rectified flow, as Wan 2.1 (the only one for video).
    # The DiT predicts "flow_velocity" (eps - x0, Wan) or "sample" (x0).
    config.diffusion.flow_prediction_type = "flow_velocity"
    # The MSE on what the DiT predicts ("prediction") or, for "sample", on the velocity it implies.
    config.diffusion.flow_loss_space = "prediction"
    config.diffusion.time_sampling = "logit_normal"  # "uniform" or "logit_normal".
    config.diffusion.logit_normal_mean = 0.0  # m of t = sigmoid(m + s n).
    config.diffusion.logit_normal_std = 1.0  # s of t = sigmoid(m + s n).
    config.diffusion.shift = 5.0  # Time shift s t / (1 + (s - 1) t): Wan 2.1's flow shift.
    config.diffusion.cond_dropout = 0.1  # Probability of the empty prompt, enabling guidance.

    config.sampling = (
        ml_collections.ConfigDict()
    )  # What sample.py and the samples stage default to.
    config.sampling.sampler = "euler"  # Any flow sampler; "unipc" is Wan 2.1's.
    config.sampling.steps = 20  # Denoising steps.
    config.sampling.guidance_scale = 5.0  # Classifier-free guidance scale: Wan 2.1's.

    if arg == "runlocal":
        config.training.num_steps = 20
        config.optimizer.warmup_steps = 5
        config.training.log_every = 5
        config.training.checkpoint_every = 10
        config.training.global_batch_size = 8
        config.data.num_train_examples = 500
        config.data.num_eval_examples = 50
        config.model.width = 64
        config.model.depth = 2
        config.model.ffn_dim = 128
        config.model.patch_size = (2, 8, 8)
    return config
