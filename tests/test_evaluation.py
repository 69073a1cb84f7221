"""The shapes oracle and the CLIP metrics against independent truths.

Truths: the dataset's own renderer and labels (the oracle must read back what was drawn), the
closed-form Frechet distance between Gaussians, float64 loops for CLIP score and zero-shot.
"""

import dataclasses
import itertools
import types

import numpy as np
import pytest

from diffusion import evaluation
from diffusion.data import shapes
from diffusion.errors import UserError
from diffusion.evaluation import report, sweep

# ---------------------------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------------------------


def _dataset_examples(split, count, resolution, seed):
    """Examples exactly as the TFDS builder draws them (attributes, jitter, renderer)."""
    attributes = shapes.sample_attributes(split, count, np.random.default_rng(seed))
    images = shapes.render_attributes(attributes, resolution)
    labels = {a: getattr(attributes, a) for a in evaluation.ATTRIBUTES}
    return images, labels


def _add_noise(images, sigma, seed):
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(np.rint(images + noise), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resolution", [16, 32, 64])
@pytest.mark.parametrize("split", ["test", "test_unseen"])
def test_oracle_reads_real_dataset_images(split, resolution):
    count = 300 if resolution < 64 else 150
    images, labels = _dataset_examples(split, count, resolution, seed=[resolution, 1])
    for sigma in (0.0, 8.0):  # clean, and mild Gaussian pixel noise (clipped to uint8)
        noisy = images if sigma == 0 else _add_noise(images, sigma, seed=resolution)
        accuracy = evaluation.attribute_accuracy(evaluation.read_attributes(noisy), labels)
        for attribute in evaluation.ATTRIBUTES:
            assert accuracy[attribute] >= 0.99, (split, resolution, sigma, accuracy)


def test_oracle_reads_every_combination_without_jitter():
    combos = list(
        itertools.product(
            range(len(shapes.SHAPES)),
            range(len(shapes.COLOR_NAMES)),
            range(len(shapes.SIZES)),
            range(len(shapes.POSITIONS)),
            range(len(shapes.BACKGROUND_NAMES)),
        )
    )
    # The dataset never draws a color on a background of the same color.
    combos = [c for c in combos if shapes.COLOR_NAMES[c[1]] != shapes.BACKGROUND_NAMES[c[4]]]
    columns = np.array(combos).T
    attributes = shapes.AttributeBatch(
        *columns,
        jitter=np.zeros((len(combos), 3)),
        template=np.zeros(len(combos), int),
        prefix=np.zeros(len(combos), int),
    )
    images = shapes.render_attributes(attributes, 32)
    reading = evaluation.read_attributes(images)
    for name, column in zip(evaluation.ATTRIBUTES, columns, strict=True):
        wrong = np.flatnonzero(getattr(reading, name) != column)
        assert wrong.size == 0, (name, [reading.names(i) for i in wrong[:3]])


def test_oracle_geometry_matches_the_renderer():
    """Centre and radius read back are the ones drawn (jitter included)."""
    rng = np.random.default_rng(3)
    attributes = shapes.sample_attributes("test", 200, rng)
    images = shapes.render_attributes(attributes, 64)
    sizes = [shapes.SIZES[i] for i in attributes.size]
    positions = [shapes.POSITIONS[i] for i in attributes.position]
    centers, radii = shapes._jittered_geometry(sizes, positions, attributes.jitter)
    reading = evaluation.read_attributes(images)
    np.testing.assert_allclose(reading.center, centers, atol=1.0 / 64)  # within a pixel
    np.testing.assert_allclose(reading.radius, radii, rtol=0.05)


def test_oracle_on_blank_and_odd_inputs():
    blank = np.zeros((3, 16, 16, 3), np.uint8)
    reading = evaluation.read_attributes(blank)  # defined, no crash, nothing is there
    assert reading.shape.shape == (3,) and np.all(reading.area == 0)
    assert evaluation.read_attributes(np.zeros((0, 16, 16, 3), np.uint8)).shape.size == 0
    with pytest.raises(ValueError, match="N, H, W, 3"):
        evaluation.read_attributes(np.zeros((2, 16, 16), np.uint8))


def test_attribute_accuracy_counts_all_four():
    images, labels = _dataset_examples("test", 20, 32, seed=5)
    reading = evaluation.read_attributes(images)
    wrong = dict(labels, color=(labels["color"] + 1) % 8)
    wrong["color"][10:] = labels["color"][10:]  # half the colors wrong
    accuracy = evaluation.attribute_accuracy(reading, wrong)
    assert accuracy["color"] == 0.5 and accuracy["all"] == 0.5 and accuracy["shape"] == 1.0


def test_misreads_count_each_label_read_as_another_value():
    images, labels = _dataset_examples("test", 20, 32, seed=5)
    reading = evaluation.read_attributes(images)
    shifted = dict(labels, color=(labels["color"] + 1) % 8)
    shifted["color"][10:] = labels["color"][10:]  # the first ten colors labelled one further on
    found = evaluation.misreads(reading, shifted)
    assert found["shape"] == {} and found["background"] == {}
    names = evaluation.VOCABULARIES["color"]
    expected = {}
    for label, read in zip(shifted["color"][:10], labels["color"][:10], strict=True):
        key = f"{names[label]} as {names[read]}"
        expected[key] = expected.get(key, 0) + 1
    assert found["color"] == expected
    assert list(found["color"].values()) == sorted(expected.values(), reverse=True)


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(0)
    mean_a, mean_b = rng.normal(size=5), rng.normal(size=5)
    var_a, var_b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    # Commuting covariances: d^2 = |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2.
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = evaluation.frechet_distance(mean_a, np.diag(var_a), mean_b, np.diag(var_b))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_of_general_gaussians():
    rng = np.random.default_rng(1)
    dim = 6
    mean_a, mean_b = rng.normal(size=dim), rng.normal(size=dim)
    cov_a, cov_b = _random_spd(rng, dim), _random_spd(rng, dim)
    # Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): the right side is symmetric, so
    # eigendecompositions give it without any non-symmetric matrix square root.
    values, vectors = np.linalg.eigh(cov_a)
    root_a = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    trace_root = np.sum(np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a)))
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b) - 2 * trace_root
    got = evaluation.frechet_distance(mean_a, cov_a, mean_b, cov_b)
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    assert abs(evaluation.frechet_distance(mean_a, cov_a, mean_a, cov_a)) < 1e-8


def test_frechet_distance_of_samples_converges_to_the_gaussians():
    rng = np.random.default_rng(2)
    cov_a, cov_b = np.diag([1.0, 0.25, 4.0]), np.diag([0.5, 1.0, 2.0])
    mean_a, mean_b = np.zeros(3), np.array([1.0, -1.0, 0.5])
    a = rng.multivariate_normal(mean_a, cov_a, size=40_000)
    b = rng.multivariate_normal(mean_b, cov_b, size=40_000)
    expected = evaluation.frechet_distance(mean_a, cov_a, mean_b, cov_b)
    assert abs(evaluation.frechet_distance_of_features(a, b) - expected) < 0.05 * expected
    # Fewer samples than dimensions: a singular covariance still gives a finite distance.
    assert np.isfinite(evaluation.frechet_distance_of_features(a[:4], rng.normal(size=(4, 3))))


# ---------------------------------------------------------------------------------------------
# CLIP score and zero-shot classification
# ---------------------------------------------------------------------------------------------


def test_clip_score_against_a_float64_loop():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    texts[:10] = -images[:10]  # some negative cosines: clipped to 0
    expected = np.mean(
        [
            100 * max(float(i @ t) / (np.linalg.norm(i) * np.linalg.norm(t)), 0.0)
            for i, t in zip(images, texts, strict=True)
        ]
    )
    np.testing.assert_allclose(evaluation.clip_score(images, texts), expected, rtol=1e-12)
    assert evaluation.clip_score(images, 3 * images) == pytest.approx(100.0)


def test_zero_shot_accuracy_against_a_float64_loop():
    rng = np.random.default_rng(1)
    num_classes, num_prompts, dim = 6, 4, 16
    prompt_embeddings = [rng.normal(size=(num_prompts, dim)) for _ in range(num_classes)]
    labels = rng.integers(num_classes, size=200)
    images = rng.normal(size=(200, dim))

    # Reference: each class = normalised mean of its normalised prompt embeddings (CLIP sec.
    # 3.1.4); a prediction = the class of largest cosine.
    classes = []
    for embeddings in prompt_embeddings:
        mean = np.mean([e / np.linalg.norm(e) for e in embeddings], axis=0)
        classes.append(mean / np.linalg.norm(mean))
    predictions = [
        int(np.argmax([image @ c / np.linalg.norm(image) for c in classes])) for image in images
    ]
    expected = np.mean(np.array(predictions) == labels)

    class_embeddings = evaluation.ensemble_class_embeddings(prompt_embeddings)
    np.testing.assert_allclose(class_embeddings, np.array(classes), atol=1e-12)
    assert evaluation.zero_shot_accuracy(images, class_embeddings, labels) == expected
    # Images near their class embedding are all classified right.
    near = class_embeddings[labels] + 0.01 * rng.normal(size=(200, dim))
    assert evaluation.zero_shot_accuracy(near, class_embeddings, labels) == 1.0


def test_zero_shot_top_k_accuracy_on_hand_made_embeddings():
    # Four classes on the axes of a plane; each image's rank of its class worked out by hand.
    classes = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    images = 3.0 * np.array(
        [
            [1.0, 0.1],  # class 0 first: rank 0
            [1.0, 0.2],  # class 1 after class 0: rank 1
            [0.1, -1.0],  # class 2 after classes 3 and 0: rank 2
            [1.0, 1.0],  # class 1 tied with class 0: the tie counts against it, rank 1
        ]
    )
    labels = np.array([0, 1, 2, 1])
    top = evaluation.zero_shot_top_k_accuracy(images, classes, labels, ks=(1, 2, 3, 4))
    assert top == {1: 0.25, 2: 0.75, 3: 1.0, 4: 1.0}
    # Top-1 without ties is zero_shot_accuracy's argmax.
    rng = np.random.default_rng(2)
    images, classes = rng.normal(size=(50, 8)), rng.normal(size=(6, 8))
    labels = rng.integers(6, size=50)
    top1 = evaluation.zero_shot_top_k_accuracy(images, classes, labels, ks=(1,))[1]
    assert top1 == evaluation.zero_shot_accuracy(images, classes, labels)
    with pytest.raises(ValueError, match=r"class indices in \[0, 6\)"):
        evaluation.zero_shot_top_k_accuracy(images, classes, labels + 1)


def test_label_class_prompts_caption_each_class_as_the_dataset_does():
    from configs import common
    from diffusion.data.classes import ClassSpace

    shapes_only = ClassSpace(("shape",), (("circle", "square", "triangle"),))
    data = common.data_config()
    data.label_key = "shape"  # captions "a photo of a {label}" (the default template)
    assert evaluation.label_class_prompts(shapes_only, data) == (
        "a photo of a {label}",
        ["a photo of a circle", "a photo of a square", "a photo of a triangle"],
    )
    data.caption_template = "a {size} {label}"
    sized = ClassSpace(("size", "shape"), (("small", "large"), ("circle", "square")))
    data.class_features = ("size", "shape")
    template, prompts = evaluation.label_class_prompts(sized, data)
    assert template == "a {size} {label}"
    assert prompts == ["a small circle", "a small square", "a large circle", "a large square"]
    # A template over other fields than the classes' (or captions from a text feature): the
    # class name in CLIP's prompt.
    assert evaluation.label_class_prompts(shapes_only, data)[1][0] == "a photo of a circle"
    captioned = common.data_config()
    template, prompts = evaluation.label_class_prompts(sized, captioned)
    assert template == "a photo of a {label}" and prompts[1] == "a photo of a small square"


@pytest.mark.parametrize("attribute", evaluation.ATTRIBUTES)
def test_class_prompts_name_their_class(attribute):
    prompts = evaluation.class_prompts(attribute)
    vocabulary = evaluation.VOCABULARIES[attribute]
    assert len(prompts) == len(vocabulary)
    for value, class_list in zip(vocabulary, prompts, strict=True):
        words = evaluation.POSITION_PHRASES[value] if attribute == "position" else value
        assert class_list and all(words in p for p in class_list)
        assert len(set(class_list)) == len(class_list)
        assert not any("{" in p or " a a" in p or "a orange" in p for p in class_list)
    with pytest.raises(ValueError, match="unknown attribute"):
        evaluation.class_prompts("texture")


# ---------------------------------------------------------------------------------------------
# Flag parsing and report pieces
# ---------------------------------------------------------------------------------------------


def test_parse_guidance_scales_and_samplers():
    assert evaluation.parse_guidance_scales("1,2,4.5") == (1.0, 2.0, 4.5)
    assert evaluation.parse_samplers("euler:20, ddim:50") == (("euler", 20), ("ddim", 50))
    assert evaluation.parse_samplers("") == ()
    for bad in ("1,x", "", "2,-1", "nan"):
        with pytest.raises(UserError, match="guidance_scales"):
            evaluation.parse_guidance_scales(bad)
    with pytest.raises(UserError, match="unknown sampler 'foo'.*euler"):
        evaluation.parse_samplers("foo:20")
    for bad in ("euler", "euler:0", "euler:x"):
        with pytest.raises(UserError, match="step count"):
            evaluation.parse_samplers(bad)


def test_negative_check_uses_a_scale_where_the_negative_prompt_acts():
    assert evaluation.negative_check_scale(4.0, (1.0, 4.0)) == 4.0
    assert evaluation.negative_check_scale(1.0, (1.0, 2.0, 6.0)) == 6.0
    assert evaluation.negative_check_scale(1.0, (1.0,)) == 3.0


def test_best_setting_takes_the_highest_score_and_breaks_ties_by_the_mean():
    def result(primary, shape, color, grid):
        return {"accuracy": {"shape": shape, "color": color, "all": primary}, "grid": grid}

    samples = {
        "euler:20": {"1": result(0.5, 0.9, 0.9, "a"), "4": result(0.75, 0.5, 0.5, "b")},
        "ddim:50": {"4": result(0.75, 1.0, 0.75, "c"), "6": result(0.75, 1.0, 0.75, "d")},
    }

    def score(r):
        return sweep.accuracy_score(r["accuracy"], "all", ("shape", "color"))

    best = sweep.best_setting(samples, score, drop="grid")
    # ddim:50 at 4 and 6 tie on both: the first of the sweep wins; the grid is left out.
    assert best == {
        "sampler": "ddim:50",
        "guidance_scale": 4.0,
        "accuracy": {"shape": 1.0, "color": 0.75, "all": 0.75},
    }
    assert list(best) == ["sampler", "guidance_scale", "accuracy"]


class _FakePipe:
    def __init__(self):
        self.calls = []

    def generate(self, conditions, **kwargs):
        self.calls.append(kwargs)
        return [f"{c}@{kwargs['sampler']}:{kwargs['guidance_scale']:g}" for c in conditions]


def test_settings_of_split_samples_every_setting_in_order_and_stops_when_asked():
    options = evaluation.EvaluationOptions(
        guidance_scales=(1.0, 4.0),
        batch_size=8,
        splits=("test",),
        shift=2.0,
        guidance_interval=(0.1, 0.7),
    )
    samplers = (("euler", 20), ("ddim", 50))
    progress = types.SimpleNamespace(n=0)
    progress.update = lambda k: setattr(progress, "n", progress.n + k)
    pipe = _FakePipe()
    seen = []
    for setting, outputs, seconds in sweep.settings_of_split(
        pipe, "test", ["a", "b"], samplers, options, progress
    ):
        assert progress.n == len(seen)  # moved on only once the caller is done with a setting
        assert seconds >= 0
        seen.append((dataclasses.astuple(setting), outputs))
    assert progress.n == 4
    assert [s for s, _ in seen] == [
        ("test", "euler", 20, 1.0),
        ("test", "euler", 20, 4.0),
        ("test", "ddim", 50, 1.0),
        ("test", "ddim", 50, 4.0),
    ]
    assert seen[1][1] == ["a@euler:4", "b@euler:4"]
    assert all(call["seeds"] == [0, 1] and call["batch_size"] == 8 for call in pipe.calls)
    # The sweep's sampler options reach every setting's sampling.
    expected = {"eta": 0.0, "shift": 2.0, "guidance_rescale": 0.0, "guidance_interval": (0.1, 0.7)}
    assert all({k: call.get(k) for k in expected} == expected for call in pipe.calls)

    setting = sweep.Setting("test", "euler", 20, 4.0)
    assert setting.place == ("euler:20", "4")
    assert setting.file_stem == "test_euler-20_cfg4"
    assert setting.title == "test: euler 20 steps, guidance 4"
    assert setting.gallery_tags == {"split": "test", "sampler": "euler:20", "scale": 4.0}
    samples = {}
    setting.store(samples, {"seconds": 1.0})
    assert samples == {"euler:20": {"4": {"seconds": 1.0}}}

    asked = iter([False, True])
    settings = sweep.settings_of_split(
        _FakePipe(), "test", ["a"], samplers, options, progress, stop=lambda: next(asked)
    )
    next(settings)
    with pytest.raises(sweep.EvaluationStopped, match="stopped before test euler 4.0"):
        next(settings)


def test_save_grid_layout(tmp_path):
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8)
    path = report.save_grid(images, str(tmp_path / "g.png"), columns=4, tile=48, frame=2)
    grid = np.asarray(Image.open(path))
    cell = 16 * 3 + 2 * 2
    assert grid.shape == (3 * cell, 4 * cell, 3)
    # Image 5 (row 1, column 1) sits inside its frame, scaled 3x by pixel repetition.
    tile = grid[cell + 2 : cell + 2 + 48, cell + 2 : cell + 2 + 48]
    np.testing.assert_array_equal(tile, images[5].repeat(3, 0).repeat(3, 1))


# ---------------------------------------------------------------------------------------------
# Linear probes (scripts/probe_text_tower.py)
# ---------------------------------------------------------------------------------------------


def test_between_class_variance_share_is_the_r2_of_the_class_means():
    features = np.array([[0.0], [1], [3], [4]])  # centred -2 -1 1 2: total 10
    share = evaluation.between_class_variance_share(features, [0, 0, 1, 1])
    assert share == pytest.approx(0.9)  # class means -1.5, 1.5: 4 x 2.25 = 9
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    features = rng.normal(size=(5, 3))[labels] + rng.normal(size=(400, 3))
    one_hot = np.eye(5)[labels]  # least squares on the one-hot design predicts the class means
    residual = features - one_hot @ np.linalg.lstsq(one_hot, features, rcond=None)[0]
    centred = features - features.mean(0)
    r2 = 1 - np.sum(residual**2) / np.sum(centred**2)
    assert evaluation.between_class_variance_share(features, labels) == pytest.approx(r2)


def test_linear_probe_reads_a_small_but_separable_direction_and_not_random_labels():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 3000)
    features = rng.normal(size=(3000, 8))
    # Classes as directions of three tiny columns (1e-3 of the others' scale), little noise.
    features[:, 5:] = 1e-3 * (np.eye(3)[labels] + 0.1 * rng.normal(size=(3000, 3)))
    train, test = slice(0, 2000), slice(2000, None)
    accuracy = evaluation.linear_probe_accuracy(
        features[train], labels[train], features[test], labels[test]
    )
    assert accuracy == 1.0  # standardised, the tiny column is as readable as any other
    noise_labels = rng.integers(0, 4, 3000)  # independent of the features: chance, 0.25
    chance = evaluation.linear_probe_accuracy(
        features[train], noise_labels[train], features[test], noise_labels[test]
    )
    assert abs(chance - 0.25) < 0.06
