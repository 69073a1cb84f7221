"""Wan 2.1's causal 3-D autoencoder (diffusion.models.wan_vae) and the import of diffusers'
AutoencoderKLWan directories (diffusion.hf.wan_vae): parity with diffusers' PyTorch encode and
decode (both chunked, with the temporal feature cache) on a tiny random model saved with
save_pretrained into a temporary directory (no downloads), the per-channel latent
normalisation, and clear errors on bad directories."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import sharding
from diffusion.hf.files import CheckpointError
from diffusion.hf.wan_vae import load_diffusers_wan_vae
from diffusion.models import layers

WEIGHTS = "diffusion_pytorch_model.safetensors"
TOLERANCE = 1e-4  # max abs difference with diffusers, float32
FRAMES, SIDE = 9, 16  # 1 + 2 chunks of 4 frames; latents (3, 2, 2) with f_t = 4, f_s = 8

# Wan 2.1's structure at a tiny width: 4 levels, the first resampling spatial only, the last two
# also temporal; a decoder base width of its own (so a swapped encoder/decoder width shows).
TINY_WAN = dict(
    base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.3, -0.2, 0.1, -0.5], latents_std=[1.5, 0.5, 2.0, 0.8],
    scale_factor_temporal=4, scale_factor_spatial=8,
)  # fmt: skip


def make_diffusers_wan_vae(seed: int = 0):
    """A diffusers AutoencoderKLWan with seeded random weights for every parameter: the norms'
    gammas (default ones) and biases (default zeros) too, so a tensor we fail to load shows."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**TINY_WAN).eval()
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if name.endswith("gamma"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            elif parameter.ndim == 1:
                parameter.copy_(0.1 * torch.randn_like(parameter))
    return vae


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory, diffusers model) of the tiny Wan autoencoder saved with save_pretrained."""
    vae = make_diffusers_wan_vae()
    directory = str(tmp_path_factory.mktemp("wan_vae"))
    vae.save_pretrained(directory, safe_serialization=True)
    return directory, vae


@pytest.fixture(scope="module")
def imported(saved):
    model, config = load_diffusers_wan_vae(saved[0])
    return model, config


@pytest.fixture(scope="module")
def clip():
    """Two seeded random clips (B, T, H, W, C) in [-1, 1]."""
    return np.random.default_rng(0).uniform(-1, 1, (2, FRAMES, SIDE, SIDE, 3)).astype(np.float32)


def to_torch(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))  # NCTHW


def from_torch(x) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 4, 1)  # NTHWC


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ============================================================================================
# Parity with diffusers
# ============================================================================================


def test_decode_matches_diffusers(saved, imported):
    import torch

    _, vae = saved
    model, config = imported
    latents = np.random.default_rng(1).normal(size=(2, 3, 2, 2, config.z_dim)).astype(np.float32)
    with torch.no_grad():
        expected = from_torch(vae.decode(to_torch(latents)).sample)
    decoded = np.asarray(model.decode(jnp.asarray(latents)))
    assert decoded.shape == expected.shape == (2, FRAMES, SIDE, SIDE, 3)
    # Most values inside the clamp: the comparison is not between two saturated outputs.
    assert np.mean(np.abs(expected) < 1) > 0.9
    assert max_abs(decoded, expected) <= TOLERANCE


def test_encode_matches_diffusers(saved, imported, clip):
    import torch

    _, vae = saved
    model, config = imported
    with torch.no_grad():
        posterior = vae.encode(to_torch(clip)).latent_dist
    mean, logvar = model.encode(jnp.asarray(clip))
    assert mean.shape == (2, config.latent_frames(FRAMES), 2, 2, config.z_dim) == (2, 3, 2, 2, 4)
    assert max_abs(mean, from_torch(posterior.mean)) <= TOLERANCE
    assert max_abs(logvar, from_torch(posterior.logvar)) <= TOLERANCE


def test_first_frame_is_encoded_alone(imported, clip):
    """Causality: the first latent frame depends on the first frame only, so a one-frame clip
    (an image) gets the same first latent as the whole clip."""
    model, _ = imported
    whole, _ = model.encode(jnp.asarray(clip))
    image, _ = model.encode(jnp.asarray(clip[:, :1]))
    assert image.shape[1] == 1
    assert max_abs(image[:, 0], whole[:, 0]) <= 1e-5


def test_latent_normalisation_is_per_channel(saved, imported):
    model, config = imported
    with open(os.path.join(saved[0], "config.json")) as f:
        raw = json.load(f)
    mean, std = np.array(raw["latents_mean"]), np.array(raw["latents_std"])
    latents = np.random.default_rng(2).normal(size=(2, 3, 2, 2, 4)).astype(np.float32)
    normalized = np.asarray(model.normalize_latents(jnp.asarray(latents)))
    np.testing.assert_allclose(normalized, (latents - mean) / std, rtol=1e-6, atol=1e-6)
    restored = np.asarray(model.denormalize_latents(jnp.asarray(normalized)))
    np.testing.assert_allclose(restored, latents, rtol=1e-5, atol=1e-5)


def test_every_parameter_has_logical_axis_names(imported):
    model, _ = imported
    for path, names in layers.logical_axes_of(model).items():
        assert names is not None and set(names) <= set(sharding.PARAMETER_AXIS_NAMES), path
        if path.endswith("/conv/kernel"):  # every causal 3-D convolution
            assert names == ("frames", "height", "width", "conv_in", "channels"), path


def test_clip_length_and_shape_errors(imported, clip):
    model, _ = imported
    with pytest.raises(ValueError, match=r"6 frames.*1 \+ 4k frames \(e.g. 5 or 9\)"):
        model.encode(jnp.asarray(clip[:, :6]))
    with pytest.raises(ValueError, match="latents of shape .*z_dim"):
        model.decode(jnp.zeros((1, 2, 2, 2, 3)))


# ============================================================================================
# Bad directories
# ============================================================================================


def copy_with_tensors(tmp_path, saved, edit) -> str:
    """A copy of the saved directory whose tensors `edit(dict)` changed."""
    from safetensors.numpy import load_file, save_file

    directory = str(tmp_path / "edited")
    shutil.copytree(saved[0], directory)
    tensors = load_file(os.path.join(directory, WEIGHTS))
    edit(tensors)
    save_file(tensors, os.path.join(directory, WEIGHTS))
    return directory


def copy_with_config(tmp_path, saved, **changes) -> str:
    directory = str(tmp_path / "edited")
    shutil.copytree(saved[0], directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        raw = json.load(f)
    with open(path, "w") as f:
        json.dump({**raw, **changes}, f)
    return directory


def test_missing_tensor_is_named(tmp_path, saved):
    name = "decoder.up_blocks.1.upsamplers.0.time_conv.weight"
    directory = copy_with_tensors(tmp_path, saved, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"'{name}'.*missing"):
        load_diffusers_wan_vae(directory)


def test_misshaped_tensor_is_named(tmp_path, saved):
    name = "encoder.mid_block.attentions.0.to_qkv.weight"

    def reshape(tensors):
        tensors[name] = np.zeros((48, 8, 1, 1), np.float32)  # the width is 16

    directory = copy_with_tensors(tmp_path, saved, reshape)
    expected = rf"'{name}' has shape \(48, 8, 1, 1\).*implies \(48, 16, 1, 1\)"
    with pytest.raises(CheckpointError, match=expected):
        load_diffusers_wan_vae(directory)
    # A tensor the config has no place for is named too.
    directory = copy_with_tensors(
        tmp_path / "extra", saved, lambda t: t.update(extra=np.zeros(2, np.float32))
    )
    with pytest.raises(CheckpointError, match="'extra'.*no place"):
        load_diffusers_wan_vae(directory)


def test_truncated_weights_file_is_named(tmp_path, saved):
    directory = str(tmp_path / "truncated")
    shutil.copytree(saved[0], directory)
    weights = os.path.join(directory, WEIGHTS)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_diffusers_wan_vae(directory)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(is_residual=True), "'is_residual' = True.*Wan 2.2"),
        (dict(patch_size=2), "'patch_size' = 2"),
        (dict(attn_scales=[0.5]), "'attn_scales'"),
        (dict(scale_factor_spatial=16), "'scale_factor_spatial' = 16.*imply 8"),
        (dict(temperal_downsample=[True, True, True]), "at most 2"),
        (dict(latents_std=[1.0, 1.0]), "latents_std has 2 entries"),
        (dict(use_tiling=True), "'use_tiling'.*not supported"),
        (dict(_class_name="AutoencoderKL"), "not an AutoencoderKLWan"),
    ],
)
def test_unsupported_config_is_named(tmp_path, saved, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load_diffusers_wan_vae(copy_with_config(tmp_path, saved, **changes))
