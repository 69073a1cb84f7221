"""The embedded moving-shapes clips: motion as the label says, read back from the pixels.

Truths: the centroid and area of the drawn shape, measured on the frames, against the closed-form
path of its label (direction, distance travelled per speed, area change of grow / shrink); every
frame's shape inside the margins; held-out (shape, motion) pairs only in `test_unseen`; captions
that spell every attribute; a TFDS builder that writes what the generator makes.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion.data import moving_shapes as ms
from diffusion.errors import UserError


def _centroids_and_areas(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of a white shape on black: the coverage-weighted centroid (x, y) in image units
    and the area in image units squared."""
    coverage = clip[..., 0].astype(np.float64) / 255.0  # (T, H, W)
    side = clip.shape[1]
    pixel = (np.arange(side) + 0.5) / side
    area = coverage.sum(axis=(1, 2))
    x = (coverage * pixel[None, None, :]).sum(axis=(1, 2)) / area
    y = (coverage * pixel[None, :, None]).sum(axis=(1, 2)) / area
    return np.stack([x, y], axis=1), area / side**2


@pytest.mark.parametrize("speed", ms.SPEEDS)
@pytest.mark.parametrize("motion", ms.MOTIONS)
def test_the_drawn_shape_moves_as_its_motion_and_speed_say(motion, speed):
    rng = np.random.default_rng(0)
    clip = ms.render_clip("circle", "white", "large", motion, speed, "black", rng, 64, 8)
    assert clip.shape == (8, 64, 64, 3) and clip.dtype == np.uint8
    centers, areas = _centroids_and_areas(clip)
    direction = ms.MOTION_DIRECTIONS[motion]
    if direction is None:  # in place, the area scaled by ((1 + g) / (1 - g))^2 over the clip
        assert np.abs(centers - centers[0]).max() < 0.005
        g = ms.GROWTH[speed]
        ratio = ((1 + g) / (1 - g)) ** 2
        expected = ratio if motion == "grow" else 1 / ratio
        np.testing.assert_allclose(areas[-1] / areas[0], expected, rtol=0.08)
        assert np.all(np.diff(areas) > 0) if motion == "grow" else np.all(np.diff(areas) < 0)
    else:  # a straight line at constant speed, TRAVEL[speed] long, the area unchanged
        displacement = centers[-1] - centers[0]
        np.testing.assert_allclose(displacement, ms.TRAVEL[speed] * np.array(direction), atol=0.01)
        steps = np.diff(centers, axis=0)
        np.testing.assert_allclose(
            steps, np.broadcast_to(steps.mean(axis=0), steps.shape), atol=0.01
        )
        np.testing.assert_allclose(areas, areas.mean(), rtol=0.03)


def test_every_frame_keeps_the_shape_inside_the_margins():
    """The bounding box (centre +- radius) of every frame of 200 random placements per
    (size, motion, speed) stays EDGE_MARGIN inside the image."""
    rng = np.random.default_rng(1)
    for size in ms.SIZES:
        for motion in ms.MOTIONS:
            for speed in ms.SPEEDS:
                for uniforms in rng.random((200, 3)):
                    centers, radii = ms.trajectory(size, motion, speed, uniforms, 16)
                    assert (centers - radii[:, None]).min() >= ms.EDGE_MARGIN - 1e-9
                    assert (centers + radii[:, None]).max() <= 1 - ms.EDGE_MARGIN + 1e-9


def test_splits_hold_out_their_shape_motion_pairs_and_captions_spell_every_attribute():
    unseen = set(ms.UNSEEN_PAIRS)
    train = [e for _, e in ms.generate_examples("train", 400, 32, 8, seed=0)]
    test = [e for _, e in ms.generate_examples("test", 100, 32, 8, seed=0)]
    held_out = [e for _, e in ms.generate_examples("test_unseen", 100, 32, 8, seed=0)]
    assert not {(e["shape"], e["motion"]) for e in train + test} & unseen
    assert {(e["shape"], e["motion"]) for e in held_out} == unseen
    assert {e["shape"] for e in train} == set(ms.SHAPES)  # every shape and motion is trained
    assert {e["motion"] for e in train} == set(ms.MOTIONS)
    for e in train:
        caption = e["caption"]
        assert e["video"].shape == (8, 32, 32, 3)
        for attribute in ("shape", "color", "size"):
            assert f" {e[attribute]} " in f" {caption} ", (attribute, caption)
        phrase = ms._MOTION_PHRASES[e["motion"]].split(" {adverb}")[0]
        assert phrase in caption, caption
        assert any(adverb in caption for adverb in ms._ADVERBS[e["speed"]]), caption
        if "background" in caption:
            assert f"{e['background']} background" in caption, caption
        assert e["background"] != e["color"]
    assert any("background" not in e["caption"] for e in train)  # some leave it open


def test_generation_is_deterministic_and_depends_on_the_seed():
    first = [e for _, e in ms.generate_examples("test", 20, 32, 8, seed=3)]
    again = [e for _, e in ms.generate_examples("test", 20, 32, 8, seed=3)]
    other = [e for _, e in ms.generate_examples("test", 20, 32, 8, seed=4)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["video"], b["video"])
        assert a["caption"] == b["caption"]
    assert [e["caption"] for e in first] != [e["caption"] for e in other]


def test_the_tfds_builder_writes_the_generated_clips(tmp_path):
    config = ms.moving_shapes_config(32, 16, num_train=6, num_test=3, num_test_unseen=3, seed=2)
    assert ms.config_from_name(config.name) == config
    builder = tfds.builder(f"moving_shapes/{config.name}", data_dir=str(tmp_path))
    builder.download_and_prepare()
    source = builder.as_data_source(split="test_unseen")
    written = {source[i]["caption"].decode(): source[i] for i in range(len(source))}
    for _, example in ms.generate_examples("test_unseen", 3, 32, 16, seed=2):
        record = written[example["caption"]]
        np.testing.assert_array_equal(record["video"], example["video"])
        for attribute, names in (("motion", ms.MOTIONS), ("speed", ms.SPEEDS)):
            assert names[record[attribute]] == example[attribute]
    assert builder.info.features["video"].shape == (16, 32, 32, 3)


def test_unknown_attributes_and_configs_are_named():
    with pytest.raises(UserError, match="Unknown motion 'spin'"):
        ms.render_clip("circle", "red", "small", "spin", "slow", "black", np.random.default_rng())
    with pytest.raises(UserError, match="frames 12; valid: \\(8, 16\\)"):
        ms.moving_shapes_config(32, 12)
    with pytest.raises(UserError, match="expected '<resolution>_<frames>'"):
        ms.config_from_name("32")
