"""Prediction-type conversions and losses, against the paper formulas and exact denoisers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.objectives import (
    PREDICTION_TYPES,
    ObjectiveError,
    convert_prediction,
    diffusion_loss,
    expand_like,
    flow_matching_loss,
    min_snr_weight,
    prediction_from_x0_eps,
    sample_flow_time,
    x0_eps_from_prediction,
)
from diffusion.schedules import DiscreteSchedule, FlowPath

RNG = np.random.default_rng(0)
X0 = RNG.normal(size=(6, 3))
EPS = RNG.normal(size=(6, 3))
LEVELS = {  # (alpha, sigma) of three kinds of path, per example
    "variance_preserving": (np.full((6, 1), 0.6), np.full((6, 1), 0.8)),
    "flow": (np.full((6, 1), 0.3), np.full((6, 1), 0.7)),
    "arbitrary": (RNG.uniform(0.1, 2, (6, 1)), RNG.uniform(0.1, 2, (6, 1))),
}


@pytest.mark.parametrize("path", sorted(LEVELS))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_round_trips_recover_x0_and_eps(path, prediction_type):
    alpha, sigma = LEVELS[path]
    x_t = alpha * X0 + sigma * EPS
    prediction = prediction_from_x0_eps(X0, EPS, alpha, sigma, prediction_type)
    x0, eps = x0_eps_from_prediction(prediction, x_t, alpha, sigma, prediction_type)
    np.testing.assert_allclose(x0, X0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(eps, EPS, rtol=1e-12, atol=1e-12)
    for other in PREDICTION_TYPES:
        there = convert_prediction(prediction, x_t, alpha, sigma, prediction_type, other)
        back = convert_prediction(there, x_t, alpha, sigma, other, prediction_type)
        np.testing.assert_allclose(back, prediction, rtol=1e-10, atol=1e-10)


def test_conversions_match_the_published_formulas():
    a = 0.36  # alpha_bar
    alpha, sigma = np.sqrt(a), np.sqrt(1 - a)
    x = alpha * X0 + sigma * EPS
    v = prediction_from_x0_eps(X0, EPS, alpha, sigma, "v_prediction")
    np.testing.assert_allclose(v, np.sqrt(a) * EPS - np.sqrt(1 - a) * X0)  # Salimans & Ho
    np.testing.assert_allclose(np.sqrt(a) * x - np.sqrt(1 - a) * v, X0)
    np.testing.assert_allclose(np.sqrt(a) * v + np.sqrt(1 - a) * x, EPS)
    t = 0.7
    x = (1 - t) * X0 + t * EPS
    u = prediction_from_x0_eps(X0, EPS, 1 - t, t, "flow_velocity")
    np.testing.assert_allclose(u, EPS - X0)
    x0, eps = x0_eps_from_prediction(u, x, 1 - t, t, "flow_velocity")
    np.testing.assert_allclose(x0, x - t * u)
    np.testing.assert_allclose(eps, x + (1 - t) * u)


def single_point_model(point, path, prediction_type):
    """Exact denoiser of a dataset holding one point: x0_hat = point at every noise level."""

    def model_fn(x_t, t, cond):
        alpha, sigma = path.alpha_sigma(t)
        alpha, sigma = alpha[:, None], sigma[:, None]
        x0 = jnp.broadcast_to(point, x_t.shape)
        return prediction_from_x0_eps(x0, (x_t - alpha * x0) / sigma, alpha, sigma, prediction_type)

    return model_fn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_is_zero_for_the_exact_denoiser(prediction_type):
    schedule = DiscreteSchedule.from_name("cosine", 1000)
    point = jnp.array([0.3, -0.7])
    x0 = jnp.broadcast_to(point, (256, 2))
    model_fn = single_point_model(point, schedule, prediction_type)
    loss, aux = diffusion_loss(
        model_fn,
        x0,
        None,
        jax.random.PRNGKey(0),
        schedule=schedule,
        prediction_type=prediction_type,
    )
    # float32 and the cosine schedule's tiny alpha at the last steps amplify rounding of eps.
    assert float(loss) < 1e-4
    assert aux["t"].shape == (256,)
    assert float(aux["t"].min()) > 0 and float(aux["t"].max()) <= 1


def test_flow_matching_loss_is_zero_for_the_exact_velocity():
    point = jnp.array([0.3, -0.7])
    x0 = jnp.broadcast_to(point, (256, 2))
    model_fn = single_point_model(point, FlowPath(), "flow_velocity")
    loss, _ = flow_matching_loss(model_fn, x0, None, jax.random.PRNGKey(0))
    assert float(loss) < 1e-8


def test_flow_sample_prediction_loss_is_the_velocity_loss_times_t_squared():
    """x0_hat = x_t - t u_hat, so |x0_hat - x0|^2 = t^2 |u_hat - u|^2 for any model, per example."""
    x0 = jax.random.normal(jax.random.PRNGKey(2), (512, 6)) + 1.0
    key = jax.random.PRNGKey(3)

    def velocity_model(x_t, t, cond):  # an arbitrary, wrong velocity
        return jnp.sin(3 * x_t) + expand_like(t, x_t)

    def sample_model(x_t, t, cond):  # the x0 that velocity_model implies
        return x_t - expand_like(t, x_t) * velocity_model(x_t, t, cond)

    _, velocity = flow_matching_loss(velocity_model, x0, None, key, time_sampling="logit_normal")
    _, sample = flow_matching_loss(
        sample_model, x0, None, key, time_sampling="logit_normal", prediction_type="sample"
    )
    np.testing.assert_array_equal(np.asarray(velocity["t"]), np.asarray(sample["t"]))
    t = np.asarray(velocity["t"], np.float64)
    np.testing.assert_allclose(
        np.asarray(sample["per_example_loss"]),
        t**2 * np.asarray(velocity["per_example_loss"]),
        rtol=2e-4,
        atol=1e-6,
    )
    point = jnp.array([0.3, -0.7])
    exact = single_point_model(point, FlowPath(), "sample")
    loss, _ = flow_matching_loss(
        exact, jnp.broadcast_to(point, (64, 2)), None, key, prediction_type="sample"
    )
    assert float(loss) < 1e-10


def test_flow_sample_prediction_with_velocity_loss_is_the_velocity_loss_jit():
    """x-prediction, v-loss (JiT): the loss of an x0 model is that of the velocity it implies,
    u_hat = (x_t - x0_hat) / t; below t = 0.05 the division is by 0.05, which scales the
    velocity loss by (t / 0.05)^2."""
    x0 = jax.random.normal(jax.random.PRNGKey(4), (2048, 6)) + 1.0
    key = jax.random.PRNGKey(5)

    def velocity_model(x_t, t, cond):  # an arbitrary, wrong velocity
        return jnp.cos(2 * x_t) - expand_like(t, x_t)

    def sample_model(x_t, t, cond):
        return x_t - expand_like(t, x_t) * velocity_model(x_t, t, cond)

    options = {"time_sampling": "uniform"}
    _, velocity = flow_matching_loss(velocity_model, x0, None, key, **options)
    loss, sample = flow_matching_loss(
        sample_model, x0, None, key, prediction_type="sample", loss_space="velocity", **options
    )
    t = np.asarray(velocity["t"], np.float64)
    assert (t < 0.05).sum() > 20 and (t >= 0.05).sum() > 1000  # both regimes are exercised
    expected = np.asarray(velocity["per_example_loss"], np.float64) * np.minimum(t / 0.05, 1) ** 2
    np.testing.assert_allclose(np.asarray(sample["per_example_loss"]), expected, rtol=2e-3)
    assert float(loss) == pytest.approx(float(np.mean(np.asarray(sample["per_example_loss"]))))
    # With a velocity model the loss space changes nothing: it is already the velocity loss.
    _, same = flow_matching_loss(velocity_model, x0, None, key, loss_space="velocity", **options)
    np.testing.assert_array_equal(
        np.asarray(same["per_example_loss"]), np.asarray(velocity["per_example_loss"])
    )


def zero_model(x_t, t, cond):
    return jnp.zeros_like(x_t)


def test_losses_of_a_zero_model_have_their_expected_values():
    """With data x0 = 0, a zero model's loss is E|target|^2: 1 (eps), mean alpha_bar (v)."""
    schedule = DiscreteSchedule.from_name("linear", 1000)
    x0 = jnp.zeros((4096, 8))
    key = jax.random.PRNGKey(1)
    eps_loss, _ = diffusion_loss(zero_model, x0, None, key, schedule=schedule)
    v_loss, _ = diffusion_loss(
        zero_model, x0, None, key, schedule=schedule, prediction_type="v_prediction"
    )
    sample_loss, _ = diffusion_loss(
        zero_model, x0, None, key, schedule=schedule, prediction_type="sample"
    )
    assert float(eps_loss) == pytest.approx(1.0, abs=0.02)
    # v = alpha eps when x0 = 0: E|v|^2 = E_k alpha_bar_k over uniform k
    assert float(v_loss) == pytest.approx(float(np.mean(schedule.alpha_bar)), abs=0.03)
    assert float(sample_loss) == 0.0
    flow_loss, _ = flow_matching_loss(zero_model, x0 + 2.0, None, key)
    assert float(flow_loss) == pytest.approx(1.0 + 4.0, abs=0.05)  # E|eps - x0|^2


def test_logit_normal_time_sampling_has_the_requested_logit_moments():
    t = sample_flow_time(jax.random.PRNGKey(0), 20000, "logit_normal", 0.5, 0.8)
    logits = np.log(np.asarray(t, np.float64)) - np.log1p(-np.asarray(t, np.float64))
    assert logits.mean() == pytest.approx(0.5, abs=0.03)
    assert logits.std() == pytest.approx(0.8, abs=0.03)
    uniform = np.asarray(sample_flow_time(jax.random.PRNGKey(0), 20000))
    assert (
        uniform.min() >= 0 and uniform.max() < 1 and uniform.mean() == pytest.approx(0.5, abs=0.01)
    )


def test_time_shift_is_applied_once_to_sampled_times():
    shifted = np.asarray(sample_flow_time(jax.random.PRNGKey(0), 20000, shift=3.0))
    # median of U(0, 1) is 0.5; shifted once: 3 * 0.5 / (1 + 2 * 0.5) = 0.75 (twice would be 0.9)
    assert np.median(shifted) == pytest.approx(0.75, abs=0.01)


def test_min_snr_weights_match_hang_et_al():
    snr = jnp.array([0.0, 0.5, 5.0, 20.0])
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "epsilon"), [1, 1, 1, 0.25])
    np.testing.assert_allclose(
        min_snr_weight(snr, 5.0, "v_prediction"), [0, 0.5 / 1.5, 5 / 6, 5 / 21], rtol=1e-6
    )
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "sample"), [0, 0.5, 5, 5])


def test_min_snr_weighting_changes_the_loss_as_the_weights_say():
    schedule = DiscreteSchedule.from_name("linear", 1000)
    x0 = jax.random.normal(jax.random.PRNGKey(2), (512, 4))
    loss_fn = functools.partial(diffusion_loss, schedule=schedule, min_snr_gamma=5.0)
    loss, aux = loss_fn(zero_model, x0, None, jax.random.PRNGKey(3))
    alpha, sigma = schedule.alpha_sigma(aux["t"])
    snr = np.asarray(alpha, np.float64) ** 2 / np.asarray(sigma, np.float64) ** 2
    weights = np.minimum(snr, 5.0) / snr
    expected = np.mean(weights * np.asarray(aux["per_example_loss"]))
    assert float(loss) == pytest.approx(expected, rel=1e-3)
    assert float(loss) < float(np.mean(aux["per_example_loss"]))


def test_a_train_step_can_bind_settings_and_differentiate():
    schedule = DiscreteSchedule.from_name("linear", 1000)
    objective = functools.partial(diffusion_loss, schedule=schedule, prediction_type="v_prediction")

    def loss_of(scale, x0, key):
        return objective(lambda x_t, t, cond: scale * x_t, x0, None, key)[0]

    grad = jax.jit(jax.grad(loss_of))(1.0, jnp.ones((8, 2)), jax.random.PRNGKey(0))
    assert np.isfinite(float(grad))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: x0_eps_from_prediction(0.0, 0.0, 1.0, 1.0, "score"), "epsilon, v_prediction"),
        (
            lambda: diffusion_loss(
                zero_model,
                jnp.zeros((2, 2)),
                None,
                jax.random.PRNGKey(0),
                schedule=DiscreteSchedule.from_name(),
                prediction_type="flow_velocity",
            ),
            "flow_matching_loss",
        ),
        (
            lambda: diffusion_loss(
                zero_model,
                jnp.zeros((2, 2)),
                None,
                jax.random.PRNGKey(0),
                schedule=DiscreteSchedule.from_name(),
                min_snr_gamma=0.0,
            ),
            "positive",
        ),
        (
            lambda: flow_matching_loss(
                zero_model,
                jnp.zeros((2, 2)),
                None,
                jax.random.PRNGKey(0),
                prediction_type="epsilon",
            ),
            "flow_velocity, sample",
        ),
        (
            lambda: flow_matching_loss(
                zero_model, jnp.zeros((2, 2)), None, jax.random.PRNGKey(0), loss_space="x0"
            ),
            "prediction, velocity",
        ),
        (lambda: sample_flow_time(jax.random.PRNGKey(0), 4, "beta"), "uniform, logit_normal"),
        (lambda: sample_flow_time(jax.random.PRNGKey(0), 4, "logit_normal", 0, -1), "logit_std"),
    ],
)
def test_bad_objective_settings_are_rejected_with_a_clear_message(call, message):
    with pytest.raises(ObjectiveError) as error:
        call()
    assert message in str(error.value)
