"""Peak matmul FLOP/s of this machine (float32 and bfloat16): the MFU denominator on CPU.

    PYTHONPATH=. python benchmarks/peak.py [--sizes=512,1024,2048] [--seconds=1]

Best-of-N timing of a jitted square matmul (a shared machine only ever makes a run slower);
prints one row per (dtype, size) and the ratio of each to the float32 peak measured in this run.
"""

import argparse

import jax.numpy as jnp

from diffusion import metrics


def measure(sizes, seconds) -> dict[tuple[str, int], float]:
    return {
        (name, size): metrics.measure_matmul_flops(size=size, dtype=dtype, seconds=seconds)
        for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
        for size in sizes
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rates = measure(sizes, args.seconds)
    fp32_peak = max(v for (name, _), v in rates.items() if name == "float32")
    print("| dtype | size | GFLOP/s | / float32 peak |\n|---|---|---|---|")
    for (name, size), rate in rates.items():
        print(f"| {name} | {size} | {rate / 1e9:.1f} | {rate / fp32_peak:.2f} |")
    print(f"\nfloat32 peak: {fp32_peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
