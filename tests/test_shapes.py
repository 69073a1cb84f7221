"""The captioned-shapes TFDS builder and its renderer (diffusion/data/shapes.py)."""

import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import diffusion.data  # noqa: F401  (registers "shapes")
from diffusion.data import shapes

SIZES = {"num_train": 400, "num_test": 60, "num_test_unseen": 60}
LABELS = ("shape", "color", "size", "position", "background")
VOCABULARIES = {
    "shape": shapes.SHAPES,
    "color": tuple(shapes.COLORS),
    "size": shapes.SIZES,
    "position": shapes.POSITIONS,
    "background": tuple(shapes.BACKGROUNDS),
}


def _build(data_dir, resolution=32, seed=0):
    config = shapes.shapes_config(resolution, seed=seed, **SIZES)
    builder = tfds.builder("shapes", config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("shapes"))


def _records(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def _names(builder, record):
    features = builder.info.features
    return {key: features[key].int2str(int(record[key])) for key in LABELS}


def _array_record_bytes(builder):
    files = sorted(builder.data_path.glob("*.array_record*"))
    assert len(files) == 3  # one file per split
    return [f.read_bytes() for f in files]


def test_builds_and_reads_without_tensorflow(builder):
    assert "tensorflow" not in sys.modules
    assert {s: builder.info.splits[s].num_examples for s in shapes.SPLITS} == {
        "train": 400,
        "test": 60,
        "test_unseen": 60,
    }
    assert builder.info.file_format.value == "array_record"
    record = builder.as_data_source(split="train")[0]
    assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8


def test_registered_name_and_default_config(tmp_path):
    assert "shapes" in tfds.list_builders(with_community_datasets=False)
    assert tfds.builder("shapes", data_dir=str(tmp_path)).builder_config.resolution == 32
    for resolution in shapes.RESOLUTIONS:
        config = tfds.builder(f"shapes/{resolution}", data_dir=str(tmp_path)).builder_config
        assert config.resolution == resolution and config.num_train == 100_000


def test_same_seed_same_bytes_other_seed_other_bytes(builder, tmp_path):
    again = _build(tmp_path / "again")
    assert _array_record_bytes(again) == _array_record_bytes(builder)
    other = _build(tmp_path / "other", seed=1)
    for other_bytes, original_bytes in zip(
        _array_record_bytes(other), _array_record_bytes(builder), strict=True
    ):
        assert other_bytes != original_bytes


def test_class_label_names_are_the_attribute_words(builder):
    for key, vocabulary in VOCABULARIES.items():
        assert builder.info.features[key].names == list(vocabulary)


def test_every_attribute_value_appears_in_train(builder):
    for key, vocabulary in VOCABULARIES.items():
        seen = {int(r[key]) for r in _records(builder, "train")}
        assert seen == set(range(len(vocabulary))), key


def test_unseen_pairs_only_in_test_unseen(builder):
    assert len(shapes.UNSEEN_PAIRS) >= 6
    unseen = set(shapes.UNSEEN_PAIRS)
    for split in ("train", "test"):
        pairs = {
            (n["color"], n["shape"])
            for n in map(lambda r: _names(builder, r), _records(builder, split))
        }
        assert not pairs & unseen, split
    pairs = {
        (_names(builder, r)["color"], _names(builder, r)["shape"])
        for r in _records(builder, "test_unseen")
    }
    assert pairs <= unseen and len(pairs) >= 4


def test_captions_contain_attribute_words_and_background_differs(builder):
    for split in shapes.SPLITS:
        for record in _records(builder, split):
            names = _names(builder, record)
            caption = record["caption"].decode()
            for key in ("shape", "color", "size", "position"):
                assert re.search(rf"\b{names[key]}\b", caption), (key, caption)
            if "background" in caption:
                assert re.search(rf"\b{names['background']} background\b", caption), caption
            assert names["background"] != names["color"]


def test_image_pixels_are_background_and_shape_colors(builder):
    for record in _records(builder, "test")[:30]:
        names = _names(builder, record)
        pixels = record["image"].reshape(-1, 3)
        background = np.all(pixels == shapes.BACKGROUNDS[names["background"]], axis=1)
        color = np.all(pixels == shapes.COLORS[names["color"]], axis=1)
        assert background.mean() > 0.4  # the largest shape covers < 60 % of the image
        assert color.sum() >= 4  # fully covered interior pixels
        assert 0 < (~background & ~color).sum() < 0.3 * len(pixels)  # anti-aliased edge


# Closed-form areas in units of r^2 (see the SDF definitions in shapes.py).
_HEART_H = shapes._HEART_HALF_DIAGONAL
CLOSED_FORM_AREAS = {
    "circle": np.pi,
    "square": (2 * 0.8) ** 2,
    "triangle": 0.5 * 2.0 * 1.8,
    "star": 10 * 0.5 * 1.0 * 0.5 * np.sin(np.pi / 5),
    "heart": 2 * _HEART_H**2 + np.pi * _HEART_H**2 / 2,  # diamond + two outer half discs
}


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_anti_aliased_coverage_has_the_closed_form_area(shape):
    radius, resolution = 0.3, 64
    alpha = shapes.coverage(
        np.array([shapes.SHAPES.index(shape)]), np.array([[0.47, 0.52]]), np.array([radius]), 64
    )
    area = alpha.sum() / resolution**2 / radius**2
    np.testing.assert_allclose(area, CLOSED_FORM_AREAS[shape], rtol=0.02)


def _bounding_box(image, background):
    ys, xs = np.nonzero(np.any(image != background, axis=-1))
    return xs.min(), xs.max(), ys.min(), ys.max()


def test_render_places_each_position_in_its_cell_and_separates_sizes():
    resolution, rng = 64, np.random.default_rng(0)
    half_extents = {size: [] for size in shapes.SIZES}
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            cells = {p: np.array(shapes.position_center(p, size)) for p in shapes.POSITIONS}
            for position in shapes.POSITIONS:
                image = shapes.render(shape, "red", size, position, "black", rng, resolution)
                x0, x1, y0, y1 = _bounding_box(image, (0, 0, 0))
                center = np.array([x0 + x1 + 1, y0 + y1 + 1]) / 2 / resolution
                nearest = min(cells, key=lambda p: np.linalg.norm(cells[p] - center))
                assert nearest == position, (shape, size, position)
                half_extents[size].append(max(x1 - x0 + 1, y1 - y0 + 1) / resolution / 2)
    # Every small shape is clearly smaller than every large one, whatever the shape and jitter.
    assert max(half_extents["small"]) + 0.02 < min(half_extents["large"])


class _ExtremeJitter:
    """Stands in for a numpy Generator: the jitter uniforms at their extremes."""

    def __init__(self, x, y, radius):
        self.values = np.array([[x, y, radius]], dtype=np.float64)

    def uniform(self, low, high, size):
        assert (low, high, size) == (-1.0, 1.0, (1, 3))
        return self.values


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_worst_case_jitter_stays_inside_the_image(shape):
    resolution = 64  # the 0.02 margin is 1.3 pixels, so the border stays pure background
    corners = {"top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1)}
    corners["bottom right"] = (1, 1)
    for size in shapes.SIZES:
        for position, (x, y) in corners.items():
            jitter = _ExtremeJitter(x, y, radius=1.0)  # pushed outwards, at the largest size
            image = shapes.render(shape, "red", size, position, "black", jitter, resolution)
            border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
            assert not border.any(), (shape, size, position)


def test_render_is_a_pure_function_of_its_inputs():
    first = shapes.render("star", "blue", "large", "top left", "white", np.random.default_rng(3))
    again = shapes.render("star", "blue", "large", "top left", "white", np.random.default_rng(3))
    other = shapes.render("star", "blue", "large", "top left", "white", np.random.default_rng(4))
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # the jitter comes from the rng


def test_render_rejects_unknown_attributes():
    with pytest.raises(ValueError, match="Unknown shape 'hexagon'.*circle"):
        shapes.render("hexagon", "red", "small", "top", "black", np.random.default_rng(0))
    with pytest.raises(ValueError, match="resolution 48.*16, 32, 64"):
        shapes.shapes_config(48)


def test_sampled_backgrounds_never_equal_the_color():
    attributes = shapes.sample_attributes("train", 20_000, np.random.default_rng(0))
    colors = np.array(list(shapes.COLORS))[attributes.color]
    backgrounds = np.array(list(shapes.BACKGROUNDS))[attributes.background]
    assert not np.any(colors == backgrounds)
    # White shapes still get both of their allowed backgrounds.
    assert set(backgrounds[colors == "white"]) == {"black", "gray"}


def test_config_names_round_trip_through_tfds_names(tmp_path):
    config = shapes.shapes_config(16, num_train=7, num_test=3, num_test_unseen=2, seed=5)
    assert config.name == "16_n7-3-2_s5"
    parsed = tfds.builder(f"shapes/{config.name}", data_dir=str(tmp_path)).builder_config
    assert (parsed.resolution, parsed.num_train, parsed.num_test, parsed.num_test_unseen) == (
        16,
        7,
        3,
        2,
    )
    assert parsed.seed == 5
    with pytest.raises(ValueError, match="Bad shapes config name"):
        shapes.config_from_name("big")
