"""Fidelity and diversity metrics against closed-form truths: total variation of known
histograms, spread and diversity ratios of scaled and repeated sets, the per-caption check on the
data's own images, and the Frechet distance in an autoencoder's latent space."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from diffusion import rundir
from diffusion.data import shapes as shapes_lib
from diffusion.data.latents import LatentEncoding
from diffusion.errors import UserError
from diffusion.evaluation import autoencoder_features, fidelity
from diffusion.evaluation.clip_metrics import frechet_distance_of_features
from diffusion.evaluation.shapes_oracle import ATTRIBUTES, VOCABULARIES, read_attributes
from diffusion.models.autoencoder import Autoencoder, autoencoder_config


def test_total_variation_of_known_histograms():
    assert fidelity.total_variation_distance([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]) == 0.5
    assert fidelity.total_variation_distance([1, 0], [0, 1]) == 1.0
    # Unnormalised counts are normalised first.
    assert fidelity.total_variation_distance([2, 2], [1, 3]) == pytest.approx(0.25)


def test_total_variation_of_label_sets():
    labels = np.array([0, 1, 2, 2, 1])
    assert fidelity.label_total_variation(labels, labels[::-1], 3) == 0.0
    assert fidelity.label_total_variation(np.array([0, 0, 1]), np.array([2, 2]), 3) == 1.0
    np.testing.assert_allclose(fidelity.histogram(labels, 4), [0.2, 0.4, 0.4, 0.0])


def test_spread_ratio_of_a_scaled_set_is_the_scale():
    points = np.random.default_rng(0).normal(size=(50, 2))
    assert fidelity.spread_ratio(3.0 * points + 7.0, points) == pytest.approx(3.0)
    assert fidelity.spread_ratio(np.zeros((5, 2)), points) == 0.0
    assert fidelity.spread_ratio(points, np.ones((5, 2))) is None  # the data does not vary
    assert fidelity.spread([1.0, 3.0]) == 1.0


def test_mean_pairwise_distance_of_a_known_set():
    # Corners of a unit square: four sides of length 1, two diagonals of sqrt(2).
    square = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
    assert fidelity.mean_pairwise_distance(square) == pytest.approx((4 + 2 * np.sqrt(2)) / 6)


def test_diversity_ratio_is_0_for_one_image_repeated_and_1_for_the_same_distribution():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 16))
    assert fidelity.diversity_ratio(np.repeat(real[:1], 8, axis=0), real) == 0.0
    assert fidelity.diversity_ratio(rng.normal(size=(400, 16)), real) == pytest.approx(1, abs=0.03)
    assert fidelity.diversity_ratio(2 * real, real) == pytest.approx(2.0)


def test_pixel_features_average_blocks():
    images = np.zeros((1, 16, 16, 3), np.uint8)
    images[0, :2, :2] = 255  # one 2x2 block white: one feature pixel 1, the rest 0
    features = fidelity.pixel_features(images, side=8)
    assert features.shape == (1, 8 * 8 * 3)
    assert features.sum() == pytest.approx(3.0) and features.max() == 1.0


def test_reference_images_follow_the_caption():
    labels = {"shape": 0, "color": 2, "size": 1, "position": 4, "background": 1}
    named = fidelity.reference_images(labels, True, 6, np.random.default_rng(0), 32)
    reading = read_attributes(named)
    for attribute, value in labels.items():
        assert (getattr(reading, attribute) == value).all(), attribute
    assert fidelity.mean_pairwise_distance(fidelity.pixel_features(named)) > 0  # jitter
    # A caption without a background: any background but the shape's colour (blue here).
    open_ = fidelity.reference_images(labels, False, 60, np.random.default_rng(0), 32)
    backgrounds = set(read_attributes(open_).background.tolist())
    assert backgrounds == {0, 1, 2}
    white = dict(labels, color=shapes_lib.COLOR_NAMES.index("white"))
    open_ = fidelity.reference_images(white, False, 60, np.random.default_rng(0), 32)
    assert set(read_attributes(open_).background.tolist()) == {0, 1}


def test_caption_diversity_of_the_data_and_of_a_collapsed_model():
    rng = np.random.default_rng(0)
    labels = [{"shape": s, "color": s, "size": 0, "position": s, "background": 2} for s in range(3)]
    references = np.stack([fidelity.reference_images(lab, False, 16, rng, 16) for lab in labels])
    data = np.stack([fidelity.reference_images(lab, False, 8, rng, 16) for lab in labels])
    collapsed = np.repeat(data[:, :1], 8, axis=1)  # one image per caption, repeated
    names_background = np.zeros(3, bool)
    result = fidelity.caption_diversity(data, references, names_background)
    assert result["ratio"] == pytest.approx(1.0, abs=0.35)
    assert result["num_open_background_captions"] == 3
    collapsed_result = fidelity.caption_diversity(collapsed, references, names_background)
    assert collapsed_result["ratio"] == 0.0 and collapsed_result["fraction_at_target"] == 0.0
    # One background per caption against a uniform pick of two or three.
    assert collapsed_result["background_total_variation"] >= 0.5
    assert collapsed_result["real_ratio"] == result["real_ratio"]  # the same real images


def test_open_attribute_metrics_of_real_images_against_themselves():
    examples = [e for _, e in shapes_lib.generate_examples("test", 64, 32, seed=0)]
    images = np.stack([e["image"] for e in examples])
    captions = [e["caption"] for e in examples]
    labels = {a: np.array([VOCABULARIES[a].index(e[a]) for e in examples]) for a in ATTRIBUTES}
    reading = read_attributes(images)
    result = fidelity.open_attribute_metrics(reading, reading, labels, captions)
    assert result["background"]["total_variation"] == 0.0
    assert 0 < result["background"]["num_captions"] < 64
    assert result["position_spread_ratio"] == 1.0 and result["size_spread_ratio"] == 1.0
    # Every sample on a gray background, shapes where the data has them: TV = 1 - P(gray).
    gray = shapes_lib.BACKGROUND_NAMES.index("gray")
    all_gray = dataclasses.replace(reading, background=np.full(64, gray))
    open_ = np.array([not fidelity.caption_names_background(c) for c in captions])
    expected = 1.0 - np.mean(reading.background[open_] == gray)
    result = fidelity.open_attribute_metrics(all_gray, reading, labels, captions)
    assert result["background"]["total_variation"] == pytest.approx(expected)


def test_frechet_distance_in_autoencoder_space():
    config = autoencoder_config("tiny", block_out_channels=(8, 16), norm_num_groups=4)
    model = Autoencoder(config, rngs=nnx.Rngs(0))
    features = autoencoder_features.AutoencoderFeatures("tiny", "a test", model, 16)
    examples = [e for _, e in shapes_lib.generate_examples("test", 48, 16, seed=0)]
    images = np.stack([e["image"] for e in examples])
    encoded = features.encode(images)
    assert encoded.shape[0] == 48 and encoded.ndim == 2
    assert frechet_distance_of_features(encoded, encoded) == pytest.approx(0.0, abs=1e-3)
    distances = [frechet_distance_of_features(encoded, encoded + shift) for shift in (0.5, 1.0)]
    assert 1e-3 < distances[0] < distances[1]
    # A shift of every feature by s moves the means apart by s^2 per dimension.
    assert distances[1] == pytest.approx(encoded.shape[1], rel=1e-3)


def test_the_feature_autoencoder_is_the_flags_else_a_latent_runs_own(tmp_path):
    latent_run, pixel_run = str(tmp_path / "latent"), str(tmp_path / "pixel")
    encoding = LatentEncoding(
        autoencoder="/runs/ae",
        scaling_factor=1.0,
        shift_factor=0.0,
        latent_shape=(4, 4, 4),
        downsampling_factor=4,
    )
    rundir.save_latents(latent_run, encoding)
    assert autoencoder_features.feature_autoencoder_path(latent_run, None)[0] == "/runs/ae"
    assert autoencoder_features.feature_autoencoder_path(latent_run, "/ae2")[0] == "/ae2"
    assert autoencoder_features.feature_autoencoder_path(pixel_run, None) is None


def test_an_autoencoder_that_cannot_encode_the_images_is_refused():
    config = autoencoder_config("tiny", block_out_channels=(8, 16, 16), norm_num_groups=4)
    features = autoencoder_features.AutoencoderFeatures(
        "/runs/ae", "--feature_autoencoder='/runs/ae'", Autoencoder(config, rngs=nnx.Rngs(0))
    )
    features.check_resolution(16)
    with pytest.raises(UserError, match="--feature_autoencoder='/runs/ae'.*multiple of 4.*18x18"):
        features.check_resolution(18)
