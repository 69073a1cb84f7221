"""Optimizer from config: schedule vs float64 formula, decay mask, accumulation, EMA."""

import math

import jax
import jax.numpy as jnp
import multiprocess_worker as worker
import numpy as np
import optax
import pytest
from flax import nnx

from diffusion import optim

BASE = {
    "learning_rate": 1e-2,
    "schedule": "cosine",
    "warmup_steps": 3,
    "total_steps": 12,
    "end_lr_fraction": 0.1,
    "weight_decay": 0.05,
    "b1": 0.9,
    "b2": 0.99,
    "eps": 1e-8,
    "grad_clip_norm": 1.0,
    "accumulation_steps": 1,
}


def cosine_with_warmup_float64(step, peak, warmup, total, end_fraction):
    """lr(s) = peak s / warmup, then end + (peak - end)(1 + cos(pi (s - w)/(T - w)))/2."""
    if step < warmup:
        return peak * step / warmup
    end = peak * end_fraction
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_cosine_schedule_matches_float64_formula():
    schedule = optim.make_learning_rate_schedule(
        3e-4, "cosine", warmup_steps=10, total_steps=100, end_lr_fraction=0.1
    )
    for step in [0, 1, 5, 9, 10, 11, 37, 50, 99, 100, 150]:
        want = cosine_with_warmup_float64(step, 3e-4, 10, 100, 0.1)
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6, atol=1e-12)


def test_constant_schedule_with_warmup():
    schedule = optim.make_learning_rate_schedule(2e-3, "constant", warmup_steps=4)
    got = [float(schedule(s)) for s in range(8)]
    np.testing.assert_allclose(got, [0, 5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3, 2e-3], rtol=1e-6)
    no_warmup = optim.make_learning_rate_schedule(2e-3, "constant")
    assert float(no_warmup(0)) == pytest.approx(2e-3)


def test_bad_schedule_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        optim.make_learning_rate_schedule(1e-3, "linear", total_steps=10)
    with pytest.raises(ValueError, match="total_steps > warmup_steps"):
        optim.make_learning_rate_schedule(1e-3, "cosine", warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="accumulation_steps must be >= 1"):
        optim.make_optimizer(dict(BASE, accumulation_steps=0))


class MixedModel(nnx.Module):
    """One of each kind of parameter a CLIP / DiT has."""

    def __init__(self, rngs):
        self.token_embed = nnx.Embed(10, 8, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((4, 8)))
        self.cls_token = nnx.Param(jnp.zeros((1, 8)))
        self.logit_scale = nnx.Param(jnp.zeros(()))
        self.patch = nnx.Conv(3, 8, (2, 2), rngs=rngs)
        self.attention = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
        self.mlp = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)


# By hand from the rule in diffusion/optim.py: only >= 2-D 'kernel' leaves decay.
EXPECTED_DECAY = {
    "token_embed/embedding": False,
    "pos_embed": False,
    "cls_token": False,
    "logit_scale": False,
    "patch/kernel": True,
    "patch/bias": False,
    "attention/kernel": True,
    "attention/bias": False,
    "mlp/kernel": True,
    "mlp/bias": False,
    "norm/scale": False,
    "norm/bias": False,
}


def _flat(state):
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def test_weight_decay_mask_of_a_mixed_model():
    params = nnx.state(MixedModel(nnx.Rngs(0)), nnx.Param)
    assert _flat(optim.weight_decay_mask(params)) == EXPECTED_DECAY
    # Plain nested dicts work the same way.
    plain = {
        "mlp": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)},
        "pos_embed": np.zeros((2, 2)),
    }
    assert optim.weight_decay_mask(plain) == {
        "mlp": {"kernel": True, "bias": False},
        "pos_embed": False,
    }


def test_decay_is_applied_exactly_to_the_masked_parameters():
    model = MixedModel(nnx.Rngs(0))
    params = jax.tree.map(lambda x: x + 1.0, nnx.state(model, nnx.Param))  # nonzero everywhere
    config = dict(BASE, schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip_norm=0)
    tx = optim.make_optimizer(config)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients Adam's step is 0, leaving only -lr * wd * p on decayed parameters.
    for name, update in _flat(updates).items():
        before = _flat(params)[name]
        want = -1e-2 * 0.5 * before if EXPECTED_DECAY[name] else np.zeros_like(before)
        np.testing.assert_allclose(update, want, rtol=1e-6, atol=0, err_msg=name)


def _toy_params_and_loss():
    with nnx.use_eager_sharding(False):
        model = worker.ToyModel(nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params, batch):
        prediction = nnx.merge(graphdef, params)(batch["tokens"])
        return jnp.mean((prediction - batch["targets"]) ** 2)

    return params, loss


def test_accumulating_4_micro_batches_of_16_equals_one_step_of_64():
    params, loss = _toy_params_and_loss()
    big = optim.make_optimizer(BASE)
    small = optim.make_optimizer(dict(BASE, accumulation_steps=4))

    def step(tx, params, opt_state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(step, static_argnums=0)
    big_params, big_state = params, big.init(params)
    small_params, small_state = params, small.init(params)
    for update in range(3):
        batch = worker.global_batch(update, 64)
        big_params, big_state = step(big, big_params, big_state, batch)
        for micro in range(4):
            rows = slice(16 * micro, 16 * (micro + 1))
            micro_batch = {k: v[rows] for k, v in batch.items()}
            small_params, small_state = step(small, small_params, small_state, micro_batch)
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(big_params), jax.tree.leaves(params), strict=True)
    )
    assert moved > 1e-3  # the comparison is not between two unchanged copies
    for a, b in zip(jax.tree.leaves(small_params), jax.tree.leaves(big_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_learning_rate_is_readable_from_the_state():
    params, _ = _toy_params_and_loss()
    tx = optim.make_optimizer(BASE)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(5):
        _, state = tx.update(grads, state, params)
    # The 5th update (count 4) used lr(4).
    want = cosine_with_warmup_float64(4, 1e-2, 3, 12, 0.1)
    np.testing.assert_allclose(optim.learning_rate_from_state(state), want, rtol=1e-6)


def test_ema_update_matches_the_geometric_closed_form():
    ema = {"w": np.array([1.0, -2.0], np.float32), "b": np.array(3.0, np.float32)}
    target = {"w": np.array([0.5, 0.5], np.float32), "b": np.array(-1.0, np.float32)}
    decay = 0.9
    for _ in range(7):
        ema = optim.ema_update(ema, target, decay)
    # e_k = p + decay^k (e_0 - p)
    np.testing.assert_allclose(ema["w"], 0.5 + 0.9**7 * (np.array([1.0, -2.0]) - 0.5), rtol=1e-6)
    np.testing.assert_allclose(ema["b"], -1.0 + 0.9**7 * 4.0, rtol=1e-6)
    bf16 = optim.ema_update({"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.zeros(2)}, 0.5)
    assert bf16["w"].dtype == jnp.bfloat16


def test_ema_decay_warmup():
    got = [float(optim.ema_decay_at(s, 0.999)) for s in (0, 10, 1000, 10**6)]
    np.testing.assert_allclose(got, [1 / 10, 11 / 20, 1001 / 1010, 0.999], rtol=1e-6)
    assert float(optim.ema_decay_at(0, 0.999, warmup=False)) == pytest.approx(0.999)
    with pytest.raises(ValueError, match="EMA decay must be in"):
        optim.ema_decay_at(0, 1.0)


# ------------------------------------------------------------------------------------------------
# Muon
# ------------------------------------------------------------------------------------------------

MUON = dict(BASE, name="muon", schedule="constant", warmup_steps=0, grad_clip_norm=0.0)


def _normal_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x)), jnp.float32), tree)


@pytest.mark.parametrize("ns_steps", [5, 3])
def test_muon_is_optax_muon_on_a_matrix_and_adamw_elsewhere(ns_steps):
    """References: optax.contrib.muon with the consistent update RMS 0.2 of Liu et al. (2025)
    and `muon_ns_steps` Newton-Schulz iterations for the matrix, optax.adamw for the bias
    (weight decay on the matrix only, as AdamW's)."""
    params = {"kernel": _normal_like(jnp.zeros((8, 16)), 0), "bias": jnp.ones(16)}
    tx = optim.make_optimizer(dict(MUON, weight_decay=0.0, muon_ns_steps=ns_steps))
    matrix_reference = optax.contrib.muon(1e-2, beta=0.95, consistent_rms=0.2, ns_steps=ns_steps)
    rest_reference = optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0)
    state = tx.init(params)
    matrix_state = matrix_reference.init({"kernel": params["kernel"]})
    rest_state = rest_reference.init({"bias": params["bias"]})
    for step in range(3):
        grads = _normal_like(params, 10 + step)
        updates, state = tx.update(grads, state, params)
        want_matrix, matrix_state = matrix_reference.update(
            {"kernel": grads["kernel"]}, matrix_state, {"kernel": params["kernel"]}
        )
        want_rest, rest_state = rest_reference.update(
            {"bias": grads["bias"]}, rest_state, {"bias": params["bias"]}
        )
        np.testing.assert_allclose(updates["kernel"], want_matrix["kernel"], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(updates["bias"], want_rest["bias"], rtol=1e-6, atol=1e-9)
        # An orthogonalised update at AdamW's RMS: about 0.2 lr, whatever the gradient's scale.
        rms = float(jnp.sqrt(jnp.mean(updates["kernel"] ** 2)))
        assert 0.1 * 1e-2 < rms < 0.3 * 1e-2
        params = optax.apply_updates(params, updates)


def _dit_params(scan_layers: bool, output_conv: bool = False):
    from diffusion.models import dit

    config = dit.DiTConfig(
        width=32, depth=2, num_heads=2, context_dim=16, pooled_dim=16,
        word_conditioning=True, scan_layers=scan_layers, output_conv=output_conv,
    )  # fmt: skip
    with nnx.use_eager_sharding(False):
        return nnx.state(dit.DiT(config, rngs=nnx.Rngs(0)), nnx.Param)


def _muon_leaves(params):
    """{path: MuonDimensionNumbers} of the parameters Muon orthogonalises."""
    dims = optim.muon_dimension_numbers(params)
    return {name: d for name, d in _flat(dims).items() if d is not None}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_muon_orthogonalises_each_hidden_projection_as_one_matrix(scan_layers):
    """Attention's (width, heads, head_dim) input kernels and (heads, head_dim, width) output
    kernels are the matrices Dense layers would be; scanned blocks are one matrix per layer. The
    reference: optax's Muon on each parameter reshaped to that 2-D matrix, one layer at a time."""
    params = _dit_params(scan_layers)
    grads = _normal_like(params, 0)
    updates, _ = optim.make_optimizer(dict(MUON, weight_decay=0.0)).update(
        grads, optim.make_optimizer(MUON).init(params), params
    )
    muon = optax.contrib.muon(1e-2, beta=0.95, consistent_rms=0.2)
    reference = jax.jit(lambda g: muon.update(g, muon.init(g), jax.tree.map(jnp.zeros_like, g))[0])
    muon_leaves = _muon_leaves(params)
    assert muon_leaves, "no parameter is on Muon"
    for name, dims in muon_leaves.items():
        grad, update = _flat(grads)[name], _flat(updates)[name]
        layers = grad.shape[0] if scan_layers and "blocks" in name else None
        per_layer = [grad[i] for i in range(layers)] if layers else [grad]
        offset = 1 if layers else 0
        assert dims.reduction_axis[0] == offset, name
        contracted = len(dims.reduction_axis)
        want = []
        for g in per_layer:
            matrix = g.reshape(math.prod(g.shape[:contracted]), -1)
            want.append(reference({"m": matrix})["m"].reshape(g.shape))
        want = np.stack(want) if layers else want[0]
        np.testing.assert_allclose(update, want, rtol=1e-4, atol=1e-7, err_msg=name)


def test_muon_keeps_pixel_token_and_projection_layers_on_adamw():
    from diffusion.models import clip

    params = _dit_params(scan_layers=False, output_conv=True)
    # Every 'kernel' of the DiT but the patch embedding, the pixel decoder and its convolution.
    dit_kernels = {n for n in _flat(params) if n.endswith("kernel")}
    pixel_layers = {"patch_embed/proj/kernel", "final_layer/linear/kernel", "output_conv/kernel"}
    assert pixel_layers <= dit_kernels
    assert set(_muon_leaves(params)) == dit_kernels - pixel_layers
    with nnx.use_eager_sharding(False):
        clip_params = nnx.state(clip.CLIP(clip.CLIPConfig(), rngs=nnx.Rngs(0)), nnx.Param)
    # The towers' blocks: not the token, position and patch embeddings, nor the projections.
    block_kernels = {n for n in _flat(clip_params) if "/blocks/" in n and n.endswith("kernel")}
    assert block_kernels and set(_muon_leaves(clip_params)) == block_kernels
    # A convolutional stem is the patch embedding's replacement: it stays on AdamW too.
    with nnx.use_eager_sharding(False):
        conv_stem = clip.CLIP(clip.CLIPConfig(vision_stem="conv"), rngs=nnx.Rngs(0))
    conv_params = nnx.state(conv_stem, nnx.Param)
    assert any("/patch_embed/kernels/" in n for n in _flat(conv_params))
    assert set(_muon_leaves(conv_params)) == block_kernels


def test_muon_ns_steps_changes_the_update_and_must_be_positive():
    params = {"kernel": _normal_like(jnp.zeros((8, 16)), 0)}
    grads = _normal_like(params, 1)

    def update(ns_steps):
        tx = optim.make_optimizer(dict(MUON, muon_ns_steps=ns_steps))
        return tx.update(grads, tx.init(params), params)[0]["kernel"]

    assert not np.allclose(update(3), update(5), atol=1e-5)
    with pytest.raises(ValueError, match="muon_ns_steps must be >= 1"):
        optim.make_optimizer(dict(MUON, muon_ns_steps=0))


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="unknown optimizer name 'lion'; valid"):
        optim.make_optimizer(dict(BASE, name="lion"))


def test_muon_orthogonalises_equal_shapes_in_one_batch():
    """The DiT's hidden matrices share a few shapes; Newton-Schulz runs once per shape (three
    products per iteration), not once per parameter as in optax.contrib.scale_by_muon."""
    params = _dit_params(scan_layers=False)
    tx = optim.make_optimizer(dict(MUON, muon_ns_steps=3))
    jaxpr = jax.make_jaxpr(lambda g: tx.update(g, tx.init(params), params))(params)
    products = sum(e.primitive.name == "dot_general" for e in jaxpr.jaxpr.eqns)
    shapes = {(leaf.shape, dims) for leaf, dims in _muon_matrices(params)}
    assert len(shapes) < len(_muon_leaves(params)) / 3  # grouping has something to do
    assert products == 3 * 3 * len(shapes)


def _muon_matrices(params):
    dims = optim.muon_dimension_numbers(params)
    pairs = zip(_flat(params).values(), _flat(dims).values(), strict=True)
    return [(leaf, d) for leaf, d in pairs if d is not None]
