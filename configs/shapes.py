"""The embedded default (`make train`): CLIP, then a DiT on its frozen text tower, then evaluation.

Everything runs on the captioned-shapes dataset that the project generates itself, on a 2-core CPU.
Each stage writes into its own subdirectory of --workdir and resumes when rerun.
"""

import ml_collections

from configs import base_clip, base_dit, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.family = "pipeline"  # Runs the stages below in order, each in WORKDIR/<stage>.
    config.stages = ("clip", "dit")  # Stages to run; each resumes from its own checkpoints.
    config.seed = 0  # The one seed of the run, shared by all stages.
    config.data = common.data_config()  # One dataset for all stages.
    config.data.builder_config = "32"
    config.tokenizer = common.tokenizer_config()  # One tokenizer for all stages.

    config.clip = base_clip.get_config(arg)  # Stage 1: contrastive text and image towers.
    config.dit = base_dit.get_config(arg)  # Stage 2: DiT on the frozen CLIP text tower.
    for stage in (config.clip, config.dit):
        # The same objects, so an override of config.data.* reaches every stage.
        stage.data = config.data
        stage.tokenizer = config.tokenizer
        stage.seed = config.get_ref("seed")
    if arg == "runlocal":
        config.data.num_train_examples = 2_000
    return config
