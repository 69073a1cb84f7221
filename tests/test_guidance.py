"""Classifier-free guidance with the exact conditional and unconditional denoisers of a mixture.

Class 0 is 0.75 N(-1.5, 0.5^2) + 0.25 N(1.5, 0.5^2); class 1 is its mirror image; the
unconditional data is the 50/50 mix. A sample is "in class c" when it lands on c's main mode
(left of 0 for class 0). Label 2 asks the model for the unconditional denoiser.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import samplers
from diffusion.guidance import (
    GuidanceCondition,
    GuidanceError,
    guided_model_fn,
    rescale_guidance,
)
from diffusion.objectives import prediction_from_x0_eps
from diffusion.samplers import sample_flow_euler
from diffusion.schedules import flow_levels

MODES = jnp.array([-1.5, 1.5])
MODE_STD = 0.5
CLASS_WEIGHTS = jnp.array([[0.75, 0.25], [0.25, 0.75], [0.5, 0.5]])  # rows: label 0, 1, uncond
UNCOND = 2
NUM_SAMPLES = 4000
LEVELS = flow_levels(32)


def class_denoiser(x_t, t, labels):
    """Exact flow velocity of the label's mixture, x_t (B, 1), t (B,), labels (B,) in {0, 1, 2}."""
    alpha, sigma = (1 - t)[:, None], t[:, None]  # (B, 1)
    variance = alpha**2 * MODE_STD**2 + sigma**2
    offset = x_t - alpha * MODES[None]  # (B, 2)
    log_responsibility = jnp.log(CLASS_WEIGHTS[labels]) - 0.5 * offset**2 / variance
    responsibility = jax.nn.softmax(log_responsibility, axis=-1)
    x0 = jnp.sum(responsibility * (MODES[None] + alpha * MODE_STD**2 / variance * offset), axis=1)
    x0 = x0[:, None]
    return prediction_from_x0_eps(x0, (x_t - alpha * x0) / sigma, alpha, sigma, "flow_velocity")


GUIDED = guided_model_fn(class_denoiser)
NOISE = jax.random.normal(jax.random.PRNGKey(0), (NUM_SAMPLES, 1))


def guided_samples(label, scale, negative_label=UNCOND):
    labels = jnp.full((NUM_SAMPLES,), label)
    guidance = GuidanceCondition(
        cond=labels, uncond=jnp.full((1,), negative_label), scale=jnp.float32(scale)
    )
    return np.asarray(sample_flow_euler(GUIDED, NOISE, LEVELS, None, guidance)).ravel()


def fraction_in_class(images, label):
    return float(np.mean(images < 0) if label == 0 else np.mean(images > 0))


def test_fraction_in_requested_class_rises_with_scale():
    for label in (0, 1):
        fractions = [fraction_in_class(guided_samples(label, w), label) for w in (0, 1, 3, 7)]
        assert all(a < b for a, b in zip(fractions, fractions[1:], strict=False)), fractions
        error = 4 * np.sqrt(0.25 / NUM_SAMPLES)
        assert abs(fractions[0] - 0.5) < error  # scale 0: the unconditional model
        assert abs(fractions[1] - 0.75) < error  # scale 1: the conditional model
        assert fractions[-1] > 0.95


def test_scale_one_equals_the_conditional_sampler_exactly():
    labels = jnp.where(jnp.arange(NUM_SAMPLES) % 2 == 0, 0, 1)
    conditional = sample_flow_euler(class_denoiser, NOISE, LEVELS, None, labels)
    guidance = GuidanceCondition(cond=labels, uncond=jnp.full((1,), UNCOND), scale=1.0)
    guided = sample_flow_euler(GUIDED, NOISE, LEVELS, None, guidance)
    np.testing.assert_array_equal(guided, conditional)


def test_negative_condition_pushes_samples_away_from_the_negative_class():
    with_uncond = fraction_in_class(guided_samples(0, 3.0), 1)
    with_negative = fraction_in_class(guided_samples(0, 3.0, negative_label=1), 1)
    assert with_negative < with_uncond - 0.02, (with_negative, with_uncond)


def test_cond_and_uncond_share_one_batched_forward_pass():
    calls = []

    def recording_model(x_t, t, cond):
        calls.append((x_t.shape, t.shape, jax.tree.map(jnp.shape, cond)))
        return (
            x_t * cond["pooled"][:, :1]
            + jnp.sum(cond["tokens"] * cond["mask"][..., None], axis=(1, 2))[:, None]
        )

    cond = {  # a text-encoder-like pytree: token states, mask, pooled embedding
        "tokens": jnp.ones((3, 5, 4)),
        "mask": jnp.ones((3, 5)),
        "pooled": jnp.full((3, 4), 2.0),
    }
    uncond = {"tokens": jnp.zeros((1, 5, 4)), "mask": jnp.zeros((1, 5)), "pooled": jnp.ones((1, 4))}
    x = jnp.ones((3, 2))
    out = guided_model_fn(recording_model)(
        x, jnp.full((3,), 0.5), GuidanceCondition(cond, uncond, 2.0)
    )
    assert calls == [((6, 2), (6,), {"tokens": (6, 5, 4), "mask": (6, 5), "pooled": (6, 4)})]
    cond_prediction = x * 2 + 20.0  # per example: 5 tokens x 4 features
    uncond_prediction = x * 1
    np.testing.assert_allclose(out, uncond_prediction + 2.0 * (cond_prediction - uncond_prediction))


def test_changing_scale_or_prompts_does_not_recompile():
    traces = []

    def counting_model(x_t, t, labels):
        traces.append(1)  # runs only while jax traces
        return class_denoiser(x_t, t, labels)

    guided = guided_model_fn(counting_model)
    noise = NOISE[:64]
    before = samplers._flow_euler_loop._cache_size()
    settings = [(0.0, [0] * 64), (3.0, [0] * 64), (7.5, [0, 1] * 32), (1.0, list(range(2)) * 32)]
    for scale, labels in settings:
        guidance = GuidanceCondition(
            cond=jnp.array(labels), uncond=jnp.full((1,), UNCOND), scale=jnp.float32(scale)
        )
        sample_flow_euler(guided, noise, LEVELS, None, guidance)
    assert samplers._flow_euler_loop._cache_size() == before + 1
    assert len(traces) == 1
    # an equal wrapper built again shares the compilation
    sample_flow_euler(guided_model_fn(counting_model), noise, LEVELS, None, guidance)
    assert len(traces) == 1


def test_guidance_rescale_matches_lin_et_al():
    rng = np.random.default_rng(0)
    guided = rng.normal(size=(4, 3, 5)) * 3
    cond = rng.normal(size=(4, 3, 5))
    for phi in (0.0, 0.7, 1.0):
        out = np.asarray(rescale_guidance(jnp.asarray(guided), jnp.asarray(cond), phi))
        ratio = cond.reshape(4, -1).std(1) / guided.reshape(4, -1).std(1)
        expected = phi * guided * ratio[:, None, None] + (1 - phi) * guided
        np.testing.assert_allclose(out, expected, rtol=1e-5)
    full = np.asarray(rescale_guidance(jnp.asarray(guided), jnp.asarray(cond), 1.0))
    np.testing.assert_allclose(full.reshape(4, -1).std(1), cond.reshape(4, -1).std(1), rtol=1e-5)


def test_guidance_interval_leaves_other_times_conditional():
    guided = guided_model_fn(class_denoiser, interval=(0.2, 0.6))
    x = jnp.linspace(-2, 2, 6)[:, None]
    t = jnp.array([0.1, 0.3, 0.5, 0.7, 0.9, 0.6])
    labels = jnp.zeros((6,), jnp.int32)
    out = guided(x, t, GuidanceCondition(labels, jnp.full((1,), UNCOND), 5.0))
    cond = class_denoiser(x, t, labels)
    uncond = class_denoiser(x, t, jnp.full((6,), UNCOND))
    inside = np.array([False, True, True, False, False, True])
    np.testing.assert_allclose(out[~inside], cond[~inside])
    np.testing.assert_allclose(out[inside], (uncond + 5.0 * (cond - uncond))[inside], rtol=1e-5)


def test_per_example_scales_broadcast():
    x = jnp.ones((2, 3))
    guided = guided_model_fn(lambda x_t, t, c: x_t * c)
    out = guided(
        x,
        jnp.full((2,), 0.5),
        GuidanceCondition(jnp.full((2, 1), 2.0), jnp.zeros((1, 1)), jnp.array([1.0, 3.0])),
    )
    np.testing.assert_allclose(out, [[2.0] * 3, [6.0] * 3])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: guided_model_fn(class_denoiser, rescale_phi=1.5), "rescale_phi"),
        (lambda: guided_model_fn(class_denoiser, interval=(0.8, 0.2)), "t_lo <= t_hi"),
        (
            lambda: GUIDED(jnp.ones((2, 1)), jnp.ones((2,)), jnp.zeros((2,), jnp.int32)),
            "GuidanceCondition",
        ),
        (
            lambda: GUIDED(
                jnp.ones((4, 1)),
                jnp.ones((4,)),
                GuidanceCondition(jnp.zeros((4,), jnp.int32), jnp.zeros((2,), jnp.int32), 2.0),
            ),
            "batch size 1",
        ),
    ],
)
def test_bad_guidance_settings_are_rejected_with_a_clear_message(call, message):
    with pytest.raises(GuidanceError) as error:
        call()
    assert message in str(error.value)
