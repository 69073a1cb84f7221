"""Schedules against published numbers, float64 NumPy re-derivations and the spacing examples."""

import math

import numpy as np
import pytest

from diffusion import schedules
from diffusion.schedules import (
    DiscreteSchedule,
    FlowPath,
    ScheduleError,
    ddpm_levels,
    flow_levels,
    flow_levels_from_times,
    flow_time_grid,
    make_betas,
    rescale_zero_terminal_snr,
    sampling_timesteps,
)

T = 1000


def test_linear_and_scaled_linear_betas_match_a_float64_loop():
    linear = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    root_start, root_end = math.sqrt(0.00085), math.sqrt(0.012)
    scaled = [(root_start + (root_end - root_start) * i / (T - 1)) ** 2 for i in range(T)]
    np.testing.assert_allclose(make_betas("linear", T), linear, rtol=1e-12)
    np.testing.assert_allclose(make_betas("scaled_linear", T), scaled, rtol=1e-12)


def test_scaled_linear_terminal_values_match_stable_diffusion_numbers():
    alpha_bar = DiscreteSchedule.from_name("scaled_linear", T).alpha_bar
    assert math.sqrt(alpha_bar[-1]) == pytest.approx(0.068265, abs=1e-6)
    assert alpha_bar[-1] / (1 - alpha_bar[-1]) == pytest.approx(0.004682, abs=1e-6)


def test_cosine_schedule_follows_the_improved_ddpm_formula():
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = make_betas("cosine", T)
    expected = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    # Unclipped steps telescope: alpha_bar_k = f((k + 1) / T) / f(0) (Nichol & Dhariwal eq. 17).
    alpha_bar = DiscreteSchedule.from_name("cosine", T).alpha_bar
    unclipped = np.flatnonzero(betas < 0.999)
    last = unclipped[unclipped == np.arange(len(unclipped))][-1]
    np.testing.assert_allclose(
        alpha_bar[: last + 1], [f((k + 1) / T) / f(0) for k in range(last + 1)], rtol=1e-9
    )
    assert betas[-1] == 0.999  # the cap bites at the end


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_is_an_affine_map_of_sqrt_alpha_bar(name):
    betas = make_betas(name, T)
    before = np.sqrt(np.cumprod(1 - betas))
    after = np.sqrt(np.cumprod(1 - rescale_zero_terminal_snr(betas)))
    assert after[-1] == pytest.approx(0.0, abs=1e-12)
    assert after[0] == pytest.approx(before[0], rel=1e-12)
    expected = (before - before[-1]) / (before[0] - before[-1]) * before[0]  # Lin et al. Alg. 1
    np.testing.assert_allclose(after, expected, atol=1e-12)


def test_timestep_spacings_reproduce_the_documented_examples():
    np.testing.assert_array_equal(
        sampling_timesteps(5, T, "leading", steps_offset=1), [801, 601, 401, 201, 1]
    )
    np.testing.assert_array_equal(
        sampling_timesteps(10, T, "trailing"), [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    )
    np.testing.assert_array_equal(
        sampling_timesteps(10, T, "linspace"), [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    )
    np.testing.assert_array_equal(sampling_timesteps(10, T, "leading"), np.arange(900, -1, -100))
    # trailing with T % N != 0 still starts at T - 1 and is strictly decreasing
    trailing = sampling_timesteps(7, T, "trailing")
    assert trailing[0] == T - 1 and np.all(np.diff(trailing) < 0)


def test_discrete_time_mapping_round_trips_and_matches_alpha_bar():
    schedule = DiscreteSchedule.from_name("linear", T)
    steps = np.arange(T)
    times = schedule.time_of_step(steps)
    assert times[-1] == 1.0 and times[0] == pytest.approx(1 / T)
    np.testing.assert_array_equal(np.asarray(schedule.step_of_time(times)), steps)
    alpha, sigma = schedule.alpha_sigma(np.asarray(times, np.float32))
    np.testing.assert_allclose(alpha, np.sqrt(schedule.alpha_bar), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(sigma, np.sqrt(1 - schedule.alpha_bar), rtol=2e-4, atol=1e-6)
    clean_alpha, clean_sigma = schedule.alpha_sigma(np.float32(0.0))
    assert float(clean_alpha) == 1.0 and float(clean_sigma) == 0.0


def test_ddpm_levels_step_to_the_next_entry_of_the_timestep_list():
    schedule = DiscreteSchedule.from_name("linear", T)
    steps = sampling_timesteps(10, T, "linspace")
    levels = ddpm_levels(schedule, 10, "linspace")
    np.testing.assert_allclose(levels.alpha[:-1], np.sqrt(schedule.alpha_bar[steps]))
    np.testing.assert_allclose(levels.t[:-1], (steps + 1) / T)
    assert (levels.alpha[-1], levels.sigma[-1], levels.t[-1]) == (1.0, 0.0, 0.0)
    kept = ddpm_levels(schedule, 10, "linspace", set_alpha_to_one=False)
    assert kept.alpha[-1] == pytest.approx(math.sqrt(schedule.alpha_bar[0]))


def test_flow_grid_applies_the_shift_exactly_once():
    np.testing.assert_allclose(flow_time_grid(4, shift=3.0), [1.0, 0.9, 0.75, 0.5, 0.0])
    np.testing.assert_allclose(flow_time_grid(4), [1.0, 0.75, 0.5, 0.25, 0.0])
    levels = flow_levels(4, shift=3.0)
    alpha, sigma = FlowPath().alpha_sigma(levels.t)
    np.testing.assert_allclose(levels.alpha, alpha, rtol=1e-6)
    np.testing.assert_allclose(levels.sigma, sigma, rtol=1e-6)
    assert levels.is_flow_path


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_betas("sigmoid"), "linear, scaled_linear, cosine"),
        (lambda: make_betas("cosine", T, beta_start=0.1), "beta_start"),
        (lambda: sampling_timesteps(10, T, "uniform"), "leading, trailing, linspace"),
        (lambda: sampling_timesteps(0, T), ">= 1"),
        (lambda: sampling_timesteps(1001, T), "at most 1000"),
        (lambda: sampling_timesteps(T, T, "leading", steps_offset=1), "outside 0..999"),
        (lambda: flow_levels(0), ">= 1"),
        (lambda: flow_levels(4, shift=0.0), "positive"),
        (lambda: flow_levels_from_times([1.0, 0.5, 0.5, 0.0]), "decrease strictly"),
        (lambda: flow_levels_from_times([0.0, 0.5, 1.0]), "decrease strictly"),
        (lambda: flow_levels_from_times([1.5, 0.5, 0.0]), "[0, 1]"),
        (
            lambda: schedules.NoiseLevels(t=[0.0, 1.0], alpha=[1.0, 0.0], sigma=[0.0, 1.0]),
            "noisy to clean",
        ),
    ],
)
def test_bad_schedule_input_is_rejected_with_a_clear_message(call, message):
    with pytest.raises(ScheduleError) as error:
        call()
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)
