"""Config sections shared by every model family; recipes call these and override fields."""

import ml_collections
from ml_collections.config_dict import placeholder

from diffusion import sharding


def data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "shapes"  # TFDS dataset name; "shapes" is the embedded captioned-shapes builder.
    c.builder_config = placeholder(str)  # TFDS builder config, e.g. "32" (shapes resolution).
    c.data_dir = "data"  # TFDS data directory; the shapes builder is generated here when missing.
    c.train_split = "train"  # Split used for training.
    c.eval_splits = ("test", "test_unseen")  # Held-out splits for evaluation.
    c.image_key = "image"  # Feature holding the uint8 HxWx3 image.
    c.caption_key = "caption"  # Feature holding the caption text (or None to use a label).
    c.label_key = placeholder(str)  # ClassLabel feature used with caption_template instead.
    c.caption_template = placeholder(str)  # e.g. "a photo of a {label}" (fields in braces).
    # Class-conditional DiT: the ClassLabel features whose combination is the class, numbered in
    # mixed radix, first feature most significant (diffusion/data/classes.py); () = (label_key,).
    c.class_features = ()
    c.where = ""  # Record filter on ClassLabels, "key=name,key=name": every condition must hold.
    c.num_train_examples = 100_000  # Shapes only: examples generated for the train split.
    c.num_eval_examples = 2_000  # Shapes only: examples of each held-out split.
    c.worker_count = 0  # grain worker processes (0: decode in the main process).
    return c


def tokenizer_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.path = placeholder(str)  # AutoTokenizer name or directory; None: train a BPE on captions.
    c.vocab_size = 1024  # Vocabulary of the BPE trained on the dataset's captions.
    c.context_length = 32  # Tokens per caption, start and end tokens included.
    return c


def mesh_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = -1  # Devices along the pure data-parallel axis (-1: all that remain).
    c.fsdp = 1  # Devices along the axis that shards parameters and the batch (ZeRO-3 style).
    # Devices along the sequence-parallel axis, which splits the tokens of activations; attention
    # over split tokens: model.attention_impl='ulysses' (heads per tensor device divisible by this
    # size) or 'ring'.
    c.sequence = 1
    c.tensor = 1  # Devices along the tensor-parallel axis (heads and MLP hidden units).
    c.dcn_data = 1  # Slices along the data axis over the data-center network (multi-slice).
    # (logical axis name, mesh axes) pairs, first match wins; every name in
    # sharding.LOGICAL_AXIS_NAMES needs one (e.g. ('heads', None) turns off tensor-parallel heads).
    c.rules = sharding.DEFAULT_RULES
    return c


def optimizer_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "adamw"  # "adamw", or "muon": Muon on hidden matrices, AdamW on the rest.
    c.learning_rate = 1e-3  # Peak learning rate (Muon's updates are scaled to AdamW's RMS).
    c.schedule = "cosine"  # "cosine" (decay to end_lr_fraction) or "constant" after warmup.
    c.warmup_steps = 100  # Linear warmup from 0 to the peak learning rate.
    c.end_lr_fraction = 0.0  # Final learning rate as a fraction of the peak (cosine only).
    c.weight_decay = 0.0  # Decoupled weight decay on matrices (not norms, biases, embeddings).
    c.b1 = 0.9  # AdamW first-moment decay.
    c.b2 = 0.999  # AdamW second-moment decay.
    c.eps = 1e-8  # AdamW epsilon.
    c.grad_clip_norm = 1.0  # Global-norm gradient clipping (0 disables it).
    c.accumulation_steps = 1  # Micro-batches per update (optax.MultiSteps) when > 1.
    # Muon's Newton-Schulz iterations (5 in its reference; each costs matmuls of every hidden
    # matrix, a large part of a tiny model's step).
    c.muon_ns_steps = 5
    return c


def training_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.global_batch_size = 64  # Examples per update over all devices and processes.
    c.num_steps = 1000  # Updates to train for.
    c.log_every = 50  # Steps between metric logs (hosts synchronise only here).
    c.eval_every = 500  # Steps between held-out checks (CLIP retrieval, DiT sample grid); 0: off.
    c.eval_examples = 256  # CLIP: held-out captions the retrieval check ranks.
    c.checkpoint_every = 500  # Steps between checkpoints.
    c.keep_checkpoints = 2  # Most recent checkpoints kept.
    c.keep_period = 0  # Also keep every K-th step forever (0: none).
    c.ema_decay = 0.999  # EMA of parameters used for evaluation and sampling (0 disables it).
    c.nan_policy = "stop"  # On a non-finite loss or gradient: "stop" or "skip" the update.
    return c


def add_sampler_options(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds sample.py's sampler options to a pipeline's `evaluate` or `samples` section: they
    apply to every setting it samples, beside its sampler and steps."""
    section.eta = 0.0  # DDIM / stochastic-Euler noise (euler_stochastic, ddim; 0: deterministic).
    section.shift = placeholder(float)  # Flow time shift of the sampling grid (None: training's).
    section.guidance_rescale = 0.0  # Guidance rescale phi (Lin et al. 2023).
    # "T_LO,T_HI": guidance only at times in [T_LO, T_HI] (flow: 1 is pure noise), the
    # conditional model elsewhere (Kynkaanniemi et al. 2024); "" guides every step.
    section.guidance_interval = ""
    return section
