"""Test-wide set-up: 8 simulated CPU devices, set before jax starts its backend."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# No persistent XLA compilation cache: on jax 0.10.2 a train step loaded from it (donated
# buffers) aborted the process in tests/test_trainer.py's resume test.
