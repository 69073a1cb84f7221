"""The pipeline runner, the top layer: train.py's `train_and_evaluate`, multi-stage recipes, the
stages after training (evaluation, the prompt grid) and the periodic checks during training."""

from diffusion.pipeline.runner import run_pipeline, train_and_evaluate

__all__ = ["run_pipeline", "train_and_evaluate"]
