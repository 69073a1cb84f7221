"""metrics.jsonl and TensorBoard events get every scalar; FLOPs come from XLA's cost analysis."""

import glob
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from diffusion import metrics


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


def test_measured_cpu_peak_is_positive_and_finite():
    flops = metrics.measure_matmul_flops(size=128, seconds=0.05)
    assert 1e6 < flops < 1e15
