"""Samplers with exact (closed-form) denoisers of Gaussian and Gaussian-mixture data.

For data sum_k w_k N(m_k, s_k^2 I), the noised x_t = alpha x0 + sigma eps is a mixture of
N(alpha m_k, V_k I), V_k = alpha^2 s_k^2 + sigma^2, and the optimal denoiser E[x0 | x_t] is the
responsibility-weighted sum of m_k + alpha s_k^2 / V_k (x_t - alpha m_k). For one Gaussian the
probability-flow ODE keeps z = (x - alpha m) / sqrt(V) constant, so every ODE sampler has an exact
target to converge to.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import samplers
from diffusion.guidance import GuidanceCondition, guided_model_fn
from diffusion.inversion import invert_ddim
from diffusion.objectives import prediction_from_x0_eps
from diffusion.samplers import (
    SAMPLERS,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_flow_euler,
    sample_flow_euler_stochastic,
)
from diffusion.schedules import (
    DiscreteSchedule,
    FlowPath,
    NoiseLevels,
    ddpm_levels,
    flow_levels,
    flow_levels_from_times,
)

LINEAR = DiscreteSchedule.from_name("linear", 1000)


class CosinePath:
    """A smooth variance-preserving path alpha = cos(pi t / 2), for order-of-convergence tests."""

    def alpha_sigma(self, t):
        return jnp.cos(jnp.pi / 2 * t), jnp.sin(jnp.pi / 2 * t)


def mixture_denoiser(path, means, stds, weights, prediction_type):
    """model_fn(x_t, t, cond) of the exact denoiser of a Gaussian mixture, data shape (B, D)."""
    means = jnp.asarray(means)  # (K, D)
    stds = jnp.asarray(stds)[None, :, None]  # (1, K, 1)
    log_weights = jnp.log(jnp.asarray(weights))[None]  # (1, K)

    def model_fn(x_t, t, cond):
        alpha, sigma = path.alpha_sigma(t.astype(x_t.dtype))
        a, s = alpha[:, None, None], sigma[:, None, None]  # (B, 1, 1)
        offset = x_t[:, None, :] - a * means[None]  # (B, K, D)
        variance = a**2 * stds**2 + s**2
        log_responsibility = log_weights - 0.5 * jnp.sum(
            jnp.log(variance) + offset**2 / variance, axis=-1
        )
        responsibility = jax.nn.softmax(log_responsibility, axis=-1)[..., None]  # (B, K, 1)
        x0 = jnp.sum(responsibility * (means[None] + a * stds**2 / variance * offset), axis=1)
        alpha, sigma = alpha[:, None], sigma[:, None]
        eps = (x_t - alpha * x0) / sigma
        return prediction_from_x0_eps(x0, eps, alpha, sigma, prediction_type)

    return model_fn


MU, STD = 0.5, 0.3  # one Gaussian for the order tests


def ode_target(levels, noise):
    """Exact probability-flow ODE solution at the last level, started from noise at the first."""
    a0, s0, a1, s1 = levels.alpha[0], levels.sigma[0], levels.alpha[-1], levels.sigma[-1]
    z = (noise - a0 * MU) / np.sqrt(a0**2 * STD**2 + s0**2)
    return a1 * MU + np.sqrt(a1**2 * STD**2 + s1**2) * z


def log_snr_grid_flow(num_steps):
    """Flow levels uniform in log-SNR lambda in [-3, 3] (t = sigmoid(-lambda))."""
    return flow_levels_from_times(1 / (1 + np.exp(np.linspace(-3, 3, num_steps + 1))))


def log_snr_grid_cosine(num_steps):
    """CosinePath levels uniform in log-SNR lambda in [-3, 3]."""
    alpha = np.sqrt(1 / (1 + np.exp(-2 * np.linspace(-3, 3, num_steps + 1))))
    return NoiseLevels(t=np.arccos(alpha) * 2 / np.pi, alpha=alpha, sigma=np.sqrt(1 - alpha**2))


ORDER_CASES = {
    # name: (sampler, path, prediction type, levels(n), step counts, expected order)
    "flow_euler": ("flow_euler", FlowPath(), "flow_velocity", flow_levels, (8, 16, 32, 64), 1),
    "flow_heun": ("flow_heun", FlowPath(), "flow_velocity", flow_levels, (8, 16, 32, 64), 2),
    # A flow model that predicts x0 (config.diffusion.flow_prediction_type="sample").
    "flow_euler_sample": ("flow_euler", FlowPath(), "sample", flow_levels, (8, 16, 32, 64), 1),
    "flow_heun_sample": ("flow_heun", FlowPath(), "sample", flow_levels, (8, 16, 32, 64), 2),
    "ddim_cosine": ("ddim", CosinePath(), "v_prediction", log_snr_grid_cosine, (8, 16, 32, 64), 1),
    "ddim_discrete_trailing": (
        "ddim",
        LINEAR,
        "epsilon",
        lambda n: ddpm_levels(LINEAR, n, "trailing"),
        (10, 20, 40, 80),
        1,
    ),
    "dpmpp_2m_cosine": (
        "dpmpp_2m",
        CosinePath(),
        "epsilon",
        log_snr_grid_cosine,
        (16, 32, 64, 128),
        2,
    ),
    "dpmpp_2m_flow": (
        "dpmpp_2m",
        FlowPath(),
        "flow_velocity",
        log_snr_grid_flow,
        (16, 32, 64, 128),
        2,
    ),
}


@pytest.mark.parametrize("case", sorted(ORDER_CASES))
def test_ode_samplers_converge_at_their_order(case):
    name, path, prediction_type, make_levels, step_counts, order = ORDER_CASES[case]
    model_fn = mixture_denoiser(path, [[MU]], [STD], [1.0], prediction_type)
    with jax.enable_x64(True):
        noise = jax.random.normal(jax.random.PRNGKey(0), (64, 1), jnp.float64)
        errors = []
        for num_steps in step_counts:
            levels = make_levels(num_steps)
            images = sample(name, model_fn, noise, levels, prediction_type=prediction_type)
            errors.append(float(jnp.max(jnp.abs(images - ode_target(levels, noise)))))
    slope = np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
    assert errors[-1] < errors[0]
    assert -order - 0.35 < slope < -order + 0.35, (errors, slope)


# A 1-D mixture for distribution tests: 30 % at -1, 70 % at +1, both with std 0.3.
MIXTURE = ([[-1.0], [1.0]], [0.3, 0.3], [0.3, 0.7])
MIXTURE_MEAN = 0.4
MIXTURE_VARIANCE = 0.09 + 1 - MIXTURE_MEAN**2
NUM_SAMPLES = 4000

DISTRIBUTION_CASES = {
    "ddim_100": ("ddim", LINEAR, "epsilon", ddpm_levels(LINEAR, 100, "trailing"), {}),
    "ddim_eta_1": ("ddim", LINEAR, "epsilon", ddpm_levels(LINEAR, 200, "trailing"), {"eta": 1.0}),
    "ddpm_fixed_large": ("ddpm", LINEAR, "v_prediction", ddpm_levels(LINEAR, 250), {}),
    "dpmpp_2m_ddpm": ("dpmpp_2m", LINEAR, "v_prediction", ddpm_levels(LINEAR, 25, "trailing"), {}),
    "flow_euler": ("flow_euler", FlowPath(), "flow_velocity", flow_levels(100), {}),
    "flow_heun": ("flow_heun", FlowPath(), "flow_velocity", flow_levels(25), {}),
    "dpmpp_2m_flow_shifted": ("dpmpp_2m", FlowPath(), "flow_velocity", flow_levels(25, 3.0), {}),
    "unipc_flow_shifted": ("unipc", FlowPath(), "flow_velocity", flow_levels(25, 5.0), {}),
    "unipc_ddpm": ("unipc", LINEAR, "epsilon", ddpm_levels(LINEAR, 25, "trailing"), {}),
    "flow_euler_stochastic": (
        "flow_euler_stochastic",
        FlowPath(),
        "flow_velocity",
        flow_levels(200),
        {"eta": 1.0},
    ),
}


@pytest.mark.parametrize("case", sorted(DISTRIBUTION_CASES))
def test_samplers_reproduce_a_gaussian_mixture(case):
    name, path, prediction_type, levels, options = DISTRIBUTION_CASES[case]
    if name == "ddpm":
        options = {"variance": "fixed_large"}
    model_fn = mixture_denoiser(path, *MIXTURE, prediction_type)
    noise = jax.random.normal(jax.random.PRNGKey(0), (NUM_SAMPLES, 1))
    images = np.asarray(
        sample(
            name,
            model_fn,
            noise,
            levels,
            jax.random.PRNGKey(1),
            prediction_type=prediction_type,
            **options,
        )
    ).ravel()
    standard_error = np.sqrt(MIXTURE_VARIANCE / NUM_SAMPLES)
    assert abs(images.mean() - MIXTURE_MEAN) < 4 * standard_error
    assert images.var() == pytest.approx(MIXTURE_VARIANCE, rel=0.1)
    right_mode = np.mean(images > 0)
    assert abs(right_mode - 0.7) < 4 * np.sqrt(0.7 * 0.3 / NUM_SAMPLES)


def test_single_point_dataset_is_sampled_exactly_in_one_step():
    # float64: x0 = (x - sigma eps) / alpha at alpha = sqrt(4e-5) amplifies float32 rounding.
    with jax.enable_x64(True):
        point = jnp.array([[0.3, -0.7]], jnp.float64)
        noise = jax.random.normal(jax.random.PRNGKey(0), (16, 2), jnp.float64)
        expected = np.broadcast_to(np.asarray(point), (16, 2))
        ddim_model = mixture_denoiser(LINEAR, point, [0.0], [1.0], "epsilon")
        images = sample_ddim(ddim_model, noise, ddpm_levels(LINEAR, 1))
        np.testing.assert_allclose(images, expected, atol=1e-10)
        flow_model = mixture_denoiser(FlowPath(), point, [0.0], [1.0], "flow_velocity")
        images = sample_flow_euler(flow_model, noise, flow_levels(1))
        np.testing.assert_allclose(images, expected, atol=1e-12)


def ddpm_variance_recursion(levels, variance):
    """Mean and variance of DDPM ancestral samples for Gaussian data N(MU, STD^2), float64.

    Independent re-derivation from Ho et al. (2020) eq. 6-7 in alpha_bar form: with the exact
    x0_hat = MU + k (x - sqrt(a) MU), k = sqrt(a) STD^2 / (a STD^2 + 1 - a), each step is affine.
    """
    alpha_bar = levels.alpha**2
    mean, var = 0.0, 1.0
    for i in range(levels.num_steps):
        a, a_prev = alpha_bar[i], alpha_bar[i + 1]
        beta = 1 - a / a_prev
        gain = np.sqrt(a) * STD**2 / (a * STD**2 + 1 - a)
        x0_coefficient = np.sqrt(a_prev) * beta / (1 - a)
        x_coefficient = np.sqrt(a / a_prev) * (1 - a_prev) / (1 - a)
        mean = x_coefficient * mean + x0_coefficient * (MU + gain * (mean - np.sqrt(a) * MU))
        slope = x_coefficient + x0_coefficient * gain
        step_variance = (1 - a_prev) / (1 - a) * beta if variance == "fixed_small" else beta
        var = slope**2 * var + (step_variance if i < levels.num_steps - 1 else 0.0)
    return mean, var


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_ancestral_1000_steps_matches_mean_and_variance(variance):
    levels = ddpm_levels(LINEAR, 1000)
    model_fn = mixture_denoiser(LINEAR, [[MU, MU]], [STD], [1.0], "epsilon")
    noise = jax.random.normal(jax.random.PRNGKey(0), (10000, 2))
    images = np.asarray(
        sample_ddpm(model_fn, noise, levels, jax.random.PRNGKey(1), variance=variance)
    ).ravel()
    expected_mean, expected_var = ddpm_variance_recursion(levels, variance)
    # The sampler's exact law is within 3 % of the data's (fixed_small misses the Var(x0 | x_t)
    # term each step, which is why it ends slightly narrow) ...
    assert expected_var == pytest.approx(STD**2, rel=0.03)
    assert expected_mean == pytest.approx(MU, abs=1e-4)
    # ... and the samples match that law within sampling error (2 * 10000 values).
    n = images.size
    assert abs(images.mean() - expected_mean) < 4 * np.sqrt(expected_var / n)
    assert abs(images.var() - expected_var) < 4 * expected_var * np.sqrt(2 / n)


def test_ddpm_without_reinjected_noise_collapses():
    levels = ddpm_levels(LINEAR, 1000)
    model_fn = mixture_denoiser(LINEAR, *MIXTURE, "epsilon")
    noise = jax.random.normal(jax.random.PRNGKey(0), (2000, 1))
    collapsed = np.asarray(sample_ddpm(model_fn, noise, levels, reinject_noise=False))
    assert collapsed.var() < 0.01 * MIXTURE_VARIANCE
    assert abs(collapsed.mean()) < 1.0  # collapsed near the data, not diverged


def test_ddim_with_eta_one_is_ddpm_ancestral_sampling():
    """Song et al. 2021 sec. 4.1: eta = 1 gives the DDPM posterior with fixed_small variance."""
    levels = ddpm_levels(LINEAR, 50, "trailing")
    model_fn = mixture_denoiser(LINEAR, *MIXTURE, "epsilon")
    noise = jax.random.normal(jax.random.PRNGKey(0), (64, 1))
    key = jax.random.PRNGKey(7)
    ddim = sample_ddim(model_fn, noise, levels, key, eta=1.0)
    ddpm = sample_ddpm(model_fn, noise, levels, key, variance="fixed_small")
    np.testing.assert_allclose(ddim, ddpm, atol=2e-5)
    other_key = sample_ddim(model_fn, noise, levels, jax.random.PRNGKey(8), eta=1.0)
    assert float(jnp.max(jnp.abs(other_key - ddim))) > 0.1  # eta > 0 really adds noise
    deterministic = [sample_ddim(model_fn, noise, levels, jax.random.PRNGKey(k)) for k in (1, 2)]
    np.testing.assert_array_equal(*deterministic)


def test_stochastic_flow_euler_without_noise_is_flow_euler():
    model_fn = mixture_denoiser(FlowPath(), *MIXTURE, "flow_velocity")
    noise = jax.random.normal(jax.random.PRNGKey(0), (64, 1))
    levels = flow_levels(20, shift=2.0)
    euler = sample_flow_euler(model_fn, noise, levels)
    stochastic = sample_flow_euler_stochastic(
        model_fn, noise, levels, jax.random.PRNGKey(1), eta=0.0
    )
    np.testing.assert_allclose(stochastic, euler, atol=1e-5)


@pytest.mark.parametrize(
    "path, prediction_type, make_levels",
    [
        (LINEAR, "epsilon", lambda n: ddpm_levels(LINEAR, n, "trailing")),
        (FlowPath(), "flow_velocity", flow_levels),
    ],
)
def test_ddim_inversion_then_sampling_reconstructs_the_input(path, prediction_type, make_levels):
    model_fn = mixture_denoiser(path, *MIXTURE, prediction_type)
    images = jnp.array([[-1.3], [-0.8], [0.7], [1.0], [1.4]])

    def relative_error(num_steps, iterations):
        levels = make_levels(num_steps)
        noise = invert_ddim(
            model_fn,
            images,
            levels,
            prediction_type=prediction_type,
            fixed_point_iterations=iterations,
        )
        sampler = "ddim" if path is LINEAR else "flow_euler"
        back = sample(sampler, model_fn, noise, levels, prediction_type=prediction_type)
        return float(jnp.linalg.norm(back - images) / jnp.linalg.norm(images))

    assert relative_error(100, iterations=3) < 1e-3
    # Plain inversion (diffusers' approximation) is first order: twice the steps, half the error.
    assert relative_error(100, iterations=0) < 0.6 * relative_error(50, iterations=0)


def test_trajectory_runs_from_noise_to_the_result():
    model_fn = mixture_denoiser(FlowPath(), *MIXTURE, "flow_velocity")
    noise = jax.random.normal(jax.random.PRNGKey(0), (8, 1))
    levels = flow_levels(6)
    for name in SAMPLERS:
        images, trajectory = sample(
            name,
            model_fn,
            noise,
            levels,
            jax.random.PRNGKey(1),
            prediction_type="flow_velocity",
            return_trajectory=True,
        )
        assert trajectory.shape == (7, 8, 1), name
        np.testing.assert_array_equal(trajectory[0], noise)
        np.testing.assert_array_equal(trajectory[-1], images)


def test_a_sampler_runs_inside_jit_with_traced_parameters():
    """Parameters reach the model as a closure built inside the caller's jit."""

    def apply(params, x_t, t, cond):
        return params["scale"] * x_t + cond

    levels = flow_levels(4)

    @jax.jit
    def generate(params, noise, cond):
        return sample_flow_euler(lambda x, t, c: apply(params, x, t, c), noise, levels, None, cond)

    noise = jnp.ones((2, 3))
    first = generate({"scale": 0.5}, noise, jnp.zeros((2, 3)))
    second = generate({"scale": 0.0}, noise, jnp.ones((2, 3)))
    np.testing.assert_allclose(first, 0.875**4 * noise, rtol=1e-6)  # x <- x - 0.25 * 0.5 x
    np.testing.assert_allclose(second, noise - 1.0, rtol=1e-6)
    assert generate._cache_size() == 1


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, x: sample("euler_a", m, x, flow_levels(4)),
            "ddpm, ddim, flow_euler, flow_heun, flow_euler_stochastic, dpmpp_2m",
        ),
        (lambda m, x: sample_ddim(m, x, ddpm_levels(LINEAR, 4), eta=-0.5), "eta must be >= 0"),
        (
            lambda m, x: sample_ddim(m, x, ddpm_levels(LINEAR, 4), prediction_type="score"),
            "valid prediction types",
        ),
        (
            lambda m, x: sample_ddim(
                m, x, ddpm_levels(DiscreteSchedule.from_name(zero_terminal_snr=True), 4, "trailing")
            ),
            "v_prediction",
        ),
        (lambda m, x: sample_flow_euler(m, x, ddpm_levels(LINEAR, 4)), "flow_levels"),
        (lambda m, x: sample_ddpm(m, x, ddpm_levels(LINEAR, 4)), "PRNG key"),
        (
            lambda m, x: sample_ddpm(m, x, ddpm_levels(LINEAR, 4), variance="learned"),
            "fixed_small, fixed_large",
        ),
        (lambda m, x: sample_ddim(m, x, np.linspace(1, 0, 5)), "NoiseLevels"),
        (lambda m, x: sample_ddim(m, x, ddpm_levels(LINEAR, 0)), ">= 1"),
        (lambda m, x: sample_ddim(m, x, ddpm_levels(LINEAR, 2000)), "at most 1000"),
        (lambda m, x: sample_ddim(m, x, ddpm_levels(LINEAR, 4, "uniform")), "trailing"),
        (
            lambda m, x: sample_flow_euler(m, x, flow_levels_from_times([1.0, 0.2, 0.5, 0.0])),
            "decrease strictly",
        ),
        (
            lambda m, x: invert_ddim(
                m, x, flow_levels(4), prediction_type="flow_velocity", fixed_point_iterations=-1
            ),
            "fixed_point_iterations",
        ),
    ],
)
def test_bad_sampler_input_is_rejected_with_a_clear_message(call, message):
    model_fn = mixture_denoiser(FlowPath(), *MIXTURE, "epsilon")
    with pytest.raises(ValueError) as error:
        call(model_fn, jnp.zeros((2, 1)))
    assert message in str(error.value)


def test_diffusers_ddim_golden_vector():
    """diffusers' DDIMSchedulerTest.full_loop: linear betas, 10 leading steps, clipped x0."""
    levels = ddpm_levels(LINEAR, 10, "leading", steps_offset=0, set_alpha_to_one=True)

    def dummy_model(x_t, t, cond):
        step = LINEAR.step_of_time(t).astype(x_t.dtype)[:, None]  # the integer timestep
        return x_t * step / (step + 1)

    x = (jnp.arange(768, dtype=jnp.float32) / 768).reshape(4, 192)
    for prediction_type, expected_sum in [("epsilon", 172.0067), ("v_prediction", 52.5302)]:
        images = sample_ddim(dummy_model, x, levels, prediction_type=prediction_type, clip_x0=1.0)
        assert float(jnp.sum(jnp.abs(images))) == pytest.approx(expected_sum, abs=1e-2)


def test_samplers_compile_once_per_shape():
    model_fn = mixture_denoiser(FlowPath(), *MIXTURE, "flow_velocity")
    levels = flow_levels(8)
    before = samplers._flow_euler_loop._cache_size()
    for seed in range(3):
        sample_flow_euler(model_fn, jax.random.normal(jax.random.PRNGKey(seed), (4, 1)), levels)
    # a different shift changes only coefficient values, not shapes
    sample_flow_euler(model_fn, jnp.zeros((4, 1)), flow_levels(8, shift=3.0))
    assert samplers._flow_euler_loop._cache_size() == before + 1


# ----------------------------------------------------------------------------------------------
# Clips: every sampler and guidance mode on (B, T, H, W, C) with no code of its own
# ----------------------------------------------------------------------------------------------

CLIP_SHAPE = (2, 3, 4, 4, 3)  # (B, T, H, W, C): two 3-frame 4x4 RGB clips


def conditional_gaussian_denoiser(path, std, prediction_type):
    """model_fn(x_t, t, mean) of the exact denoiser of N(mean, std^2) in every element, the mean
    (B,) given as the condition: any rank, every element denoised on its own."""

    def model_fn(x_t, t, mean):
        alpha, sigma = path.alpha_sigma(t.astype(x_t.dtype))
        a, s, m = (v.reshape(v.shape + (1,) * (x_t.ndim - 1)) for v in (alpha, sigma, mean))
        variance = a**2 * std**2 + s**2
        x0 = m + a * std**2 / variance * (x_t - a * m)
        return prediction_from_x0_eps(x0, (x_t - a * x0) / s, a, s, prediction_type)

    return model_fn


CLIP_CASES = {
    # sampler: (path, prediction type, levels, options); the flow levels use Wan's shift 5.0.
    "ddpm": (LINEAR, "epsilon", ddpm_levels(LINEAR, 10, "trailing"), {}),
    "ddim": (LINEAR, "v_prediction", ddpm_levels(LINEAR, 10, "trailing"), {"eta": 0.5}),
    "dpmpp_2m": (FlowPath(), "flow_velocity", flow_levels(10, 5.0), {}),
    "flow_euler": (FlowPath(), "flow_velocity", flow_levels(10, 5.0), {}),
    "flow_heun": (FlowPath(), "sample", flow_levels(10, 5.0), {}),
    "flow_euler_stochastic": (FlowPath(), "flow_velocity", flow_levels(10, 5.0), {"eta": 1.0}),
    "unipc": (FlowPath(), "flow_velocity", flow_levels(10, 5.0), {}),
}


def test_every_sampler_is_listed_in_the_clip_cases():
    assert sorted(CLIP_CASES) == sorted(SAMPLERS)


@pytest.mark.parametrize("name", sorted(CLIP_CASES))
def test_a_guided_clip_is_sampled_as_its_flattened_elements(name):
    """Truth: the samplers and guidance act on each element alone (and rescale over all non-batch
    axes), so a clip (B, T, H, W, C) samples to the flattened (B, T*H*W*C) array's samples, with
    guidance, a negative condition as `uncond`, a per-example scale and guidance rescale; and each
    element of a conditional (scale 1) sample equals the closed-form ODE solution."""
    path, prediction_type, levels, options = CLIP_CASES[name]
    model_fn = conditional_gaussian_denoiser(path, 0.3, prediction_type)
    guided = guided_model_fn(model_fn, rescale_phi=0.7)
    noise = jax.random.normal(jax.random.PRNGKey(0), CLIP_SHAPE)
    flat = noise.reshape(CLIP_SHAPE[0], -1)
    guidance = GuidanceCondition(
        cond=jnp.array([0.5, -0.5]), uncond=jnp.array([-1.0]), scale=jnp.array([3.0, 1.5])
    )
    key = jax.random.PRNGKey(1)

    def run(x, guidance=guidance, model=guided, levels=levels, options=options):
        return sample(
            name, model, x, levels, key, guidance, prediction_type=prediction_type, **options
        )

    clips = run(noise)
    assert clips.shape == CLIP_SHAPE
    np.testing.assert_allclose(clips.reshape(flat.shape), run(flat), rtol=1e-6, atol=1e-6)
    # Guidance moved the clips away from the unguided ones: the comparison above is not trivial.
    unguided = run(noise, guidance._replace(scale=jnp.ones(2)))
    assert float(jnp.max(jnp.abs(unguided - clips))) > 0.1
    if name in ("flow_euler", "flow_heun", "dpmpp_2m", "ddim", "unipc") and not options.get("eta"):
        # 100 steps: the closed form is the ODE's exact solution, which 10 steps of shift 5.0
        # (a last step from t = 0.36 to 0) only approximate; first-order samplers err most.
        fine = flow_levels(100, 5.0) if isinstance(path, FlowPath) else ddpm_levels(LINEAR, 100)
        with jax.enable_x64(True):
            exact = conditional_gaussian_denoiser(path, 0.3, prediction_type)
            mean = jnp.array([0.5, -0.5], jnp.float64)
            x = run(noise.astype(jnp.float64), mean, exact, fine, {})
        a0, s0, a1, s1 = fine.alpha[0], fine.sigma[0], fine.alpha[-1], fine.sigma[-1]
        mean = np.asarray(mean).reshape(2, 1, 1, 1, 1)
        z = (np.asarray(noise, np.float64) - a0 * mean) / np.sqrt(a0**2 * 0.09 + s0**2)
        target = a1 * mean + np.sqrt(a1**2 * 0.09 + s1**2) * z
        assert float(np.max(np.abs(np.asarray(x) - target))) < 0.06


@pytest.mark.parametrize("num_steps", [10, 50])
def test_unipc_equals_diffusers_flow_unipc_as_wan_samples(num_steps):
    """Truth: diffusers' UniPCMultistepScheduler configured as Wan 2.1's (flow sigmas, shift 5.0,
    order 2, bh2, corrector on), stepped on the same exact denoiser from the same noise."""
    torch = pytest.importorskip("torch")
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0,
    )
    scheduler.set_timesteps(num_steps)
    times = scheduler.sigmas.numpy().astype(np.float64)  # 1 - 1e-6, ..., 0
    model_fn = mixture_denoiser(FlowPath(), *MIXTURE, "flow_velocity")
    noise = np.random.default_rng(0).standard_normal((64, 1))
    with jax.enable_x64(True):
        ours = sample(
            "unipc",
            model_fn,
            jnp.asarray(noise),
            flow_levels_from_times(times),
            prediction_type="flow_velocity",
        )
        x = torch.from_numpy(noise.copy())
        for time, timestep in zip(times, scheduler.timesteps, strict=False):
            velocity = model_fn(jnp.asarray(x.numpy()), jnp.full((64,), time), None)
            x = scheduler.step(torch.from_numpy(np.array(velocity)), timestep, x).prev_sample
    assert float(np.max(np.abs(np.asarray(ours) - x.numpy()))) <= 1e-4
