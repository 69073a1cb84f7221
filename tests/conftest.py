"""Test-wide set-up: 8 simulated CPU devices, set before jax starts its backend."""

import os


def xla_flags(device_count: int) -> str:
    """XLA_FLAGS of a test process with `device_count` CPU devices.

    The tests run tiny models, whose time goes to XLA compiling them, not to running them: LLVM's
    optimisation level 0 compiles a tiny DiT train step about 40 % faster. Real runs keep XLA's
    default level.
    """
    count = f"--xla_force_host_platform_device_count={device_count}"
    return f"{count} --xla_backend_optimization_level=0"


# Inherited by the train.py / sample.py processes the tests spawn.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# No persistent XLA compilation cache: on jax 0.10.2 a train step loaded from it (donated
# buffers) aborted the process in tests/test_trainer.py's resume test.


# `make test` spreads whole files over pytest-xdist workers (--dist loadfile keeps each file's
# module fixtures in one process). Files are handed out in collection order, so the longest
# (minutes each: real train.py runs, SIGKILL loops, meshes) go first and the short ones fill in.
SLOWEST_FILES_FIRST = (
    "test_trainer.py",
    "test_faults.py",
    "test_sample.py",
    "test_default_pipeline.py",
    "test_text2image.py",
    "test_evaluate.py",
    "test_aot.py",
    "test_reliability.py",
    "test_bad_inputs.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
