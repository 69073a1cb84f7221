"""Test-wide set-up: 8 simulated CPU devices, set before jax starts its backend."""

import os
import shutil
import tempfile


def xla_flags(device_count: int) -> str:
    """XLA_FLAGS of a test process with `device_count` CPU devices.

    The tests run tiny models, whose time goes to XLA compiling them, not to running them: LLVM's
    optimisation level 0 compiles a tiny DiT train step about 40 % faster. Real runs keep XLA's
    default level. (XLA:CPU's older fusion emitters, --xla_cpu_use_fusion_emitters=false, compile
    faster still, but their rounding differs between programs that must agree bitwise: guidance
    at scale 1 against the conditional sampler, a resumed CLIP run against an uninterrupted one.)
    """
    count = f"--xla_force_host_platform_device_count={device_count}"
    return f"{count} --xla_backend_optimization_level=0"


# Inherited by the train.py / sample.py processes the tests spawn.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent compilation cache for the whole session: made by the first process (pytest-xdist's
# controller) and inherited by its workers. Many tests compile the same programs (the tiny
# recipes' train steps, samplers and exports recur across files; kill-and-restart loops compile
# one run again in every new process); with the cache, every compilation after the first is a
# disk read.
_OWN_CACHE = "DIFFUSION_TESTS_XLA_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["DIFFUSION_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="diffusion-tests-xla-cache-")
COMPILATION_CACHE = os.environ["DIFFUSION_TESTS_XLA_CACHE"]
CACHE_SETTINGS = {
    "JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # the tests' programs compile fast
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def _cache_one_device_programs_only():
    """Use the cache in this process for programs on one device only.

    On jax 0.10.2 an XLA:CPU program with collectives, loaded from the persistent cache onto the
    8 simulated devices, can stall in its rendezvous: the suite hung (and once aborted) in
    multi-device training steps with the cache on. So programs on several devices compile as
    without a cache, and only one-device processes are spawned with it (single_device_env).
    """
    import jax
    from jax._src import compiler

    cached = compiler.compile_or_get_cached

    def compile_or_get_cached(backend, computation, devices, options, callbacks, executable_devices,
                              pgle_profiler=None):  # fmt: skip
        if devices.size > 1:
            return compiler.backend_compile_and_load(
                backend, computation, executable_devices, options, callbacks
            )
        return cached(backend, computation, devices, options, callbacks, executable_devices,
                      pgle_profiler)  # fmt: skip

    compiler.compile_or_get_cached = compile_or_get_cached
    for name, value in CACHE_SETTINGS.items():
        jax.config.update(name.lower(), int(value) if value == "0" else value)


_cache_one_device_programs_only()


def pytest_sessionfinish(session):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # after every worker ended
        shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


def single_device_env() -> dict[str, str]:
    """The environment of a spawned one-device train.py / sample.py process, with the session's
    compilation cache (safe on one device, see _cache_one_device_programs_only)."""
    return {**os.environ, "XLA_FLAGS": xla_flags(1), **CACHE_SETTINGS}


# `make test` spreads whole files over pytest-xdist workers (--dist loadfile keeps each file's
# module fixtures in one process). Files are handed out in collection order, so the longest
# (minutes each: real train.py runs, SIGKILL loops, meshes) go first and the short ones fill in.
SLOWEST_FILES_FIRST = (
    "test_trainer.py",
    "test_text2image.py",
    "test_aot.py",
    "test_faults.py",
    "test_default_pipeline.py",
    "test_sample.py",
    "test_dit.py",
    "test_checkpoints.py",
    "test_latent_pipeline.py",
    "test_lora.py",
    "test_autoencoder.py",
    "test_clip.py",
    "test_class_conditional.py",
    "test_encode.py",
    "test_video_train.py",
    "test_evaluate.py",
    "test_autoencoder_family.py",
    "test_samplers.py",
    "test_sequence_parallel.py",
    "test_reliability.py",
    "test_sharding.py",
    "test_bad_inputs.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
