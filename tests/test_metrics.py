"""metrics.jsonl and TensorBoard events get every scalar; FLOPs come from XLA's cost analysis."""

import glob
import os
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from diffusion import metrics
from diffusion.errors import UserError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_writer_appends_one_json_object_per_step_and_tensorboard_events(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": jnp.float32(2.5), "learning_rate": 1e-3})
    writer.write_scalars(2, {"loss": 1.5, "grad_norm": float("nan")})
    writer.close()
    records = metrics.read_metrics(str(tmp_path))
    assert records == [
        {"step": 1, "loss": 2.5, "learning_rate": 1e-3},
        {"step": 2, "loss": 1.5, "grad_norm": None},  # JSON has no NaN: null says "not finite"
    ]
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def _events(directory):
    """The Event protos of the TensorBoard event files under `directory`: TFRecord framing
    (u64 length, u32 CRC, the Event proto, u32 CRC) read by hand."""
    from tensorboardX.proto import event_pb2

    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            yield event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4


def _event_scalars(directory) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of the TensorBoard event files under `directory`."""
    return {
        (value.tag, event.step): value.simple_value
        for event in _events(directory)
        for value in event.summary.value
        if value.HasField("simple_value")
    }


def test_writer_does_not_import_torch_and_its_events_hold_the_scalars(tmp_path):
    """tensorboardX's writer would import torch (installed with the test extra): seconds at every
    start of train.py. A fresh process writes scalars and an image without it, torch stays
    importable afterwards, and TensorBoard's files hold the values."""
    script = f"""
import sys
import numpy as np
from diffusion import metrics
writer = metrics.MetricWriter({str(tmp_path)!r}, enabled=True)
writer.write_scalars(3, {{"loss": 0.25, "learning_rate": 1e-3}})
writer.write_image(3, "grid", np.zeros((8, 8, 3), np.uint8))
writer.close()
assert "torch" not in sys.modules, "torch was imported"
import torch  # still importable
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=_ROOT)
    scalars = _event_scalars(str(tmp_path / "tensorboard"))
    assert scalars == {("loss", 3): 0.25, ("learning_rate", 3): pytest.approx(1e-3)}


def test_writer_on_other_processes_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path / "run"), enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v4", 275e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
    ],
)
def test_peak_table_matches_device_kinds(kind, peak):
    assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind=kind)) == peak


def test_cost_analysis_counts_a_matmul_as_two_flops_per_multiply_add():
    a = jnp.ones((64, 32))
    b = jnp.ones((32, 16))
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    assert metrics.cost_analysis_flops(compiled) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)


def test_lowered_program_counts_the_global_matmul_and_compiled_one_device_share():
    """Why the MFU numerator comes from the lowered step: on a mesh, the compiled SPMD program's
    count is one device's share, which divided again by the device count undercounts MFU."""
    mesh = jax.make_mesh((8,), ("rows",))
    a = jax.device_put(jnp.ones((1024, 64)), NamedSharding(mesh, PartitionSpec("rows")))
    lowered = jax.jit(jnp.matmul).lower(a, jnp.ones((64, 32)))
    global_flops = 2 * 1024 * 64 * 32
    assert metrics.cost_analysis_flops(lowered) == pytest.approx(global_flops, rel=0.01)
    assert metrics.cost_analysis_flops(lowered.compile()) == pytest.approx(
        global_flops / 8, rel=0.01
    )


def test_a_stated_peak_replaces_the_measurement_on_devices_the_table_lacks(monkeypatch):
    cpu = types.SimpleNamespace(device_kind="cpu")
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device: pytest.fail("measured"))
    monkeypatch.setenv(metrics.PEAK_FLOPS_VARIABLE, "2.5e11")
    assert metrics.peak_flops_per_device(cpu) == 2.5e11
    tpu = types.SimpleNamespace(device_kind="TPU v5p")
    assert metrics.peak_flops_per_device(tpu) == 459e12  # the data sheet wins
    for bad in ("fast", "0", "-1e11", "inf", "nan"):
        monkeypatch.setenv(metrics.PEAK_FLOPS_VARIABLE, bad)
        with pytest.raises(UserError, match=f"DIFFUSION_PEAK_FLOPS='{bad}' is not a positive"):
            metrics.peak_flops_per_device(cpu)


def test_measured_cpu_peak_is_positive_and_finite():
    flops = metrics.measure_matmul_flops(size=128, seconds=0.05)
    assert 1e6 < flops < 1e15


def _purge_steps(directory) -> list[int]:
    """Steps of the SessionLog START events (tensorboardX's purge_step) in `directory`."""
    return [
        event.step
        for event in _events(directory)
        if event.HasField("session_log") and event.session_log.status == 1  # START
    ]


def test_a_resumed_writer_drops_the_records_after_the_restored_step(tmp_path):
    """A run killed at step 5 after its checkpoint at 3 logs 4 and 5 again when it resumes:
    each step is in metrics.jsonl once, in order, and TensorBoard hides the old 4 and 5."""
    writer = metrics.MetricWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write_scalars(step, {"loss": 10.0 - step})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the line being written when the process was killed
    resumed = metrics.MetricWriter(str(tmp_path), resume_step=3)
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
    for step in (4, 5, 6):
        resumed.write_scalars(step, {"loss": 1.0})
    resumed.close()
    records = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [9.0, 8.0, 7.0, 1.0, 1.0, 1.0]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
    assert 4 in _purge_steps(str(tmp_path / "tensorboard"))


def test_resume_keeps_a_whole_file_and_a_fresh_start_empties_it(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    before = os.stat(tmp_path / "metrics.jsonl")
    metrics.MetricWriter(str(tmp_path), resume_step=1).close()  # nothing to drop: not rewritten
    assert os.stat(tmp_path / "metrics.jsonl").st_ino == before.st_ino
    # A last record without its newline is kept and ended, so the next one starts a new line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.5}')
    writer = metrics.MetricWriter(str(tmp_path), resume_step=2)
    writer.write_scalars(3, {"loss": 0.25})
    writer.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
    # No checkpoint to resume from (killed before the first): step 0, nothing kept.
    metrics.MetricWriter(str(tmp_path), resume_step=0).close()
    assert metrics.read_metrics(str(tmp_path)) == []
    assert metrics.drop_records_after(str(tmp_path / "missing.jsonl"), 3) == 0
