"""Low-rank adapters on the video DiT (diffusion/models/lora.py, diffusion/hf/wan_lora.py) and the
LoRA fine-tune of train.py.

Truths: diffusers' own Wan LoRA loader (PEFT) reads our exported adapters into its
WanTransformer3DModel and gives our adapted forward; the merged model is base + scale * A B in
closed form and computes what the adapted one does; a fresh adapter (B = 0) leaves the model
unchanged; a fine-tune updates the adapters only, the base bitwise unchanged, and keeps optimizer
state for the adapters alone.
"""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors import safe_open
from test_dit import perturb
from test_wan_import import TIMESTEPS, TINY_WAN, random_wan

from configs import base_video_dit, moving_shapes
from diffusion import families, meshes, metrics, param_export, rundir, sharding, training
from diffusion.errors import UserError
from diffusion.families import video_dit as video_dit_family
from diffusion.hf import wan_lora
from diffusion.hf.wan_transformer import video_dit_config_from_diffusers, video_dit_from_state_dict
from diffusion.inference import dit_pipeline
from diffusion.models import lora, video_dit
from diffusion.train_step import TrainStep

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TINY = dict(width=32, num_heads=2, depth=1, ffn_dim=48, text_dim=16, patch_size=(1, 4, 4))
# diffusers' tiny Wan (as tests/test_wan_import.py): two heads of 16, patch (1, 2, 2).


@nnx.jit
def forward(model, x, t, context):
    """The model's forward as one compiled program (op by op, a forward takes seconds here)."""
    return model(x, t, context)


def inputs(config, batch=2, frames=2, size=8, length=5):
    keys = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(keys[0], (batch, frames, size, size, config.in_channels))
    context = jax.random.normal(keys[1], (batch, length, config.text_dim))
    return x, jnp.array([0.25, 0.75]), context


# ---------------------------------------------------------------------------------------------
# The adapters in the model
# ---------------------------------------------------------------------------------------------


def test_a_fresh_adapter_leaves_the_model_unchanged_and_starts_as_peft_does():
    base = video_dit.VideoDiT(video_dit.video_dit_config("tiny", **TINY), rngs=nnx.Rngs(0))
    perturb(base, 1, scale=0.2)
    adapted = lora.with_adapters(base, rank=4, alpha=8.0)
    x, t, context = inputs(base.config)
    np.testing.assert_array_equal(forward(adapted, x, t, context), forward(base, x, t, context))
    adapters = lora.adapters_of(adapted)
    assert len(adapters) == len(lora.TARGETS)  # every projection of the block
    for path, adapter in adapters.items():
        a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
        fan_in = int(np.prod(a.shape[:-1]))
        assert not b.any(), path
        # PEFT: kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        assert np.abs(a).max() <= 1 / np.sqrt(fan_in) and np.abs(a).max() > 0.8 / np.sqrt(fan_in)
        assert adapter.scale == 2.0


def test_adapters_carry_logical_axis_names_and_only_they_are_adapter_paths():
    config = video_dit.video_dit_config("tiny", **TINY, lora_rank=2, scan_layers=True)
    model = video_dit.VideoDiT(config, rngs=nnx.Rngs(0))
    names = {
        path: sharding.variable_logical_names(variable)
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    block = ("blocks", "blocks")
    assert names[(*block, "self_attn", "query_adapter", "a")] == ("layers", "embed", "lora_rank")
    assert names[(*block, "self_attn", "query_adapter", "b")] == (
        "layers", "lora_rank", "heads", "kv",
    )  # fmt: skip
    assert names[(*block, "cross_attn", "out_adapter", "a")] == ("layers", "heads", "kv",
                                                                 "lora_rank")  # fmt: skip
    assert names[(*block, "ffn", "fc1", "adapter", "b")] == ("layers", "lora_rank", "mlp")
    adapter_paths = {p for p in names if lora.is_adapter_path(p)}
    assert len(adapter_paths) == 2 * len(lora.TARGETS)  # A and B of each
    assert all(p[-2].endswith("adapter") for p in adapter_paths)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_merged_model_is_base_plus_scale_a_b_and_computes_the_adapted_model(scan_layers):
    config = video_dit.video_dit_config(
        "tiny", **TINY, lora_rank=3, lora_alpha=6.0, scan_layers=scan_layers,
        lora_targets=("self_attn.query", "self_attn.out", "cross_attn.value", "ffn.fc2"),
    )  # fmt: skip
    model = video_dit.VideoDiT(config, rngs=nnx.Rngs(0))
    perturb(model, 2, scale=0.2)
    merged = lora.merge_lora(model)
    assert merged.config.lora_rank == 0 and not lora.adapters_of(merged)
    x, t, context = inputs(config)
    np.testing.assert_allclose(
        forward(merged, x, t, context), forward(model, x, t, context), atol=1e-5
    )
    # Closed form on one kernel of each layout: W + (alpha / r) A B.
    block = lambda m: m.blocks.blocks if scan_layers else m.blocks.blocks[0]
    product = lambda a, b: np.tensordot(a, b, 1)  # (*in, r) x (r, *out)
    if scan_layers:  # one matrix per layer
        product = lambda a, b: (
            np.einsum("lir,lrjk->lijk", a, b)
            if b.ndim == 4
            else (np.einsum("lijr,lrk->lijk", a, b))
        )
    for kernel in ("query", "out"):  # (D,) -> (H, K) and (H, K) -> (D,)
        attention = block(model).self_attn
        adapter = getattr(attention, f"{kernel}_adapter")
        w = np.asarray(getattr(attention, f"{kernel}_kernel")[...])
        expected = w + 2.0 * product(np.asarray(adapter.a[...]), np.asarray(adapter.b[...]))
        got = np.asarray(getattr(block(merged).self_attn, f"{kernel}_kernel")[...])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # Projections not targeted keep their kernel bit for bit.
    np.testing.assert_array_equal(
        block(merged).self_attn.key_kernel[...], block(model).self_attn.key_kernel[...]
    )


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(lora_rank=-1), "lora_rank must be an integer >= 0"),
        (dict(lora_rank=2, lora_alpha=0.0), "lora_alpha must be positive"),
        (dict(lora_rank=2, lora_targets=("attn1.to_q",)), "unknown LoRA target.*self_attn.query"),
        (dict(lora_rank=2, lora_targets=()), "at least one"),
    ],
)
def test_bad_adapter_settings_are_named_with_the_valid_ones(fields, match):
    with pytest.raises(UserError, match=match):
        video_dit.video_dit_config("tiny", **TINY, **fields)


# ---------------------------------------------------------------------------------------------
# Export: diffusers loads our adapters
# ---------------------------------------------------------------------------------------------


def diffusers_forward(model, x, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3),  # (B, C, T, H, W)
            torch.from_numpy(np.asarray(timesteps)),
            torch.from_numpy(np.asarray(context)),
            return_dict=False,
        )[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


def load_into_diffusers(transformer, path: str) -> None:
    """What `WanPipeline.load_lora_weights(dir, weight_name=file)` does to its transformer."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    state_dict, metadata = WanLoraLoaderMixin.lora_state_dict(
        os.path.dirname(path), weight_name=os.path.basename(path), return_lora_metadata=True
    )
    WanLoraLoaderMixin.load_lora_into_transformer(
        state_dict, transformer=transformer, metadata=metadata
    )


@pytest.mark.parametrize(
    "scan_layers, rank, alpha, targets",
    [
        (False, 4, 8.0, tuple(lora.TARGETS)),
        (True, 2, None, ("self_attn.value", "cross_attn.query", "ffn.fc1")),
    ],
)
def test_diffusers_loads_the_exported_adapters_and_computes_our_adapted_forward(
    tmp_path, scan_layers, rank, alpha, targets
):
    reference = random_wan()
    config = video_dit_config_from_diffusers(
        {"_class_name": "WanTransformer3DModel", **TINY_WAN}, scan_layers=scan_layers
    )
    ours = video_dit_from_state_dict(reference.state_dict(), config)
    adapted = lora.with_adapters(ours, rank=rank, alpha=alpha, targets=targets)
    for i, adapter in enumerate(lora.adapters_of(adapted).values()):  # non-zero A and B
        key = jax.random.key(i)
        adapter.a[...] = 0.3 * jax.random.normal(key, adapter.a.shape)
        adapter.b[...] = 0.3 * jax.random.normal(jax.random.fold_in(key, 1), adapter.b.shape)
    path = wan_lora.save_lora_safetensors(adapted, str(tmp_path / "lora.safetensors"))

    with safe_open(path, "np") as f:
        keys = set(f.keys())
        metadata = json.loads(f.metadata()[wan_lora.METADATA_KEY])
        q_a = f.get_tensor("transformer.blocks.1.attn1.to_v.lora_A.weight")
        q_b = f.get_tensor("transformer.blocks.1.attn1.to_v.lora_B.weight")
    assert len(keys) == 2 * 2 * len(targets)  # blocks x (A, B) x targets
    assert q_a.shape == (rank, 32) and q_b.shape == (32, rank)  # (r, in), (out, r)
    assert metadata["transformer.r"] == rank
    assert metadata["transformer.lora_alpha"] == (rank if alpha is None else alpha)

    x, _, context = inputs(config, frames=3, length=7)
    timesteps = np.array(TIMESTEPS, np.float32)
    ours_out = np.asarray(forward(adapted, x, jnp.asarray(timesteps / 1000.0), context))
    base_out = np.asarray(forward(ours, x, jnp.asarray(timesteps / 1000.0), context))
    assert np.abs(ours_out - base_out).max() > 1e-2  # the adapters matter
    load_into_diffusers(reference, path)
    theirs = diffusers_forward(reference, x, timesteps, context)
    np.testing.assert_allclose(theirs, ours_out, atol=1e-4, rtol=0)
    merged = lora.merge_lora(adapted)
    np.testing.assert_allclose(
        np.asarray(forward(merged, x, jnp.asarray(timesteps / 1000.0), context)), theirs, atol=1e-4
    )


def test_a_diffusers_directory_gives_the_fine_tune_its_sizes_and_weights(tmp_path):
    reference = random_wan(seed=1)
    directory = str(tmp_path / "transformer")
    reference.save_pretrained(directory, safe_serialization=True)
    base, load = video_dit_family.pretrained(directory, dict(scan_layers=True))
    assert (base.width, base.depth, base.in_channels, base.scan_layers) == (32, 2, 4, True)
    adapted_config = dataclasses.replace(base, lora_rank=2)
    model = video_dit.VideoDiT(adapted_config, rngs=nnx.Rngs(0))
    params = load()
    assert not any(lora.is_adapter_path(path) for path in params)
    nnx.update(model, nnx.from_flat_state(
        [(path, v.replace(jnp.asarray(params[path]))) if path in params else (path, v)
         for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    ))  # fmt: skip
    x, _, context = inputs(base, frames=3, length=7)
    timesteps = np.array(TIMESTEPS, np.float32)
    np.testing.assert_allclose(
        np.asarray(forward(model, x, jnp.asarray(timesteps / 1000.0), context)),
        diffusers_forward(reference, x, timesteps, context),
        atol=1e-4,
    )  # fresh adapters on the imported base: diffusers' function

    config = base_video_dit.get_config()
    config.model.weights = directory
    config.lora.rank = 2
    text = types.SimpleNamespace(text_width=12)
    facts = families.DataFacts.from_config(config, image_size=8)
    config.model.width = 64
    with pytest.raises(UserError, match=r"width=64 \(weights: 32\).*decides the architecture"):
        video_dit_family.fine_tune_config(config, facts, text)
    config.model.width = None
    with pytest.raises(UserError, match="takes 4 input channels, the data 'moving_shapes' has 3"):
        video_dit_family.fine_tune_config(config, facts, text)
    facts = dataclasses.replace(facts, image_channels=4)
    with pytest.raises(UserError, match="text states of width 12.*gives 64"):
        video_dit_family.fine_tune_config(config, facts, types.SimpleNamespace(text_width=64))
    model_config, _ = video_dit_family.fine_tune_config(config, facts, text)
    assert model_config.lora_rank == 2 and model_config.width == 32
    config.lora.targets = ("attn1.to_q",)  # diffusers' name, not ours
    with pytest.raises(UserError, match=r"config.lora \(.*unknown LoRA target.*self_attn.query"):
        video_dit_family.fine_tune_config(config, facts, text)


def test_run_weights_are_restacked_for_a_fine_tune_that_scans_otherwise():
    config = video_dit.video_dit_config("tiny", **{**TINY, "depth": 2})
    model = video_dit.VideoDiT(config, rngs=nnx.Rngs(0))
    flat = video_dit_family._flat_params(model)
    scanned_config = dataclasses.replace(config, scan_layers=True)
    stacked = video_dit_family._relayout(flat, False, scanned_config)
    abstract = nnx.eval_shape(lambda: video_dit.VideoDiT(scanned_config, rngs=nnx.Rngs(0)))
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract))}
    assert {p: v.shape for p, v in stacked.items()} == shapes
    back = video_dit_family._relayout(stacked, True, config)
    assert back.keys() == flat.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(back[path], value)


def test_exporting_a_model_without_adapters_is_refused(tmp_path):
    model = video_dit.VideoDiT(video_dit.video_dit_config("tiny", **TINY), rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="no LoRA adapters.*lora_rank > 0"):
        wan_lora.save_lora_safetensors(model, str(tmp_path / "lora.safetensors"))


# ---------------------------------------------------------------------------------------------
# Fine-tuning through train.py's loop
# ---------------------------------------------------------------------------------------------

ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def recipe(data_dir):
    """configs/moving_shapes.py:runlocal on one device, one batch of clips, one block."""
    config = moving_shapes.get_config("runlocal")
    config.data.data_dir = data_dir
    config.data.num_train_examples = 8
    config.data.num_eval_examples = 8
    config.clip.model.update(vision_depth=1, text_depth=1, text_width=64)
    config.video_dit.model.depth = 1
    for stage in (config.clip, config.video_dit):
        stage.mesh.update(ONE_DEVICE)
        stage.training.update(log_every=1, checkpoint_every=100)
        stage.optimizer.warmup_steps = 0  # runs of one to three steps
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(data dir, CLIP run, a base video DiT run) of the recipe, one step each."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    clip = recipe(data_dir).clip
    clip.training.num_steps = 1
    clip_run = str(tmp_path_factory.mktemp("clip"))
    training.train(clip, clip_run, devices=jax.devices()[:1])
    base_run = str(tmp_path_factory.mktemp("base"))
    training.train(video_stage(data_dir, clip_run, steps=1), base_run, devices=jax.devices()[:1])
    return data_dir, clip_run, base_run


def video_stage(data_dir, clip_run, steps):
    config = recipe(data_dir).video_dit
    config.text_encoder.checkpoint = clip_run
    config.tokenizer.path = os.path.join(clip_run, "tokenizer")
    config.training.num_steps = steps
    return config


def test_the_sharded_train_step_updates_the_adapters_alone_with_optimizer_state_for_them():
    config = video_dit.video_dit_config("tiny", **TINY, lora_rank=2)
    base = video_dit.VideoDiT(dataclasses.replace(config, lora_rank=0), rngs=nnx.Rngs(3))
    perturb(base, 4, scale=0.2)
    base_params = {
        path: np.asarray(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(base, nnx.Param))
    }
    x, _, context = inputs(config, batch=4)
    t = jnp.linspace(0.2, 0.8, 4)

    def loss_fn(model, frozen, batch, key):
        del frozen, key
        return jnp.mean(jnp.square(model(batch["x"], t, context) - batch["x"])), {}

    mesh = meshes.mesh_from_config({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    step = TrainStep(
        lambda: video_dit.VideoDiT(config, rngs=nnx.Rngs(0)), loss_fn, optax.adam(1e-2), mesh,
        seed=0, ema_decay=0.5, trainable=lora.is_adapter_path,
    )  # fmt: skip
    state = step.init_state(base_params)
    initial = {  # copied: the step donates the state
        path: np.array(variable.get_value())
        for path, variable in nnx.to_flat_state(state["params"])
    }
    adapter_size = sum(
        np.size(v.get_value()) for p, v in nnx.to_flat_state(state["params"])
        if lora.is_adapter_path(p)
    )  # fmt: skip
    specs = {
        path: tuple(variable.get_value().sharding.spec)
        for path, variable in nnx.to_flat_state(state["params"])
    }
    block = ("blocks", "blocks", 0)
    assert specs[(*block, "self_attn", "query_adapter", "a")] == ("fsdp", None)
    assert specs[(*block, "self_attn", "query_adapter", "b")] == (None, "tensor", None)
    assert specs[(*block, "ffn", "fc1", "adapter", "b")] == (None, "tensor")
    assert specs[(*block, "ffn", "fc2", "adapter", "a")] == ("tensor", None)
    moments = [np.size(v) for v in jax.tree.leaves(sharding.unbox(state["opt_state"]))]
    assert sum(moments) == 2 * adapter_size + 1  # Adam's mu and nu, and its count
    batch = {"x": x}
    for _ in range(2):
        state, metrics_ = step.step(state, batch)
        assert np.isfinite(float(metrics_["loss"]))
    for tree in (state["params"], state["ema"]):
        for path, variable in nnx.to_flat_state(tree):
            value = np.asarray(variable.get_value())
            if lora.is_adapter_path(path):
                assert not np.array_equal(value, initial[path]), path
            else:
                np.testing.assert_array_equal(value, base_params[path])


def test_a_lora_fine_tune_trains_the_adapters_alone_and_exports_them(runs, tmp_path):
    data_dir, clip_run, base_run = runs
    config = video_stage(data_dir, clip_run, steps=3)
    config.model.weights = base_run
    config.lora.update(rank=4, alpha=4.0)
    config.training.ema_decay = 0.9
    config.optimizer.update(name="adamw", learning_rate=1e-2)
    workdir = str(tmp_path / "lora")
    training.train(config, workdir, devices=jax.devices()[:1])
    assert len(metrics.read_metrics(workdir)) == 3

    _, base_config = rundir.load_model_config(base_run)
    base = rundir.load_run_params(base_run, base_config, video_dit.VideoDiT)
    _, tuned_config = rundir.load_model_config(workdir)
    assert tuned_config.lora_rank == 4 and tuned_config.width == base_config.width
    tuned = rundir.load_run_params(workdir, tuned_config, video_dit.VideoDiT)  # its EMA export
    base_params = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    moved = 0
    for path, variable in nnx.to_flat_state(nnx.state(tuned, nnx.Param)):
        if lora.is_adapter_path(path):
            moved += path[-1] == "b" and bool(np.asarray(variable.get_value()).any())
        else:  # the base, bitwise, in the EMA the run exported
            np.testing.assert_array_equal(variable.get_value(), base_params[path].get_value())
    assert moved == len(lora.TARGETS)  # no B left zero

    # Sampling loads the run merged: no adapters, the adapted model's function.
    run = dit_pipeline.load_dit_run(workdir, conditioning="text", mesh=meshes.mesh_from_config(
        ONE_DEVICE, jax.devices()[:1]))  # fmt: skip
    assert run.dit.config.lora_rank == 0 and not lora.adapters_of(run.dit)
    x = jax.random.normal(jax.random.key(0), (1, 8, 32, 32, 3))
    context = jax.random.normal(jax.random.key(1), (1, 4, tuned_config.text_dim))
    t = jnp.array([0.5])
    np.testing.assert_allclose(
        forward(run.dit, x, t, context), forward(tuned, x, t, context), atol=1e-5
    )
    with safe_open(os.path.join(workdir, video_dit_family.LORA_FILE), "np") as f:
        keys = set(f.keys())
    assert len(keys) == 2 * len(lora.TARGETS)
    assert all(k.startswith("transformer.blocks.0.") and ".lora_" in k for k in keys)
    assert param_export.read_export_record(os.path.join(workdir, rundir.PARAMS_DIR))


def test_lora_without_weights_and_unknown_weights_are_refused(runs, tmp_path):
    data_dir, clip_run, _ = runs
    config = video_stage(data_dir, clip_run, steps=1)
    config.lora.rank = 4
    with pytest.raises(UserError, match="config.model.weights is unset"):
        training.train(config, str(tmp_path / "a"), devices=jax.devices()[:1])
    config.model.weights = str(tmp_path)
    with pytest.raises(UserError, match="neither a video_dit run directory"):
        training.train(config, str(tmp_path / "b"), devices=jax.devices()[:1])
    config.model.weights = clip_run
    with pytest.raises(UserError, match="is a 'clip' run"):
        training.train(config, str(tmp_path / "c"), devices=jax.devices()[:1])
