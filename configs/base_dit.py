"""Base recipe of the DiT family: a diffusion transformer conditioned on a frozen CLIP text tower.

Recipes import this and override fields; arg "runlocal" shrinks it to a laptop run.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = "dit"  # Model family trained by train.py: "clip" or "dit".
    config.seed = 0  # The one seed; keys are split by purpose and folded with the step.
    config.data = common.data_config()
    config.tokenizer = common.tokenizer_config()
    config.mesh = common.mesh_config()
    config.optimizer = common.optimizer_config()
    config.training = common.training_config()

    config.model = ml_collections.ConfigDict()
    config.model.variant = "tiny"  # Row of diffusion.models.dit's variant table (e.g. "S/2").
    config.model.patch_size = placeholder(int)  # Patch side; None: the variant's.
    config.model.width = placeholder(int)  # Hidden size D; None: the variant's.
    config.model.depth = placeholder(int)  # Number of DiT blocks; None: the variant's.
    config.model.num_heads = placeholder(int)  # Attention heads; None: the variant's.
    config.model.dtype = "float32"  # Compute dtype ("bfloat16" on TPU); parameters stay float32.
    config.model.remat = "none"  # Rematerialisation policy of the DiT blocks.
    # "xla", "fused" (jax.nn.dot_product_attention), or "ulysses" / "ring" (sequence parallel
    # over config.mesh.sequence; docs/scaling.md).
    config.model.attention_impl = "xla"
    config.model.scan_layers = (
        False  # Scan over the block stack (compile time independent of depth).
    )
    # Also condition on the text tower's word embeddings (DiTConfig.word_conditioning).
    config.model.word_conditioning = False
    # A 3x3 convolution after the patch decoder (U-ViT; DiTConfig.output_conv).
    config.model.output_conv = False
    config.model.input_stem = placeholder(str)  # "patch" or "conv" (ConvStem); None: the variant's.
    # > 0: class-conditional DiT on the classes of config.data.class_features (or label_key);
    # it must equal their number of classes. 0: text-conditional.
    config.model.num_classes = 0

    config.text_encoder = ml_collections.ConfigDict()
    config.text_encoder.checkpoint = placeholder(str)  # CLIP run dir of ours, or a HF CLIP dir.
    # Text-conditional: whether the dataset's records carry each caption's cached text features
    # (encode.py --text_encoder), so the train step runs no text tower. True or False: training
    # checks the dataset against it, and --aot_topology compiles that step; None: whatever the
    # dataset holds (--aot_topology, which has no dataset, then counts the tower in the step).
    config.data.cached_text = placeholder(bool)

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.objective = "flow"  # "flow" (rectified flow) or "ddpm" (discrete VP).
    config.diffusion.prediction_type = "epsilon"  # DDPM only: "epsilon", "v_prediction", "sample".
    # Flow only: the DiT predicts "flow_velocity" (eps - x0) or "sample" (x0).
    config.diffusion.flow_prediction_type = "flow_velocity"
    # Flow only: the MSE on what the DiT predicts ("prediction") or, for "sample", on the
    # velocity that x0_hat implies ("velocity": JiT's x-prediction with a v-loss).
    config.diffusion.flow_loss_space = "prediction"
    config.diffusion.schedule = "linear"  # DDPM only: "linear", "scaled_linear" or "cosine".
    config.diffusion.num_timesteps = 1000  # DDPM only: discrete training timesteps T.
    config.diffusion.zero_terminal_snr = False  # DDPM only: rescale betas to SNR(T) = 0.
    config.diffusion.time_sampling = "logit_normal"  # Flow only: "uniform" or "logit_normal".
    config.diffusion.logit_normal_mean = 0.0  # Flow only: m of t = sigmoid(m + s n).
    config.diffusion.logit_normal_std = 1.0  # Flow only: s of t = sigmoid(m + s n).
    config.diffusion.shift = 1.0  # Flow only: time shift s t / (1 + (s - 1) t) (SD3, Wan 2.1).
    config.diffusion.min_snr_gamma = 0.0  # DDPM only: min-SNR-gamma loss weighting (0: off).
    # Probability of the empty prompt, or of the null class (label dropout), enabling guidance.
    config.diffusion.cond_dropout = 0.1

    config.sampling = ml_collections.ConfigDict()
    config.sampling.sampler = "euler"  # "ddpm", "ddim", "euler", "heun", "dpmpp_2m" or "unipc".
    config.sampling.steps = 20  # Denoising steps.
    config.sampling.guidance_scale = 3.0  # Classifier-free guidance scale (1: no guidance).
    config.sampling.prompts = (  # Prompts of the periodic sample grid.
        "a large red circle in the center",
        "a small blue square in the top left corner",
    )

    if arg == "runlocal":
        config.training.num_steps = 20
        config.optimizer.warmup_steps = 5
        config.training.log_every = 5
        config.training.checkpoint_every = 10
        config.training.global_batch_size = 16
        config.data.num_train_examples = 2_000
    return config
