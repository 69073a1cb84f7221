"""Import of diffusers' WanTransformer3DModel: forward parity with diffusers' PyTorch model on
seeded random weights (clip, still image, text mask off), scanned import, config translation,
and the errors for missing, mis-shaped, extra or truncated tensors and unsupported configs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion.errors import UserError
from diffusion.hf.files import CheckpointError
from diffusion.hf.wan_transformer import (
    load_diffusers_wan_transformer,
    video_dit_config_from_diffusers,
    video_dit_from_state_dict,
)
from diffusion.models import blocks

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Two layers, two heads of 16 (rotary split (8, 4, 4)), patch (1, 2, 2); out_channels differs
# from in_channels so that a swapped patch or channel order shows.
TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=6, text_dim=12, freq_dim=32, ffn_dim=40, num_layers=2,
)  # fmt: skip
BATCH, FRAMES, SIZE, TEXT = 2, 3, 8, 7
# Timesteps whose s / 1000 * 1000 is exact in float32, so both models embed the same number.
TIMESTEPS = (250.0, 750.0)


def random_wan(seed: int = 0, **overrides):
    """A WanTransformer3DModel with every parameter drawn anew: norm weights and modulation
    tables away from their constant initial values, so that a mis-mapped one shows."""
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**{**TINY_WAN, **overrides}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def wan_directory(tmp_path_factory):
    model = random_wan()
    directory = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(directory, safe_serialization=True)
    return model, str(directory)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, FRAMES, SIZE, SIZE, TINY_WAN["in_channels"]), np.float32)
    context = rng.standard_normal((BATCH, TEXT, TINY_WAN["text_dim"]), np.float32)
    return x, np.array(TIMESTEPS, np.float32), context


def diffusers_forward(model, x, timesteps, context) -> np.ndarray:
    """diffusers' forward on our channels-last clip: (B, T, H, W, C) -> (B, T, H, W, C_out)."""
    with torch.no_grad():
        out = model(
            torch.from_numpy(x).permute(0, 4, 1, 2, 3),  # (B, C, T, H, W)
            torch.from_numpy(timesteps),
            torch.from_numpy(context),
            return_dict=False,
        )[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_forward_equals_diffusers(wan_directory, inputs, scan_layers):
    theirs, directory = wan_directory
    ours, config = load_diffusers_wan_transformer(directory, scan_layers=scan_layers)
    assert config.scan_layers == scan_layers and config.width == 32
    x, timesteps, context = inputs
    expected = diffusers_forward(theirs, x, timesteps, context)
    graphdef, state = nnx.split(ours)
    # merge_here: a scanned stack cannot be closed over from outside the jit trace.
    run = jax.jit(lambda state, x, t, c: blocks.merge_here(graphdef, state)(x, t, c))
    forward = lambda x, t, c: run(state, x, t, c)
    got = forward(jnp.asarray(x), jnp.asarray(timesteps / 1000.0), jnp.asarray(context))
    assert float(np.max(np.abs(np.asarray(got) - expected))) <= 1e-4
    assert float(np.max(np.abs(expected))) > 0.1  # a comparison of something, not of zeros
    if not scan_layers:  # a still image is a one-frame clip for diffusers too
        image = forward(jnp.asarray(x[:, 0]), jnp.asarray(timesteps / 1000.0), context)
        expected_image = diffusers_forward(theirs, x[:, :1], timesteps, context)[:, 0]
        assert float(np.max(np.abs(np.asarray(image) - expected_image))) <= 1e-4


def test_a_state_dict_and_a_sharded_directory_convert_as_one_safetensors_file(
    wan_directory, tmp_path
):
    """The hub's Wan 14B transformer/ is sharded (an index and several safetensors files)."""
    theirs, directory = wan_directory
    loaded, config = load_diffusers_wan_transformer(directory)
    theirs.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert "diffusion_pytorch_model.safetensors.index.json" in os.listdir(tmp_path / "sharded")
    params = lambda model: dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    expected = params(loaded)
    for model in (
        video_dit_from_state_dict(theirs.state_dict(), config),
        load_diffusers_wan_transformer(str(tmp_path / "sharded"))[0],
    ):
        assert params(model).keys() == expected.keys()
        for path, variable in params(model).items():
            np.testing.assert_array_equal(variable.get_value(), expected[path].get_value())


def test_config_translation_and_refusals():
    raw = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1", **TINY_WAN}
    config = video_dit_config_from_diffusers(raw, dtype="bfloat16")
    assert (config.width, config.num_heads, config.depth, config.ffn_dim) == (32, 2, 2, 40)
    assert (config.in_channels, config.out_channels, config.patch_size) == (4, 6, (1, 2, 2))
    assert config.cross_attn_norm and config.qk_norm and config.dtype == "bfloat16"
    assert video_dit_config_from_diffusers({**raw, "out_channels": None}).out_channels == 4
    refusals = {
        "_class_name": ("AutoencoderKLWan", "not a WanTransformer3DModel"),
        "image_dim": (1280, "'image_dim' = 1280 is not supported: .*image-to-video"),
        "added_kv_proj_dim": (32, "'added_kv_proj_dim' = 32 .*image-to-video"),
        "qk_norm": ("rms_norm", "'qk_norm' = 'rms_norm' is not supported"),
        "window_size": ((4, 4), "field 'window_size' .* not supported.*supported fields"),
        "attention_head_dim": (15, "does not describe a valid video DiT: .*head dimension"),
    }
    for field, (value, message) in refusals.items():
        with pytest.raises(CheckpointError, match=message):
            video_dit_config_from_diffusers({**raw, field: value})


def copy_of(directory, tmp_path) -> str:
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return str(target)


def rewrite_weights(directory: str, change) -> None:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_tensor_errors_name_the_tensor(wan_directory, tmp_path):
    _, directory = wan_directory
    cases = {
        "missing": (
            lambda t: t.pop("blocks.1.attn2.norm_k.weight"),
            "tensor 'blocks.1.attn2.norm_k.weight' .* is missing",
        ),
        "mis-shaped": (
            lambda t: t.update({"proj_out.weight": np.zeros((24, 16), np.float32)}),
            r"'proj_out.weight' has shape \(24, 16\).*config.json implies \(24, 32\)",
        ),
        "extra": (
            lambda t: t.update({"blocks.2.norm2.weight": np.zeros(32, np.float32)}),
            "'blocks.2.norm2.weight' .* has no place",
        ),
    }
    for case, (change, message) in cases.items():
        target = copy_of(directory, tmp_path / case)
        rewrite_weights(target, change)
        with pytest.raises(CheckpointError, match=message):
            load_diffusers_wan_transformer(target)


def test_directory_errors(wan_directory, tmp_path):
    _, directory = wan_directory
    with pytest.raises(CheckpointError, match="does not exist"):
        load_diffusers_wan_transformer(str(tmp_path / "absent"))
    truncated = copy_of(directory, tmp_path / "truncated")
    weights = os.path.join(truncated, "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_diffusers_wan_transformer(truncated)
    pickled = copy_of(directory, tmp_path / "pickled")
    os.rename(weights.replace("truncated", "pickled"), os.path.join(pickled, "x.tmp"))
    open(os.path.join(pickled, "diffusion_pytorch_model.bin"), "w").close()
    with pytest.raises(CheckpointError, match=r"pickled.*WanTransformer3DModel.from_pretrained"):
        load_diffusers_wan_transformer(pickled)
    other = copy_of(directory, tmp_path / "other")
    with open(os.path.join(other, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump({**raw, "image_dim": 1280}, f)
    with pytest.raises(CheckpointError, match="image_dim"):
        load_diffusers_wan_transformer(other)
    with pytest.raises(UserError, match=r"unknown options \['width'\]"):
        load_diffusers_wan_transformer(directory, width=64)
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        load_diffusers_wan_transformer(directory, dtype="float8")
