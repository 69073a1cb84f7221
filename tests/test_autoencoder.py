"""The KL autoencoder (diffusion.models.autoencoder) and the import of diffusers' AutoencoderKL
directories (diffusion.hf.autoencoder): parity with diffusers' PyTorch forward on tiny random
models saved with save_pretrained into a temporary directory (no downloads), clear errors on bad
directories, and logical axis names on every parameter."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion import sharding
from diffusion.hf import CheckpointError, load_diffusers_autoencoder
from diffusion.models import layers
from diffusion.models.autoencoder import Autoencoder, AutoencoderConfig, autoencoder_config

WEIGHTS = "diffusion_pytorch_model.safetensors"
TOLERANCE = 1e-4  # max abs difference with diffusers, float32

DIFFUSERS_CONFIGS = {
    # Stable Diffusion 1.x-like: 4 latent channels, quant convs, two levels (f = 2)
    "sd": dict(
        latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=16, scaling_factor=0.18215,
    ),
    # Flux-like: 16 latent channels, no quant convs, shifted latents, three levels (f = 4) whose
    # last two have the same width (no shortcut convolution there)
    "flux": dict(
        latent_channels=16, block_out_channels=(8, 16, 16), layers_per_block=1,
        norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ),
}  # fmt: skip


def make_diffusers_vae(spec: dict, seed: int = 0):
    """A diffusers AutoencoderKL with seeded random weights, GroupNorm affine parameters and
    biases included (their defaults, ones and zeros, would hide a tensor we fail to load)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(spec["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **spec,
    ).eval()
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if parameter.ndim == 1:  # GroupNorm scales and every bias
                offset = 1.0 if name.endswith("weight") else 0.0
                parameter.copy_(offset + 0.3 * torch.randn_like(parameter))
    return vae


@pytest.fixture(scope="module", params=sorted(DIFFUSERS_CONFIGS))
def saved(request, tmp_path_factory):
    """(name, directory, diffusers model) of one tiny config, saved once per module."""
    name = request.param
    vae = make_diffusers_vae(DIFFUSERS_CONFIGS[name])
    directory = tmp_path_factory.mktemp(f"vae_{name}")
    vae.save_pretrained(directory, safe_serialization=True)
    return name, directory, vae


@pytest.fixture(scope="module")
def imported(saved):
    model, config = load_diffusers_autoencoder(str(saved[1]))
    return model, config


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    """The SD-like directory, for the error tests."""
    directory = tmp_path_factory.mktemp("vae_errors")
    make_diffusers_vae(DIFFUSERS_CONFIGS["sd"]).save_pretrained(directory, safe_serialization=True)
    return directory


def to_torch(x):  # NHWC numpy -> NCHW torch
    import torch

    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), dtype=torch.float32)


def to_nhwc(tensor) -> np.ndarray:
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ============================================================================================
# Parity with diffusers
# ============================================================================================


def test_encode_and_decode_match_diffusers(saved, imported):
    import torch

    name, _, vae = saved
    model, config = imported
    size = DIFFUSERS_CONFIGS[name]["sample_size"]
    images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(to_torch(images)).latent_dist
        reference_mean, reference_logvar = to_nhwc(posterior.mean), to_nhwc(posterior.logvar)
        reference_images = to_nhwc(vae.decode(posterior.mean).sample)

    mean, logvar = model.encode(jnp.asarray(images))
    factor = config.downsampling_factor
    assert mean.shape == (2, size // factor, size // factor, config.latent_channels)
    assert max_abs(mean, reference_mean) <= TOLERANCE
    assert max_abs(logvar, reference_logvar) <= TOLERANCE
    decoded = model.decode(jnp.asarray(reference_mean))
    assert decoded.shape == images.shape
    assert max_abs(decoded, reference_images) <= TOLERANCE


def test_config_and_latent_scaling_follow_diffusers(saved, imported):
    name, _, vae = saved
    model, config = imported
    spec = DIFFUSERS_CONFIGS[name]
    assert config.block_out_channels == spec["block_out_channels"]
    assert config.latent_channels == spec["latent_channels"]
    assert config.use_quant_conv == spec.get("use_quant_conv", True)
    assert (model.quant_conv is None) == (not config.use_quant_conv)
    assert config.scaling_factor == spec["scaling_factor"]
    assert config.shift_factor == spec.get("shift_factor")
    latents = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, config.latent_channels)))
    # What diffusers pipelines do: SD scales, Flux shifts then scales, and the inverse to decode.
    shift = vae.config.shift_factor or 0.0
    expected = (np.asarray(latents) - shift) * vae.config.scaling_factor
    np.testing.assert_allclose(model.scale_latents(latents), expected, rtol=1e-6)
    np.testing.assert_allclose(model.unscale_latents(model.scale_latents(latents)), latents,
                               atol=1e-6)  # fmt: skip


def test_tiled_decode_matches_diffusers(saved, imported):
    """Latents of 14 x 10 in 8 x 8 tiles every 6 latents: a 3 x 2 grid whose last row and
    column are narrower tiles; diffusers' tiled decode with the same tile and overlap."""
    import torch

    name, _, vae = saved
    model, config = imported
    latents = np.random.default_rng(2).normal(size=(2, 14, 10, config.latent_channels))
    latents = latents.astype(np.float32)
    with torch.no_grad():
        if name == "sd":  # explicit tile sizes: 8 latents (16 pixels), a quarter overlapping
            vae.tile_sample_min_size, vae.tile_latent_min_size = 16, 8
            vae.tile_overlap_factor = 0.25
            reference = to_nhwc(vae.tiled_decode(to_torch(latents)).sample)
            ours = model.tiled_decode(jnp.asarray(latents), tile=8, overlap=2)
        else:  # the defaults of both: tiles of sample_size pixels, overlap factor 0.25
            vae.enable_tiling()
            try:
                reference = to_nhwc(vae.decode(to_torch(latents)).sample)
            finally:
                vae.disable_tiling()
            ours = model.tiled_decode(jnp.asarray(latents))
        plain = to_nhwc(vae.decode(to_torch(latents)).sample)
    factor = config.downsampling_factor
    assert ours.shape == (2, 14 * factor, 10 * factor, 3)
    assert max_abs(ours, reference) <= TOLERANCE
    assert max_abs(ours, plain) > 10 * TOLERANCE  # tiles do differ from one whole decode


def test_legacy_attention_names_and_sharded_weights(saved, imported, tmp_path):
    """query/key/value/proj_attn (diffusers < 0.15) and a sharded safetensors index import to
    the same parameters."""
    from safetensors.numpy import load_file, save_file

    _, directory, vae = saved
    model, _ = imported
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for name, value in load_file(directory / WEIGHTS).items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        tensors[name] = value
    assert any(".proj_attn." in name for name in tensors)
    (tmp_path / "legacy").mkdir()
    shutil.copy(directory / "config.json", tmp_path / "legacy" / "config.json")
    save_file(tensors, str(tmp_path / "legacy" / WEIGHTS))
    vae.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / f"{WEIGHTS}.index.json")

    expected = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for variant in ("legacy", "sharded"):
        other, _ = load_diffusers_autoencoder(str(tmp_path / variant))
        flat = dict(nnx.to_flat_state(nnx.state(other, nnx.Param)))
        for path, variable in expected:
            np.testing.assert_array_equal(flat[path][...], variable[...], err_msg=str(path))


# ============================================================================================
# Logical axis names
# ============================================================================================


def test_every_parameter_has_logical_axis_names(imported):
    model, config = imported
    fresh = nnx.eval_shape(lambda: Autoencoder(config, rngs=nnx.Rngs(0)))  # as trained
    for module in (model, fresh):
        state = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
        for path, names in layers.logical_axes_of(module).items():
            shape = state[tuple(int(p) if p.isdigit() else p for p in path.split("/"))].shape
            assert names is not None and len(names) == len(shape), (path, names, shape)
            assert set(names) <= set(sharding.PARAMETER_AXIS_NAMES), (path, names)
            if path.endswith("kernel") and len(shape) == 4:
                assert names == ("height", "width", "conv_in", "channels"), path


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="width 12 is not divisible by norm_num_groups 8"):
        AutoencoderConfig(block_out_channels=(16, 12))
    with pytest.raises(ValueError, match="unknown autoencoder variant 'SDXL'"):
        autoencoder_config("SDXL")
    assert autoencoder_config("Flux").latent_channels == 16
    model = Autoencoder(AutoencoderConfig(block_out_channels=(8,), norm_num_groups=4),
                        rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match=r"images of shape \(1, 8, 8, 4\).*3 channels"):
        model.encode(jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="latent_channels"):
        model.decode(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="overlap 8 must be in"):
        model.tiled_decode(jnp.zeros((1, 8, 8, 4)), tile=8, overlap=8)


# ============================================================================================
# Errors on bad directories
# ============================================================================================


def variant_directory(tmp_path, saved_sd, config=None, tensors=None):
    """A copy of the saved SD-like directory with config.json and/or the tensors edited."""
    from safetensors.numpy import load_file, save_file

    raw = json.loads((saved_sd / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config(raw) if config else raw))
    if tensors is None:
        os.symlink(saved_sd / WEIGHTS, tmp_path / WEIGHTS)
    else:
        save_file(tensors(load_file(saved_sd / WEIGHTS)), str(tmp_path / WEIGHTS))
    return str(tmp_path)


def edited(mapping, **changes):
    out = dict(mapping)
    for key, value in changes.items():
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    "tensors, message",
    [
        (lambda t: edited(t, **{"decoder.conv_out.bias": None}),
         r"tensor 'decoder.conv_out.bias' \(expected shape \(3,\).*missing"),
        (lambda t: edited(t, **{"encoder.conv_in.weight": np.zeros((8, 3, 1, 1), np.float32)}),
         r"'encoder.conv_in.weight' has shape \(8, 3, 1, 1\).*implies \(8, 3, 3, 3\)"),
        (lambda t: edited(t, **{"encoder.mid_block.attentions.0.to_q.weight": None}),
         "'encoder.mid_block.attentions.0.to_q.weight'.*missing"),
        (lambda t: edited(t, **{"decoder.extra.weight": np.zeros((2,), np.float32)}),
         r"tensor 'decoder.extra.weight' \(shape \(2,\)\) has no place"),
    ],
    ids=["missing", "mis-shaped", "missing-attention", "unexpected"],
)  # fmt: skip
def test_bad_tensors_are_named(tmp_path, saved_sd, tensors, message):
    with pytest.raises(CheckpointError, match=message):
        load_diffusers_autoencoder(variant_directory(tmp_path, saved_sd, tensors=tensors))


@pytest.mark.parametrize(
    "config, message",
    [
        (lambda c: edited(c, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
         "'down_block_types'.*not supported.*DownEncoderBlock2D"),
        (lambda c: edited(c, up_block_types=["UpDecoderBlock2D"]),
         "'up_block_types'.*2 x 'UpDecoderBlock2D'"),
        (lambda c: edited(c, act_fn="gelu"), "'act_fn' = 'gelu' is not supported"),
        (lambda c: edited(c, latents_mean=[0.0] * 4), "'latents_mean'.*not supported"),
        (lambda c: edited(c, use_spatial_norm=True), "field 'use_spatial_norm'.*not supported"),
        (lambda c: edited(c, _class_name="AutoencoderTiny"), "'AutoencoderTiny', not an Autoenc"),
        (lambda c: edited(c, norm_num_groups=3), "not divisible by norm_num_groups 3"),
    ],
    ids=["down-block", "up-blocks", "act_fn", "latents_mean", "unknown", "class", "groups"],
)  # fmt: skip
def test_unsupported_config_is_named(tmp_path, saved_sd, config, message):
    with pytest.raises(CheckpointError, match=message):
        load_diffusers_autoencoder(variant_directory(tmp_path, saved_sd, config=config))


def test_ignored_and_supported_config_fields(tmp_path, saved_sd):
    """force_upcast is a pipeline hint; use_quant_conv false drops the quant conv tensors."""

    def no_quant(c):
        return edited(c, force_upcast=False, use_quant_conv=False)

    def drop(t):
        return edited(t, **{"quant_conv.weight": None, "quant_conv.bias": None})

    directory = variant_directory(tmp_path, saved_sd, config=no_quant, tensors=drop)
    model, config = load_diffusers_autoencoder(directory, dtype="bfloat16")
    assert model.quant_conv is None and config.dtype == "bfloat16"


def test_truncated_weights_file_is_named(tmp_path, saved_sd):
    shutil.copytree(saved_sd, tmp_path / "vae")
    weights = tmp_path / "vae" / WEIGHTS
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError) as raised:
        load_diffusers_autoencoder(str(tmp_path / "vae"))
    assert str(weights) in str(raised.value) and "truncated or damaged" in str(raised.value)


def test_pickled_only_directory_is_refused(tmp_path, saved_sd):
    shutil.copy(saved_sd / "config.json", tmp_path / "config.json")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(
        CheckpointError,
        match=r"only has pickled PyTorch weights \(\['diffusion_pytorch_model.bin'\]\).*refused"
        r".*diffusers.AutoencoderKL.from_pretrained\(dir\).*safe_serialization=True.*"
        r"diffusion_pytorch_model.safetensors",
    ):
        load_diffusers_autoencoder(str(tmp_path))
    os.remove(tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="has no diffusion_pytorch_model.safetensors"):
        load_diffusers_autoencoder(str(tmp_path))
