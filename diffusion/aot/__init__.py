"""Ahead-of-time compilation for a TPU topology: does a recipe fit, and how fast could it run?

With libtpu installed (the `tpu` extra), `jax.experimental.topologies.get_topology_desc` describes
the chips of a TPU slice on any machine, this CPU included. The REAL train step of a recipe
(`train_step.TrainStep.step_fn`: loss, gradients, AdamW, EMA, under the recipe's mesh and logical
rules) and its sampling program (`inference.program.sampling_program`, the very program sample.py
runs: text tower, guidance, the sampler's `lax.scan`, and for a latent DiT the autoencoder's
decoder from config.autoencoder) are lowered with abstract inputs
(`jax.ShapeDtypeStruct` carrying shardings) and compiled by the TPU compiler. Nothing is
allocated; the compiled programs report

    memory_analysis()   per-device bytes: arguments, outputs, temporaries, generated code, and
                        the outputs aliased to donated arguments (counted once)
    cost_analysis()     per-device FLOPs, bytes accessed and `optimal_seconds`, the compiler's
                        roofline estimate of the program's run time on that chip

from which the report derives the peak memory per device against the chip's HBM, the step time
and the implied utilisation (FLOPs / (time x peak)). The FLOPs are the compiler's, so with
rematerialisation they include the recomputed forward pass (hardware, not model, FLOPs).

    report = compile_for_topology(config, "v5p:2x2x1")   # diffusion.aot.topology
    python train.py --config=configs/dit_xl2_imagenet.py --aot_topology=v5p:8x8x4 --workdir=W

The programs of a recipe on abstract inputs: `diffusion.aot.programs`; compiling them for a
topology and the report: `diffusion.aot.topology`.
"""

from diffusion.aot.programs import (
    AOTError,
    Programs,
    autoencoder_config,
    build_programs,
    recipe_facts,
    sampler_settings,
    text_encoder_config,
)
from diffusion.aot.topology import (
    chip_name,
    compile_for_topology,
    devices_per_chip,
    format_report,
    libtpu_available,
    run,
    topology_devices,
)

__all__ = [
    "AOTError",
    "Programs",
    "autoencoder_config",
    "build_programs",
    "chip_name",
    "compile_for_topology",
    "devices_per_chip",
    "format_report",
    "libtpu_available",
    "recipe_facts",
    "run",
    "sampler_settings",
    "text_encoder_config",
    "topology_devices",
]
