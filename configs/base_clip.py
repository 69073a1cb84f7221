"""Base recipe of the CLIP family: a ViT image tower and a causal text tower, contrastive loss.

Recipes import this and override fields; arg "runlocal" shrinks it to a laptop run.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = "clip"  # Model family trained by train.py: "clip" or "dit".
    config.seed = 0  # The one seed; keys are split by purpose and folded with the step.
    config.data = common.data_config()
    config.tokenizer = common.tokenizer_config()
    config.mesh = common.mesh_config()
    config.optimizer = common.optimizer_config()
    config.training = common.training_config()

    config.model = ml_collections.ConfigDict()
    config.model.variant = "tiny"  # Row of diffusion.models.clip's variant table.
    config.model.patch_size = placeholder(int)  # Patch side (image tower); None: the variant's.
    config.model.vision_width = placeholder(int)  # Width of the image tower; None: the variant's.
    config.model.vision_depth = placeholder(int)  # Blocks of the image tower; None: the variant's.
    config.model.vision_stem = placeholder(str)  # "patch" or "conv"; None: the variant's.
    # A dataset of clips: frames the image tower sees, evenly spaced from the first to the last,
    # stacked on the channel axis (diffusion/families/clip.py says why); images ignore it.
    config.model.video_frames = 2
    config.model.text_width = placeholder(int)  # Width of the text tower; None: the variant's.
    config.model.text_depth = placeholder(int)  # Blocks of the text tower; None: the variant's.
    config.model.dtype = "float32"  # Compute dtype ("bfloat16" on TPU); parameters stay float32.
    config.model.remat = "none"  # Rematerialisation policy of the transformer blocks.
    config.model.scan_layers = (
        False  # Scan over the block stack (compile time independent of depth).
    )

    config.loss = ml_collections.ConfigDict()
    config.loss.kind = "softmax"  # "softmax" (CLIP) or "sigmoid" (SigLIP).
    config.loss.chunked = False  # Ring-of-ppermute loss that never forms the global logit matrix.
    # Captions with identical token ids are positives of each other (labelled datasets whose
    # captions are class names); a batch of unique captions gets bitwise the same loss.
    config.loss.multi_positive = True
    # ClassLabels for hard negatives: each record is batched with a twin differing in one of them.
    config.loss.hard_negative_attributes = ()
    # ClassLabels whose words are swapped in each caption to make one hard negative caption per
    # image (NegCLIP; the words must appear verbatim in the captions, as in the shapes data).
    config.loss.negative_caption_attributes = ()

    if arg == "runlocal":
        config.training.num_steps = 20
        config.optimizer.warmup_steps = 5
        config.training.log_every = 5
        config.training.checkpoint_every = 10
        config.training.global_batch_size = 16
        config.data.num_train_examples = 2_000
    return config
