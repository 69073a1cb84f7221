"""Trains the model a recipe names, and resumes from WORKDIR's latest checkpoint when rerun.

python train.py --config=configs/shapes.py[:ARGS] [--config.a.b=value ...] --workdir=runs/x
"""

from absl import app, flags, logging

from diffusion import config as config_lib
from diffusion.errors import UserError, error_boundary, parse_flags_or_exit

flags.DEFINE_string("workdir", None, "Run directory: checkpoints, config, tokenizer, logs.")
flags.DEFINE_string(
    "aot_topology",
    None,
    "Instead of training, compile for a TPU slice (e.g. v5p:8x8x4) and "
    "write the memory and cost report to WORKDIR/aot.json (needs the tpu extra).",
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for several processes outside TPU pods."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
FLAGS = flags.FLAGS
_CONFIG = {}


def _split_and_parse(argv):
    remaining, spec, overrides = config_lib.split_config_flags(argv)
    _CONFIG.update(spec=spec, overrides=overrides)
    return FLAGS(remaining)


def parse_flags(argv):
    return parse_flags_or_exit(argv, "train.py", _split_and_parse)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO
    with error_boundary("train.py"):
        if _CONFIG["spec"] is None:
            raise UserError("--config is required, e.g. --config=configs/shapes.py.")
        if not FLAGS.workdir:
            raise UserError("--workdir is required: the run directory, e.g. --workdir=runs/shapes.")
        config = config_lib.load_config(_CONFIG["spec"], _CONFIG["overrides"])
        if FLAGS.aot_topology:  # compile for a TPU slice instead of training
            from diffusion import aot

            aot.run(config, FLAGS.aot_topology, FLAGS.workdir)
            return
        from diffusion import distributed, pipeline  # after flag parsing: importing jax is slow

        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

        with distributed.exit_if_a_peer_is_lost("train.py", FLAGS.workdir):
            pipeline.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
