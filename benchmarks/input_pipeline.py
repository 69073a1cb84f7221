"""Input pipeline throughput on the 32x32 shapes default, as a ratio to what training consumes.

    .venv/bin/python benchmarks/input_pipeline.py [--data_dir=...] [--consumption=300]

Prepares the default dataset (100k train examples) if missing, trains the caption tokenizer,
then times `make_input_pipeline` batches after a warm-up. The target is >= 20x the trainer's
consumption, so data loading never limits training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from diffusion.data import input_pipeline, shapes, sources, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--context_length", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--read_threads", type=int, default=2)
    parser.add_argument("--worker_count", type=int, default=0)
    parser.add_argument(
        "--consumption",
        type=float,
        default=300.0,
        help="examples/s the trainer consumes (the tiny CPU DiT: a few hundred at most)",
    )
    args = parser.parse_args()

    start = time.perf_counter()
    builder = sources.build_dataset(data_dir=args.data_dir, resolution=args.resolution)
    print(f"dataset {builder.info.full_name} ready in {time.perf_counter() - start:.1f} s")
    source = sources.SourceConfig(name=sources.tfds_name(builder), data_dir=args.data_dir)
    captions = (ex["caption"] for _, ex in shapes.generate_examples("train", 5000, 16, seed=0))
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        caption_tokenizer = tokenizer.train_caption_tokenizer(captions, tokenizer_dir)
    iterator = input_pipeline.make_input_pipeline(
        source,
        caption_tokenizer,
        split="train",
        global_batch_size=args.batch_size,
        seed=0,
        context_length=args.context_length,
        read_threads=args.read_threads,
        worker_count=args.worker_count,
    )
    for _ in range(args.warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    throughput = args.batches * args.batch_size / elapsed
    print(
        f"pipeline: {throughput:,.0f} examples/s ({args.batches} batches of {args.batch_size}, "
        f"{args.resolution}x{args.resolution}, read_threads={args.read_threads}, "
        f"worker_count={args.worker_count}, {os.cpu_count()} CPUs)"
    )
    print(f"training consumes: {args.consumption:,.0f} examples/s")
    print(f"ratio: {throughput / args.consumption:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
