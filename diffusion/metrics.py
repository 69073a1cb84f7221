"""Where training numbers go: metrics.jsonl, TensorBoard events, and MFU against a device's peak.

Only process 0 writes. Every logged scalar goes both to `WORKDIR/metrics.jsonl` (one JSON object
per logging step, so scripts can read a run without TensorBoard) and to tensorboardX events.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.errors import UserError

# Dense peak FLOP/s per chip from the vendors' data sheets (bfloat16; float32 where the chip has
# no faster path). Matched against `device.device_kind` by substring, most specific first.
PEAK_FLOPS_BY_DEVICE_KIND = (
    ("TPU v6", 918e12),  # v6e (Trillium)
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),  # v5e reports itself as "TPU v5 lite"
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM, dense bf16
    ("A100", 312e12),
)


METRICS_FILENAME = "metrics.jsonl"
_MEASURED_PEAKS: dict[jax.Device, float] = {}
# FLOP/s to take as the peak of a device the data sheets above do not list (a CPU), instead of
# measuring a matmul for a second at every start: for comparable MFUs across runs, or for
# processes that start often (the test suite's kill-and-restart loops).
PEAK_FLOPS_VARIABLE = "DIFFUSION_PEAK_FLOPS"


def peak_flops_per_device(device: jax.Device | None = None) -> float:
    """The device's peak FLOP/s: the data-sheet value; else $DIFFUSION_PEAK_FLOPS where set; else
    a measured matmul rate (measured once per process: the next run in the same process logs
    against the same denominator)."""
    device = device or jax.devices()[0]
    for kind, flops in PEAK_FLOPS_BY_DEVICE_KIND:
        if kind.lower() in device.device_kind.lower():
            return flops
    stated = os.environ.get(PEAK_FLOPS_VARIABLE)
    if stated:
        try:
            peak = float(stated)
        except ValueError:
            peak = math.nan
        if not 0 < peak < math.inf:
            raise UserError(
                f"${PEAK_FLOPS_VARIABLE}={stated!r} is not a positive number of FLOP/s; set it "
                f"to one (e.g. {PEAK_FLOPS_VARIABLE}=1e11) or unset it to measure the device's."
            )
        return peak
    if device not in _MEASURED_PEAKS:
        _MEASURED_PEAKS[device] = measure_matmul_flops(device)
    return _MEASURED_PEAKS[device]


def measure_matmul_flops(
    device: jax.Device | None = None, size: int = 1024, dtype=jnp.float32, seconds: float = 1.0
) -> float:
    """Best observed FLOP/s of a square matmul on `device`: the MFU denominator on CPU.

    Repeats for about `seconds` and keeps the fastest run, since a shared machine only ever makes
    a run slower.
    """
    device = device or jax.devices()[0]
    # Random operands: a GPU multiplies constant or zero matrices measurably faster than real data.
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best is math.inf:
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cost_analysis_flops(program) -> float | None:
    """FLOPs of one call of a lowered or compiled XLA program, from XLA's own cost analysis.

    A lowered program counts the whole (global) computation; a compiled SPMD program counts one
    device's share, and on a GPU leaves out the matmuls it hands to cuBLAS.
    """
    analysis = program.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax returns one dict per program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX's writer module imports torch whenever it is installed, only to accept torch
    tensors too (about 2 s and 180 MB at every train.py, sample.py and evaluate.py start). We pass
    it floats and numpy arrays, so torch is hidden while that module loads (an entry of None in
    sys.modules makes `import torch` raise ImportError, which tensorboardX falls back on), then
    left importable as before. A process that has already imported torch keeps it.
    """
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Writes scalars to metrics.jsonl and TensorBoard, and images to TensorBoard (process 0).

    `resume_step`: the step a run resumes from (0 for a fresh start). The records a killed run
    logged after its last checkpoint are logged again by the resumed run, so metrics.jsonl is
    first rewritten (atomically) without the records of later steps, and TensorBoard is told to
    hide its events from `resume_step + 1` on (tensorboardX's `purge_step`). None appends to
    whatever is there (e.g. evaluation, which logs its own steps).
    """

    def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tensorboard = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, METRICS_FILENAME)
            purge_step = None
            if resume_step is not None:
                drop_records_after(path, resume_step)
                purge_step = int(resume_step) + 1
            self._jsonl = open(path, "a", encoding="utf-8")
            self._tensorboard = _summary_writer_class()(
                os.path.join(workdir, "tensorboard"), purge_step=purge_step
            )

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_float(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name != "step" and value is not None:
                self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """`image` is uint8 HxWx3."""
        if self.enabled:
            self._tensorboard.add_image(name, image, step, dataformats="HWC")
            self._tensorboard.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tensorboard.close()
            self._jsonl = self._tensorboard = None


def _to_float(value) -> float | None:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


def read_metrics(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl, in order."""
    path = os.path.join(workdir, METRICS_FILENAME)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def drop_records_after(path: str, step: int) -> int:
    """Rewrites the metrics.jsonl at `path` keeping the records with "step" <= `step`, in order,
    and returns how many were dropped. A line that does not parse (the last one, cut by a kill)
    is dropped too. The new file replaces the old one in one rename: a crash leaves either."""
    if not os.path.exists(path):
        return 0
    kept, dropped, unterminated = [], 0, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                unterminated = not line.endswith("\n")  # the next record would join it
                kept.append(line if not unterminated else line + "\n")
            else:
                dropped += 1
    if dropped or unterminated:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped
