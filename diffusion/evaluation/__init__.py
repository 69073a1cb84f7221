"""Evaluation: the shapes attribute oracle, CLIP metrics, held-out examples, the evaluate.py
driver and its HTML report."""

from diffusion.evaluation.checks import negative_check_scale
from diffusion.evaluation.clip_metrics import (
    POSITION_PHRASES,
    ClipEncoder,
    between_class_variance_share,
    class_prompts,
    clip_score,
    ensemble_class_embeddings,
    frechet_distance,
    frechet_distance_of_features,
    label_class_prompts,
    linear_probe_accuracy,
    zero_shot_accuracy,
    zero_shot_top_k_accuracy,
)
from diffusion.evaluation.evaluator import (
    EvaluationOptions,
    evaluate_checkpoint,
    parse_guidance_scales,
    parse_samplers,
)
from diffusion.evaluation.held_out import SplitExamples, load_split_examples
from diffusion.evaluation.shapes_oracle import (
    ATTRIBUTES,
    PROMPTED_ATTRIBUTES,
    VOCABULARIES,
    OracleReading,
    attribute_accuracy,
    misreads,
    read_attributes,
)

__all__ = [
    "ATTRIBUTES",
    "POSITION_PHRASES",
    "PROMPTED_ATTRIBUTES",
    "VOCABULARIES",
    "ClipEncoder",
    "EvaluationOptions",
    "OracleReading",
    "SplitExamples",
    "attribute_accuracy",
    "between_class_variance_share",
    "class_prompts",
    "clip_score",
    "ensemble_class_embeddings",
    "evaluate_checkpoint",
    "frechet_distance",
    "frechet_distance_of_features",
    "label_class_prompts",
    "linear_probe_accuracy",
    "load_split_examples",
    "misreads",
    "negative_check_scale",
    "parse_guidance_scales",
    "parse_samplers",
    "read_attributes",
    "zero_shot_accuracy",
    "zero_shot_top_k_accuracy",
]
