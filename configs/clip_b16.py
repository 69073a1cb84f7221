"""CLIP ViT-B/16 at batch 32k (TPU pod): OpenAI's recipe with the chunked contrastive loss.

Radford et al. 2021 (sec. 2.5 and table 21 hyper-parameters): batch 32768, AdamW (b2 0.98,
eps 1e-6), weight decay 0.2, cosine decay after 2000 warmup steps, 32 epochs of 400M pairs. The
data section names a web-scale captioned dataset that must be prepared as TFDS first; AOT needs
none (see docs/scaling.md).
"""

import ml_collections

from configs import base_clip


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_clip.get_config(arg)

    config.data.name = "laion400m"  # TFDS name of a prepared captioned image dataset.
    config.data.builder_config = None  # No builder config.
    config.data.image_size = 224  # Images resized to 224x224 (the variant's position table).

    config.tokenizer.path = "openai/clip-vit-base-patch16"  # CLIP's BPE (a local copy offline).
    config.tokenizer.vocab_size = 49408  # CLIP's vocabulary.
    config.tokenizer.context_length = 77  # CLIP's context.

    config.model.variant = "B/16"  # ViT-B/16 image tower, 12-layer 512-wide text tower.
    config.model.dtype = "bfloat16"  # bf16 matmuls on the MXU; parameters stay float32.
    config.model.remat = "full"  # Keep only block inputs: 32k x 197 tokens of activations.
    config.model.scan_layers = True  # One compiled block per tower.
    config.model.attention_impl = "xla"  # 197 / 77 tokens: the einsum softmax is cheap.

    config.loss.kind = "softmax"  # CLIP's symmetric InfoNCE.
    config.loss.chunked = True  # Ring of ppermutes: never forms the 32k x 32k logit matrix.

    config.optimizer.learning_rate = 5e-4  # Table 21, ViT-B/16.
    config.optimizer.schedule = "cosine"  # Cosine decay to 0.
    config.optimizer.warmup_steps = 2000  # Table 21.
    config.optimizer.weight_decay = 0.2  # Table 21 (matrices only).
    config.optimizer.b2 = 0.98  # Table 21: Adam beta2 for stability at large batch.
    config.optimizer.eps = 1e-6  # Table 21.
    config.optimizer.grad_clip_norm = 0.0  # OpenAI did not clip.

    config.training.global_batch_size = 32768  # Table 21.
    config.training.num_steps = 390_000  # 32 epochs of 400M pairs at 32k.
    config.training.ema_decay = 0.0  # CLIP keeps no EMA.
    config.training.log_every = 100  # Steps between metric logs.
    config.training.checkpoint_every = 5_000  # Steps between checkpoints.

    config.mesh.data = 1  # Every chip on fsdp: the batch and the parameters are sharded.
    config.mesh.fsdp = -1  # ZeRO-3 over every chip.
    config.mesh.tensor = 1  # Width 768: tensor parallelism would only add collectives.
    return config
