"""Where the train step's time goes: a jax.profiler trace of the compiled step, by XLA op kind.

    PYTHONPATH=. python benchmarks/profile_step.py [--case=dit_tiny] [--batch=64] [--steps=5]

Runs the same step as benchmarks/train_step.py (one device, float32, no remat or scan), traces
`--steps` steps, and sums the trace's per-op events by op kind (the HLO instruction name without
its numeric suffix: `ynn_fusion`, `copy_bitcast_fusion`, ...). For the fusions that hold a dot
it also counts their FLOPs from the compiled HLO, so the table says how fast the matmuls run
against the float32 peak measured in the same run, and how much of the step is not matmul at
all. XLA:CPU runs independent ops on its threads at the same time, so the op times add up to
more than the step's wall time; the shares are of the summed op time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (the benchmark beside this one builds the same step)

from diffusion import meshes, metrics  # noqa: E402

RUNTIME_EVENTS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool", "ParseArguments")


def dot_flops_per_instruction(hlo_text: str) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of the dots inside each fusion (or bare dot) of an HLO module."""
    computations = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^%(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo_text, re.S | re.M)
    }

    shapes = dict(re.findall(r"%(\S+) = (\w+\[[\d,]*\])", hlo_text))  # names are module-unique

    def dims(shape: str) -> list[int]:
        return [int(d) for d in re.match(r"\w+\[([\d,]*)\]", shape).group(1).split(",") if d]

    def flops_of(body: str) -> int:
        total = 0
        for m in re.finditer(
            r"= (\w+\[[\d,]*\])\S* dot\(%([^,\s]+), %[^)]+\),(?: lhs_batch_dims=\{[\d,]*\},"
            r" rhs_batch_dims=\{[\d,]*\},)? lhs_contracting_dims=\{([\d,]*)\}",
            body,
        ):
            lhs = dims(shapes[m.group(2)])
            contracted = math.prod(lhs[int(i)] for i in m.group(3).split(",") if i)
            total += 2 * math.prod(dims(m.group(1))) * contracted
        return total

    flops = {}
    for m in re.finditer(r"%(\S+) = \S+ fusion\(.*?calls=%(\S+?),", hlo_text):
        if m.group(2) in computations:
            flops[m.group(1)] = flops_of(computations[m.group(2)])
    for m in re.finditer(r"(%(\S+) = \w+\[[\d,]*\]\S* dot\(.*)", hlo_text):
        flops.setdefault(m.group(2), flops_of(m.group(1)))
    return {name: f for name, f in flops.items() if f}


def op_times(trace_dir: str) -> dict[str, float]:
    """Summed microseconds per op name over the trace (runtime bookkeeping events left out)."""
    paths = glob.glob(os.path.join(trace_dir, "plugins/profile/*/*.trace.json.gz"))
    if len(paths) != 1:
        raise SystemExit(f"expected one *.trace.json.gz under {trace_dir}, found {paths}")
    (path,) = paths
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    times = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith(RUNTIME_EVENTS):
            times[event["name"]] += event.get("dur", 0)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="dit_tiny", choices=train_step.KNOWN_CASES)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="op kinds to list")
    args = parser.parse_args()
    device = jax.devices()[0]
    mesh = meshes.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
    peak = metrics.measure_matmul_flops(size=1024, dtype="float32", seconds=1.0)
    config = train_step.case_config(args.case, args.batch)
    compiled, state, batch, frozen, _ = train_step.compile_step(config, mesh)
    dot_flops = dot_flops_per_instruction(compiled.as_text())

    def run_steps(state):  # the step donates its state: keep the one it returns
        start = time.perf_counter()
        for _ in range(args.steps):
            state, out = compiled(state, batch, frozen)
        jax.block_until_ready(out)
        return state, (time.perf_counter() - start) / args.steps

    state, _ = run_steps(state)  # warm-up
    state, step_seconds = run_steps(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        state, traced_seconds = run_steps(state)
        jax.profiler.stop_trace()
        times = op_times(trace_dir)

    kinds = collections.defaultdict(lambda: [0.0, 0, 0])  # kind -> [us, instructions, flops]
    for name, micros in times.items():
        kind = kinds[re.sub(r"\.\d+$", "", name)]
        kind[0] += micros / args.steps
        kind[1] += 1
        kind[2] += dot_flops.get(name, 0)
    total = sum(k[0] for k in kinds.values())
    matmul = sum(k[0] for k in kinds.values() if k[2])
    flops = sum(k[2] for k in kinds.values())
    matmul_rate = flops / matmul / 1e3  # GFLOP/s
    print(
        f"{args.case}, batch {args.batch}, {device.device_kind}: step {1e3 * step_seconds:.1f} ms "
        f"(traced: {1e3 * traced_seconds:.1f} ms), float32 peak {peak / 1e9:.1f} GFLOP/s\n"
        f"summed op time {total / 1e3:.1f} ms per step ({total / 1e6 / traced_seconds:.2f}x the "
        f"traced step: ops overlapping on threads); ops holding dots: "
        f"{100 * matmul / total:.0f}% of it, {flops / 1e9:.2f} GFLOP at "
        f"{matmul_rate:.1f} GFLOP/s per op ({100 * matmul_rate / (peak / 1e9):.0f}% of the peak)\n"
    )
    print(
        "| op kind | ms / step | share | instructions | GFLOP | GFLOP/s |\n"
        "|---|---|---|---|---|---|"
    )
    for name, (micros, count, f) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[: args.top]:
        rate = f"{f / micros / 1e3:.1f}" if f else "-"
        print(
            f"| {name} | {micros / 1e3:.2f} | {100 * micros / total:.1f}% | {count} | "
            f"{f / 1e9:.2f} | {rate} |"
        )


if __name__ == "__main__":
    main()
