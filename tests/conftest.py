"""Test-wide set-up: 8 simulated CPU devices, set before jax starts its backend."""

import os


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
# The MFU denominator on CPU, stated instead of measured (a second of matmuls at every train.py
# start, and the suite starts dozens); no test reads the MFU's value.
os.environ.setdefault("DIFFUSION_PEAK_FLOPS", "1e11")


def single_device_env(compilation_cache: str | None = None) -> dict[str, str]:
    """The environment of a spawned one-device train.py / sample.py process.

    compilation_cache: a directory for JAX's persistent compilation cache, shared by processes
    that restart the same run (kill-and-restart loops), so that a restart loads its programs
    instead of compiling them again. Only for one device: on jax 0.10.2 programs with
    collectives loaded from the cache onto 8 simulated devices hung in an all-gather
    rendezvous (tests/test_trainer.py's resume test), so the in-process tests keep no cache.
    """
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    if compilation_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny programs compile fast
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def one_block(config, **depths):
    """`config` (a clip, dit or video_dit recipe) with one block per tower, or `depths` (e.g.
    text_depth=2) where a test's property needs more. The loop's properties (meshes, resume,
    files, errors) hold at any depth, and a tiny model's compile time grows with its blocks (the
    1-block tiny DiT's train step compiles in about half the 4-block one's time:
    docs/experiments/2026-12-08-suite-time.md)."""
    fields = {"clip": ("vision_depth", "text_depth"), "dit": ("depth",), "video_dit": ("depth",)}
    config.model.update({name: 1 for name in fields[config.family]}, **depths)
    return config


# `make test` spreads whole files over pytest-xdist workers (--dist loadfile keeps each file's
# module fixtures in one process). Files are handed out in collection order, so the longest go
# first and the short ones fill in (longest-first packing of two workers): the files of 30 s or
# more, by their time in the junit report of a full run on the 2-core machine (2026-12-08).
SLOWEST_FILES_FIRST = (
    "test_trainer.py",
    "test_faults.py",
    "test_latent_pipeline.py",
    "test_aot.py",
    "test_sample.py",
    "test_encode.py",
    "test_text2image.py",
    "test_default_pipeline.py",
    "test_video_train.py",
    "test_dit.py",
    "test_lora.py",
    "test_autoencoder_family.py",
    "test_aot_video.py",
    "test_sequence_parallel.py",
    "test_sharding.py",
    "test_checkpoints.py",
    "test_samplers.py",
    "test_evaluate.py",
    "test_text_features.py",
    "test_optim.py",
    "test_reliability.py",
    "test_wan_pipeline.py",
    "test_clip.py",
    "test_autoencoder.py",
    "test_bad_inputs.py",
    "test_aot_cached_text.py",
    "test_class_conditional.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
