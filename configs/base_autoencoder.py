"""Base recipe of the autoencoder family: the KL autoencoder of latent diffusion (first stage),
trained on images alone (no captions, no tokenizer).

Recipes import this and override fields; arg "runlocal" shrinks it to a laptop run.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = "autoencoder"  # Model family trained by train.py.
    config.seed = 0  # The one seed; keys are split by purpose and folded with the step.
    config.data = common.data_config()
    config.data.builder_config = "32"  # Shapes at 32x32 ("16", "32" or "64").
    config.mesh = common.mesh_config()
    config.optimizer = common.optimizer_config()
    config.training = common.training_config()

    config.model = ml_collections.ConfigDict()
    config.model.variant = "tiny"  # Row of diffusion.models.autoencoder's variant table.
    # Latent channels: 16 as SD3 and Flux (4 in SD 1/2); at 32x32, 8x8x16 latents. Against 4 and
    # 8: +1.1 and +0.7 dB PSNR after 300 steps here.
    config.model.latent_channels = 16
    # Width of each level; n levels downsample 2^(n-1) times (here 4: 32x32 -> 8x8 latents).
    # Narrow at full resolution, where a 2-core CPU spends most of a step.
    config.model.block_out_channels = (16, 32, 64)
    config.model.layers_per_block = 1  # ResnetBlocks per encoder level (the decoder has one more).
    config.model.norm_num_groups = 4  # GroupNorm groups; must divide every width.
    config.model.mid_block_add_attention = False  # Attention in the middle blocks (costly on CPU).
    config.model.use_quant_conv = placeholder(bool)  # 1x1 conv on the moments; None: variant's.
    config.model.use_post_quant_conv = placeholder(bool)  # 1x1 conv on latents; None: variant's.
    config.model.dtype = "float32"  # Compute dtype ("bfloat16" on TPU); parameters stay float32.
    config.model.attention_impl = "xla"  # "xla" or "fused" (jax.nn.dot_product_attention).

    config.loss = ml_collections.ConfigDict()
    # "l2" (the error PSNR measures; sd-vae-ft-mse's pixel term) or "l1" (LDM's, which pairs it
    # with LPIPS and a GAN; alone it learns slower here: 19.5 against 23.5 dB after 300 steps).
    config.loss.reconstruction = "l2"
    # Weight of KL(q(z|x) || N(0, I)) against the reconstruction error summed over an image's
    # pixels, as in LDM (1e-6 for its f=4/8 KL models): latents stay near N(0, I) in scale without
    # blurring the reconstructions.
    config.loss.kl_weight = 1e-6
    # On a dataset of clips: the frames of each clip a step trains on, drawn at random (0: all).
    config.loss.frames_per_clip = 0

    # Small batches, many updates: at the same images seen, batch 8 reaches 26.6 dB where batch 32
    # reaches 24.6 (a step's cost is linear in the batch on this CPU).
    config.training.global_batch_size = 8
    config.training.num_steps = 5000
    config.training.checkpoint_every = 1000
    config.training.eval_every = 1000  # PSNR / SSIM of held-out reconstructions (eval/...).
    config.training.eval_examples = 256  # Held-out images those are measured on.

    if arg == "runlocal":
        config.training.num_steps = 20
        config.optimizer.warmup_steps = 5
        config.training.log_every = 5
        config.training.checkpoint_every = 10
        config.training.eval_every = 10
        config.training.global_batch_size = 16
        config.data.num_train_examples = 2_000
    return config
