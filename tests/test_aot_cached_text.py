"""Ahead-of-time compilation of a text DiT that trains on cached text features
(config.data.cached_text: a dataset written by encode.py --text_encoder): the compiled train step
is the one training runs on such a dataset, without the frozen text tower.

Truths: the tower's own forward pass compiled for the same slice and sharding (what the cached
step must no longer count); the training path's step (`training.loop.build_model`, as train.py
builds it on such a dataset) run on CPU on the same state and batch.

The first test compiles for a TPU slice and needs the TPU compiler (`pip install 'jax[tpu]'`, the
project's tpu extra; `make test` installs it): without it that test alone is skipped, the others
build their programs on CPU.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_aot import MESH, TOPOLOGY, per_device_bytes, tiny_config

from diffusion import aot, data, meshes, models, optim, sharding
from diffusion.aot import topology
from diffusion.data import latents
from diffusion.errors import UserError
from diffusion.families import dit
from diffusion.models import layers
from diffusion.training import inputs, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_tpu_compiler = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed: pip install 'jax[tpu]' (the tpu extra) to compile for TPU",
)


def cached_config(cached: bool | None = True):
    """The tiny text DiT (word conditioning: every cached feature) with data.cached_text."""
    config = tiny_config("dit_text")
    config.data.cached_text = cached
    return config


def tower_forward(config, mesh) -> tuple[float, int]:
    """(per-device FLOPs, per-device argument bytes less the captions') of the frozen tower's
    forward pass as the tower step runs it (`dit.text_condition` on the global batch's
    captions, sharded as the step's batch), compiled alone for the same slice: its arguments
    are the tower weights the step reads (jit drops the vision tower's, which it never reads)."""
    text_config = aot.text_encoder_config(config)
    rules = sharding.rules_from_config(config.mesh)
    graphdef, state, _ = sharding.abstract_state(
        lambda: models.CLIP(text_config, rngs=nnx.Rngs(0)), mesh, rules
    )
    rows = sharding.batch_sharding(mesh)
    shape = (int(config.training.global_batch_size), int(config.tokenizer.context_length))
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)

    def forward(state, tokens, mask):
        tower = layers.merge_here(graphdef, state)
        return dit.text_condition(tower, tokens, mask, words=True)

    compiled, _, _ = topology.compile_program(
        jax.jit(forward), (state, tokens, tokens), mesh, rules
    )
    weights = compiled.memory_analysis().argument_size_in_bytes - 2 * per_device_bytes(tokens)
    return topology.cost_report(compiled, 1.0, 1.0)["flops"], weights


@needs_tpu_compiler
def test_the_cached_text_step_has_no_tower_arguments_and_loses_the_towers_forward_flops():
    mesh = meshes.make_mesh(MESH, devices=aot.topology_devices(TOPOLOGY))
    cached = aot.build_programs(cached_config(), mesh)
    tower = aot.build_programs(cached_config(None), mesh)
    state, batch, frozen = cached.train_args
    assert frozen is None and tower.train_args[2] is not None
    with sharding.activate(mesh, cached.train_step.rules):
        lowered = cached.train_step.step_fn.lower(*cached.train_args)
    # The program's arguments are the train state and the batch, nothing else.
    assert len(jax.tree.leaves(lowered.args_info)) == len(jax.tree.leaves((state, batch)))
    assert cached.sample_args[1] is not None  # sampling still encodes prompts with the tower

    kw = dict(mesh_shape=MESH, sampler=False)
    with_cache = aot.compile_for_topology(cached_config(), TOPOLOGY, **kw)
    with_tower = aot.compile_for_topology(cached_config(None), TOPOLOGY, **kw)
    assert (with_cache["text_features"], with_tower["text_features"]) == ("cached", "tower")
    assert "cached in the batch" in aot.format_report(with_cache)
    saved = with_tower["train_step"]["cost"]["flops"] - with_cache["train_step"]["cost"]["flops"]
    forward, weights = tower_forward(cached_config(None), mesh)
    assert forward > 0 and saved == pytest.approx(forward, rel=0.02)
    # Arguments: the tower's weights out, the cached features in (the captions stay in both).
    features = {k: v for k, v in batch.items() if k.startswith("text_")}
    lighter = (
        with_tower["train_step"]["memory"]["argument_bytes"]
        - with_cache["train_step"]["memory"]["argument_bytes"]
    )
    exact = weights - per_device_bytes(features)  # TPU layouts pad a few small arrays
    assert exact > 0 and lighter == pytest.approx(exact, rel=0.01)


def test_the_aot_step_on_cached_text_is_the_step_training_runs(tmp_path, monkeypatch):
    """On a CPU mesh: the AOT program reads the batch the input pipeline makes of an encode.py
    --text_encoder dataset (keys, shapes, dtypes), and on the same state and batch gives the
    loss and the updated parameters of the step train.py builds for such a dataset (its empty
    caption read from the dataset's file, the text tower loaded and left out of the step)."""
    config = cached_config()
    config.diffusion.cond_dropout = 0.5  # some captions dropped: the empty caption counts
    mesh = meshes.make_mesh({"data": 1}, devices=jax.devices()[:1])  # compiles fastest on CPU
    programs = aot.build_programs(config, mesh)
    _, batch_spec, frozen = programs.train_args
    assert frozen is None
    text = aot.text_encoder_config(config)
    b, length = 8, config.tokenizer.context_length
    f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch_spec.items()} == {
        "image": ((b, 32, 32, 3), f32),
        "tokens": ((b, length), i32),
        "mask": ((b, length), i32),
        latents.TEXT_CONTEXT_KEY: ((b, length, text.text_width), f32),
        latents.TEXT_MASK_KEY: ((b, length), i32),
        latents.TEXT_POOLED_KEY: ((b, text.embed_dim), f32),
        latents.TEXT_WORDS_KEY: ((b, length, text.text_width), f32),
    }

    # train.py's path: the empty caption from the dataset's file, the tower loaded from its
    # checkpoint (here from shapes: its weights are not in the step), the build's step.
    np.savez(tmp_path / latents.EMPTY_TEXT_FILE, **aot.recipe_facts(config).empty_text)
    empty_text = latents.read_empty_text(str(tmp_path), latents.text_keys(True))
    tokenizer = data.train_caption_tokenizer(["a red circle", "a blue square"], tmp_path, 300)
    facts = inputs.data_facts(config, tokenizer, 32, 3, empty_text)
    monkeypatch.setattr(
        loop.rundir, "load_text_encoder", lambda *a, **k: models.CLIP(text, rngs=nnx.Rngs(0))
    )
    build, tower = loop.build_model(config, facts, mesh)
    assert build.frozen_config is None and tower is not None
    tx = optim.make_optimizer(config.optimizer, total_steps=config.training.num_steps)
    trained = build.train_step(config, mesh, tx)

    rng = np.random.default_rng(0)
    host = {
        k: (rng.integers(0, 2, v.shape) if v.dtype == jnp.int32 else rng.normal(size=v.shape))
        for k, v in batch_spec.items()
    }
    batch = {
        k: jax.device_put(np.asarray(host[k], v.dtype), v.sharding) for k, v in batch_spec.items()
    }
    state = trained.init_state()
    twin = jax.tree.map(jnp.copy, state)  # each step donates its state
    new_train, metrics_train = trained.step(state, batch)
    new_aot, metrics_aot = programs.train_step.step(twin, batch)
    assert float(metrics_train["loss"]) == float(metrics_aot["loss"]) > 0
    jax.tree.map(np.testing.assert_array_equal, new_train["params"], new_aot["params"])


def test_training_checks_the_dataset_against_the_stated_cached_text():
    empty = {latents.TEXT_MASK_KEY: np.ones(4, np.int32)}
    inputs.check_stated_cached_text(cached_config(True), "DATA", empty)
    inputs.check_stated_cached_text(cached_config(False), "DATA", None)
    inputs.check_stated_cached_text(cached_config(None), "DATA", empty)  # left to the dataset
    with pytest.raises(UserError, match=r"cached_text=True.*DATA.*encode.py --text_encoder"):
        inputs.check_stated_cached_text(cached_config(True), "DATA", None)
    with pytest.raises(UserError, match=r"cached_text=False.*DATA.*cached_text=true"):
        inputs.check_stated_cached_text(cached_config(False), "DATA", empty)


def test_a_class_conditional_dit_stating_cached_text_is_refused():
    config = tiny_config("dit_class")
    config.data.cached_text = True
    mesh = meshes.make_mesh(MESH, devices=jax.devices()[:4])
    with pytest.raises(UserError, match=r"cached_text=True.*num_classes=10.*class-conditional"):
        aot.build_programs(config, mesh)


def test_the_text_recipe_states_cached_text_features():
    from diffusion import config as config_lib

    recipe = lambda name: config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"))
    assert dit.stated_cached_text(recipe("dit_xl2_text")) is True
    assert dit.stated_cached_text(recipe("base_dit")) is None  # left to the dataset


def test_the_sampling_program_is_the_tower_recipes_whatever_the_step_reads():
    """Sampling encodes prompts with the tower either way: the same program, spec and abstract
    arguments (tower weights included, replicated as sample.py places them)."""
    mesh = meshes.make_mesh(MESH, devices=jax.devices()[:4])
    cached = aot.build_programs(cached_config(), mesh)
    tower = aot.build_programs(cached_config(None), mesh)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)
    assert cached.sample_fn is tower.sample_fn
    (params, text, inputs_, spec, decoder), expected = cached.sample_args, tower.sample_args
    assert spec == expected[3] and decoder is None is expected[4]
    for got, want in zip((params, text, inputs_), expected[:3], strict=True):
        assert shapes(got) == shapes(want)
    assert text is not None
