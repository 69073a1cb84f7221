"""A class-conditional DiT on the embedded shapes (32x32): class = colour x shape, 40 classes.

No text encoder and no tokenizer: the DiT embeds the class id (DiT's LabelEmbedder, the null class
40 standing for "no class"), and classifier-free guidance uses the null class as the
unconditional input. README ("Class-conditional DiT") has its measured time and accuracy.

    make train CONFIG=configs/shapes_class.py    # -> runs/shapes_class
    .venv/bin/python sample.py --checkpoint=runs/shapes_class --class_labels="red circle,7" ...
    .venv/bin/python evaluate.py --checkpoint=runs/shapes_class --output_dir=... --splits=test
"""

import ml_collections

from configs import base_dit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_dit.get_config(arg)
    config.data.builder_config = "32"  # 32x32 shapes.
    config.data.class_features = ("color", "shape")  # Class = colour x shape: "red circle" = 0.
    config.data.num_train_examples = 100_000  # The default train split (about 20 s to generate).

    config.model.num_classes = 40  # 8 colours x 5 shapes (the null class is row 40).
    config.model.variant = "tiny"  # Width 128, depth 4, 4 heads.
    # Patch 8 (16 tokens) with x-prediction and its velocity loss, as configs/shapes.py: cheap
    # steps, and a token of width 128 can carry a clean 8x8x3 patch but not its noise.
    config.model.patch_size = 8
    config.diffusion.flow_prediction_type = "sample"  # The DiT predicts x0 ...
    config.diffusion.flow_loss_space = "velocity"  # ... with the MSE on the velocity it implies.
    config.diffusion.shift = 3.0  # Times toward noise, where the class decides the image.
    config.diffusion.cond_dropout = 0.1  # Label dropout to the null class (DiT paper).

    config.optimizer.name = "muon"  # Muon on hidden matrices, AdamW on the rest.
    config.optimizer.learning_rate = 2e-3  # Peak learning rate.
    config.optimizer.schedule = "constant"  # Far from converged: every step at the full rate.
    config.optimizer.warmup_steps = 30  # Short warmup.
    # Updates. The class accuracy grows slowly with steps (0.29, 0.54, 0.76, 0.91, 0.94 at 2k,
    # 4k, 6k, 8k, 10k; 0.975 at 16k on 512 test classes, guidance 3): the DiT must place and draw
    # a shape that no prompt positions. Batch 128, learning rate 4e-3, shift 1 or a 3x3 output
    # convolution did no better at 2000 steps (docs/experiments/2026-12-06-*class*).
    config.training.num_steps = 16_000
    config.training.global_batch_size = 64  # Examples per update.
    config.training.eval_every = 0  # evaluate.py measures the run (oracle accuracy per class).
    config.training.checkpoint_every = 1000  # Steps between checkpoints.

    config.sampling.guidance_scale = 3.0  # Classifier-free guidance against the null class.
    config.sampling.prompts = ()  # Class-conditional: no prompts.

    if arg == "runlocal":
        config.data.num_train_examples = 2_000
        config.training.num_steps = 20
        config.training.checkpoint_every = 10
        config.optimizer.warmup_steps = 5
    return config
