"""umT5's encoder (Wan 2.1's text encoder) imported from transformers' UMT5EncoderModel.

Truths: transformers' PyTorch forward on the same seeded random weights (token states with
padding, float32, <= 1e-4), its relative-position bucketing, and the shapes and names of the
tensors it saves; errors name the tensor or field at fault.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.hf.files import CheckpointError
from diffusion.hf.umt5 import load_hf_umt5
from diffusion.models.umt5 import masked_states, relative_position_buckets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Two tiny configs: heads x head_dim equal to and different from the width, and short/long
# bucket ranges (offsets up to 40 reach the logarithmic buckets of the second).
CONFIGS = {
    "square": dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128),
    "wide_heads": dict(d_model=24, d_kv=10, num_heads=3, d_ff=40, num_layers=3,
                       relative_attention_num_buckets=16, relative_attention_max_distance=20),
}  # fmt: skip
VOCAB = 101


def save_random_umt5(directory, seed, **fields):
    """A seeded random transformers UMT5EncoderModel saved with save_pretrained."""
    torch.manual_seed(seed)
    config = transformers.UMT5Config(vocab_size=VOCAB, is_decoder=False, **fields)
    model = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():  # norms at 1 and biases at init hide mapping mistakes: randomise all
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(directory)
    return model


def tokens_and_mask(lengths, total):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, size=(len(lengths), total))
    mask = (np.arange(total)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return tokens * mask, mask  # padding id 0 after each caption


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    return directory, save_random_umt5(directory, seed=len(request.param), **CONFIGS[request.param])


def test_relative_position_buckets_equal_transformers_up_to_600_tokens():
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    for buckets, distance in ((32, 128), (16, 20)):
        config = transformers.UMT5Config(
            relative_attention_num_buckets=buckets, relative_attention_max_distance=distance
        )
        attention = UMT5Attention(config, has_relative_attention_bias=True)
        offsets = torch.arange(600)[None, :] - torch.arange(600)[:, None]
        want = attention._relative_position_bucket(offsets).numpy()
        np.testing.assert_array_equal(relative_position_buckets(600, 600, buckets, distance), want)


def test_token_states_equal_transformers_with_padding(saved):
    directory, reference = saved
    encoder, config = load_hf_umt5(directory)
    tokens, mask = tokens_and_mask([13, 5, 40], 40)
    with torch.no_grad():
        want = reference(
            input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.numpy()
    got = np.asarray(jax.jit(lambda t, m: encoder(t, m))(jnp.asarray(tokens), jnp.asarray(mask)))
    assert got.shape == (3, 40, config.width)
    print(f"umT5 token states: max |ours - transformers| = {np.max(np.abs(got - want)):.2e}")
    assert np.max(np.abs(got - want)) <= 1e-4
    # A caption's real-token states do not depend on how much padding follows it.
    short = np.asarray(encoder(jnp.asarray(tokens[:1, :13]), jnp.asarray(mask[:1, :13])))
    np.testing.assert_allclose(short[0], got[0, :13], atol=1e-5)
    zeroed = np.asarray(masked_states(jnp.asarray(got), jnp.asarray(mask)))
    assert np.all(zeroed[1, 5:] == 0) and np.array_equal(zeroed[1, :5], got[1, :5])


def test_weights_are_placed_on_their_shards_on_a_mesh(saved):
    directory, _ = saved
    from diffusion import meshes, sharding

    mesh = meshes.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, jax.devices()[:8])
    encoder, config = load_hf_umt5(directory, mesh=mesh)
    query = encoder.blocks[0].attention.query[...]  # (width, heads, head_dim)
    spec = tuple(query.sharding.spec)
    assert spec[0] == "fsdp" and query.addressable_shards[0].data.shape[0] == config.width // 2
    if config.num_heads % 4 == 0:  # 3 heads do not split 4 ways: replicated, with a warning
        assert spec[1] == "tensor"
    tokens, mask = tokens_and_mask([7, 3], 12)
    single, _ = load_hf_umt5(directory)
    with sharding.activate(mesh):
        sharded = jax.jit(lambda t, m: encoder(t, m))(jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(sharded, single(jnp.asarray(tokens), jnp.asarray(mask)), atol=2e-5)


def _rewrite(directory, tmp_path, edit_config=None, edit_tensors=None):
    from safetensors.numpy import load_file, save_file

    target = tmp_path / "edited"
    target.mkdir()
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (target / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(target / "model.safetensors"))
    return str(target)


BAD_CHECKPOINTS = {
    "missing tensor": (
        None,
        lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wi_1.weight"),
        "'encoder.block.1.layer.1.DenseReluDense.wi_1.weight'.*missing",
    ),
    "mis-shaped tensor": (
        None,
        lambda t: t.update({"encoder.final_layer_norm.weight": np.ones(7, np.float32)}),
        r"'encoder.final_layer_norm.weight' has shape \(7,\).*implies",
    ),
    "extra tensor": (
        None,
        lambda t: t.update({"encoder.block.9.layer.0.layer_norm.weight": np.ones(2, np.float32)}),
        "'encoder.block.9.layer.0.layer_norm.weight'.*has no place",
    ),
    "t5, not umt5": (lambda c: c.update(model_type="t5"), None, "model_type 't5', not 'umt5'"),
    "relu feed-forward": (
        lambda c: c.update(feed_forward_proj="relu"),
        None,
        "'feed_forward_proj' = 'relu' is not supported",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_refused_naming_what_is_wrong(case, tmp_path):
    directory = str(tmp_path / "good")
    save_random_umt5(directory, seed=0, **CONFIGS["square"])
    edit_config, edit_tensors, message = BAD_CHECKPOINTS[case]
    with pytest.raises(CheckpointError, match=message):
        load_hf_umt5(_rewrite(directory, tmp_path, edit_config, edit_tensors))


def test_a_truncated_weights_file_is_named(tmp_path):
    directory = str(tmp_path / "good")
    save_random_umt5(directory, seed=0, **CONFIGS["square"])
    path = os.path.join(directory, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or damaged"):
        load_hf_umt5(directory)
