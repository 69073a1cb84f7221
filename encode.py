"""Encodes every image of a TFDS dataset with a frozen autoencoder into a latent TFDS dataset.

python encode.py --autoencoder=runs/ae (or a diffusers AutoencoderKL directory) \
    --config=configs/shapes.py [--config.data.builder_config=64 ...] --output_dir=data/latents \
    [--name=shapes_latents --splits=train,test --batch_size=64 --examples_per_shard=4096]
    [--text_encoder=runs/clip [--text_words]]

The recipe's `data` section names the dataset (and the shapes size). The output is
OUTPUT_DIR/NAME/1.0.0, read by training with --config.data.name=NAME
--config.data.data_dir=OUTPUT_DIR. Sharded over every device and process; rerunning the same
command after an interruption (a SIGKILL, or a SIGTERM, which stops after the batch in flight
and exits 0) finishes it with the bytes of an uninterrupted run.

--text_encoder=DIR (a CLIP run directory, as a DiT's config.text_encoder.checkpoint names one)
also stores each caption's features under that frozen text tower, with its own tokenizer and
context length; a text-conditional DiT with that checkpoint then trains on them without running
the tower. --text_words adds the word embeddings a DiT with model.word_conditioning reads.
"""

from absl import app, flags, logging

from diffusion import config as config_lib
from diffusion.errors import UserError, error_boundary, parse_flags_or_exit

flags.DEFINE_string("autoencoder", None, "Autoencoder run directory or diffusers directory.")
flags.DEFINE_string("output_dir", None, "data_dir of the latent dataset (OUTPUT_DIR/NAME/1.0.0).")
flags.DEFINE_string("name", None, "Name of the latent dataset (default: <dataset>_latents).")
flags.DEFINE_string("splits", None, "Comma-separated splits (default: every split).")
flags.DEFINE_integer("batch_size", 64, "Images per call in each process.")
flags.DEFINE_integer("examples_per_shard", 4096, "Examples per output file (unit of resumption).")
flags.DEFINE_string("text_encoder", None, "CLIP run directory: also store caption text features.")
flags.DEFINE_bool("text_words", False, "With --text_encoder: also the tower's word embeddings.")
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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TFDS logs every file at INFO
    with error_boundary("encode.py"):
        for name in ("autoencoder", "output_dir"):
            if not FLAGS[name].value:
                raise UserError(f"--{name} is required; see python encode.py --help.")
        if _CONFIG["spec"] is None:
            raise UserError("--config is required (its data section names the dataset).")
        config = config_lib.load_config(_CONFIG["spec"], _CONFIG["overrides"])
        if FLAGS.batch_size < 1 or FLAGS.examples_per_shard < 1:
            raise UserError("--batch_size and --examples_per_shard must be >= 1.")
        if FLAGS.text_words and not FLAGS.text_encoder:
            raise UserError("--text_words needs --text_encoder=DIR (the CLIP run to encode with).")
        from diffusion import distributed, encoding  # after flag parsing: importing jax is slow

        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        splits = tuple(s.strip() for s in (FLAGS.splits or "").split(",") if s.strip())
        options = encoding.EncodeOptions(
            output_dir=FLAGS.output_dir,
            name=FLAGS.name,
            splits=splits or None,
            batch_size=FLAGS.batch_size,
            examples_per_shard=FLAGS.examples_per_shard,
            text_encoder=FLAGS.text_encoder,
            text_words=FLAGS.text_words,
        )
        from diffusion.training import PreemptionGuard

        # SIGTERM: stop after the batch in flight (with several processes: after the same round
        # of shards in all), exit 0.
        with PreemptionGuard() as preemption:
            try:
                root = encoding.encode_dataset(
                    FLAGS.autoencoder,
                    config.data,
                    config.seed,
                    options,
                    stop=preemption.poll,
                )
            except encoding.EncodingStopped as stopped:
                print(
                    f"preempted ({stopped}): the written shards are kept; rerun the same "
                    "command to finish",
                    flush=True,
                )
                return
        print(f"latent dataset: {root}", flush=True)


if __name__ == "__main__":
    app.run(
        main, flags_parser=lambda argv: parse_flags_or_exit(argv, "encode.py", _split_and_parse)
    )
