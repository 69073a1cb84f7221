"""DiT-XL/2, class-conditional, on ImageNet 256x256 as Stable Diffusion VAE latents (TPU pod).

The paper's setting (Peebles & Xie 2023, sec. 5): 32x32x4 latents, batch 256, AdamW at a constant
1e-4 without weight decay or warmup, EMA 0.9999, 1000-step linear DDPM schedule, epsilon
prediction, label dropout 0.1 for classifier-free guidance. Not reproduced: the learned variance
(learn_sigma with the VLB term; our DDPM loss is the simple epsilon MSE).

Trains with train.py on ImageNet encoded by encode.py with the Stable Diffusion VAE (a diffusers
AutoencoderKL directory, whose scaling_factor 0.18215 normalises the latents): prepare imagenet2012
as array_record at 256x256 (centre crops; encode.py needs one image size), then

    encode.py --autoencoder=SD_VAE_DIR --config=configs/dit_xl2_imagenet.py \
        --config.data.name=imagenet2012 --config.data.data_dir=IMAGES --output_dir=LATENTS
    train.py --config=configs/dit_xl2_imagenet.py --config.data.data_dir=LATENTS --workdir=...

which reads `imagenet2012_latents` (32x32x4 posteriors, a fresh draw per step, and the 1000-way
ClassLabel "label"); sample.py decodes with the same VAE.
`train.py --config=configs/dit_xl2_imagenet.py --aot_topology=v5p:2x2x1` compiles its real train
step and sampling program (config.autoencoder's VAE decoder included) for a TPU slice and reports
memory and cost, with no data (docs/scaling.md).
`:runlocal` is the same recipe (DDPM, epsilon, label dropout, scanned blocks, FSDP) shrunk to a
tiny DiT on the embedded shapes at 16x16, class = shape, for a laptop or a test.
"""

import ml_collections

from configs import base_dit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_dit.get_config(arg)

    config.data.name = "imagenet2012_latents"  # encode.py's output for imagenet2012.
    config.data.builder_config = None  # encode.py's datasets have no builder config.
    config.data.caption_key = None  # Class-conditional: no captions.
    config.data.label_key = "label"  # ClassLabel feature with the 1000 ImageNet classes.
    config.data.image_size = 32  # Latent side (256 / 8, the VAE's downsampling factor).

    config.model.variant = "DiT-XL/2"  # 28 blocks, width 1152, 16 heads, patch 2 (675M params).
    config.model.num_classes = 1000  # Class-conditional (row 1000 is the null class).
    config.model.in_channels = 4  # SD VAE latent channels.
    config.model.dtype = "bfloat16"  # bf16 matmuls on the MXU; parameters stay float32.
    config.model.remat = "none"  # Activations of batch 256 x 256 tokens fit; remat costs ~1/3.
    config.model.scan_layers = True  # One compiled block: compile time independent of depth.
    config.model.attention_impl = "xla"  # 256 tokens: the einsum softmax is cheap.

    # The VAE of the latents: sample.py decodes the DiT's samples with it, in the sampling
    # program. Only its shapes are read here (`--aot_topology` compiles that program with them);
    # encode.py's --autoencoder gives the weights, which latents.json names for sample.py.
    config.autoencoder = ml_collections.ConfigDict()
    config.autoencoder.variant = "SD"  # Stable Diffusion's VAE: 4 channels, 8x (84M params).

    config.diffusion.objective = "ddpm"  # The paper's discrete VP diffusion.
    config.diffusion.prediction_type = "epsilon"  # The paper predicts the noise.
    config.diffusion.schedule = "linear"  # betas 1e-4 .. 0.02 (ADM / DiT).
    config.diffusion.num_timesteps = 1000  # T = 1000.
    config.diffusion.cond_dropout = 0.1  # Label dropout of DiT, for classifier-free guidance.

    config.sampling.sampler = "ddpm"  # The paper samples with 250 DDPM steps.
    config.sampling.steps = 250  # Denoising steps of the paper's FID evaluations.
    config.sampling.guidance_scale = 1.5  # cfg 1.5: the paper's best FID-50K (2.27).
    config.sampling.prompts = ()  # Class-conditional: sample grids use class ids.

    config.optimizer.learning_rate = 1e-4  # Constant 1e-4 (paper).
    config.optimizer.schedule = "constant"  # No decay.
    config.optimizer.warmup_steps = 0  # No warmup.
    config.optimizer.weight_decay = 0.0  # No weight decay.
    config.optimizer.grad_clip_norm = 0.0  # No clipping.

    config.training.global_batch_size = 256  # Paper's batch.
    config.training.num_steps = 400_000  # The paper's ablations (the final XL/2 ran 7M steps).
    config.training.ema_decay = 0.9999  # Paper's EMA.
    config.training.log_every = 100  # Steps between metric logs.
    config.training.checkpoint_every = 10_000  # Steps between checkpoints.

    config.mesh.data = 1  # Pure data parallelism would replicate 11 GB of state per chip.
    config.mesh.fsdp = -1  # ZeRO-3 over every chip: params, Adam moments and EMA sharded.
    config.mesh.tensor = 1  # Width 1152 is too narrow for tensor parallelism to pay.

    if arg == "runlocal":  # The recipe on shapes (pixels, or their latents), a tiny DiT.
        config.data.name = "shapes"
        config.data.builder_config = "16"
        config.data.image_key = "image"
        config.data.label_key = "shape"  # 5 classes.
        config.data.image_size = 16
        config.data.num_train_examples = 2_000
        config.data.num_eval_examples = 200
        config.model.variant = "tiny"
        config.model.num_classes = 5
        config.model.in_channels = None  # The data's: 3 for shapes, 4 for its SD-VAE latents.
        config.model.dtype = "float32"
        config.sampling.steps = 10
        config.training.global_batch_size = 16
        config.training.num_steps = 20
        config.training.log_every = 5
        config.training.checkpoint_every = 10
        config.training.ema_decay = 0.999
    return config
