"""Text-to-video through the training loop: CLIP on moving_shapes clips, then the video DiT on its
frozen text tower, on the embedded recipe's runlocal sizes; images as one-frame clips.

Truths: a resumed run is the uninterrupted run (bitwise on CPU, as tests/test_trainer.py proves
for the DiT); the loss falls on clips (or images) seen again and again; the image tower sees
exactly the first and last frames (an explicit concatenation), so a clip and its time reversal
embed apart while a still clip and its reversal embed alike.
"""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base_clip, moving_shapes
from diffusion import data as data_lib
from diffusion import families, metrics, models, rundir, training
from diffusion.errors import UserError
from diffusion.families import clip as clip_family
from diffusion.families import video_dit as video_dit_family
from diffusion.training import inputs

ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def recipe(data_dir):
    """configs/moving_shapes.py:runlocal on one device, with fewer clips and blocks (the time of
    these tests is compiling)."""
    config = moving_shapes.get_config("runlocal")
    config.data.data_dir = data_dir
    config.data.num_train_examples = 8  # one batch of the runlocal recipe
    config.data.num_eval_examples = 8
    config.clip.model.update(vision_depth=1, text_depth=1, text_width=64)
    config.video_dit.model.depth = 1
    for stage in (config.clip, config.video_dit):
        stage.mesh.update(ONE_DEVICE)
        stage.training.update(log_every=1, checkpoint_every=6, ema_decay=0.9)
    return config


def video_stage(data_dir, clip_run, steps):
    config = recipe(data_dir).video_dit
    config.text_encoder.checkpoint = clip_run
    config.tokenizer.path = os.path.join(clip_run, "tokenizer")
    config.training.num_steps = steps
    return config


def run(config, workdir):
    training.train(config, str(workdir), devices=jax.devices()[:1])
    return [r["loss"] for r in metrics.read_metrics(str(workdir))]


@pytest.fixture(scope="module")
def clip_run(data_dir, tmp_path_factory):
    """The recipe's CLIP stage on clips, 3 steps."""
    config = recipe(data_dir).clip
    config.training.num_steps = 3
    workdir = tmp_path_factory.mktemp("clip")
    run(config, workdir)
    return str(workdir)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_clips_are_batched_scaled_like_images_with_captions_and_labels(data_dir):
    source, builder = inputs.prepare_source(recipe(data_dir).data, seed=0)
    assert inputs.frames_of(source, builder) == 8
    assert inputs.image_shape_of(recipe(data_dir).video_dit, source, builder) == (32, 3)
    reader = data_lib.sources.open_source(source, "train")
    record = reader.read([0])[0]
    captions = inputs.read_captions(source, "train")
    tokenizer = data_lib.train_caption_tokenizer(captions, os.path.join(data_dir, "tok"), 512)
    iterator = data_lib.make_input_pipeline(
        source, tokenizer, split="train", global_batch_size=4, seed=0, context_length=24,
        shuffle=False,
    )  # fmt: skip
    batch = next(iterator)
    assert batch["video"].shape == (4, 8, 32, 32, 3) and "image" not in batch
    np.testing.assert_allclose(batch["video"][0], record["video"] / 127.5 - 1.0, atol=1e-6)
    assert batch["tokens"].shape == batch["mask"].shape == (4, 24)
    for label in ("shape", "color", "size", "motion", "speed", "background"):
        assert batch[label].shape == (4,)
    assert int(batch["motion"][0]) == int(record["motion"])


@pytest.mark.parametrize("bad", ["32", "32_9", "32_8_n64-8-8_s0"])
def test_a_wrong_builder_config_is_named_with_the_valid_ones(data_dir, bad):
    config = recipe(data_dir).data
    config.builder_config = bad
    with pytest.raises(UserError, match="'32_8', '32_16', '64_8', '64_16'"):
        inputs.prepare_source(config, seed=0)


def test_an_image_family_refuses_clips_and_the_video_dit_images_it_cannot_tile(data_dir, tmp_path):
    from configs import base_dit

    config = base_dit.get_config()
    config.data = recipe(data_dir).data
    with pytest.raises(UserError, match="holds clips of 8 frames.*'dit' family trains on images"):
        training.train(config, str(tmp_path / "dit"), devices=jax.devices()[:1])
    facts = families.DataFacts.from_config(recipe(data_dir).video_dit, image_size=16)
    with pytest.raises(UserError, match=r"patch_size=\(2, 8, 8\).*images \(one-frame clips\)"):
        video_dit_family.check_patch_fits((2, 8, 8), facts, "shapes")


# ---------------------------------------------------------------------------------------------
# CLIP on clips
# ---------------------------------------------------------------------------------------------


def test_the_image_tower_sees_the_first_and_last_frames_on_channels():
    clips = np.random.default_rng(0).normal(size=(2, 8, 4, 4, 3)).astype(np.float32)
    expected = np.concatenate([clips[:, 0], clips[:, 7]], axis=-1)  # (B, H, W, 6)
    np.testing.assert_array_equal(clip_family.frames_on_channels(clips, 2), expected)
    three = np.concatenate([clips[:, 0], clips[:, 4], clips[:, 7]], axis=-1)  # round(3.5) = 4
    np.testing.assert_array_equal(clip_family.frames_on_channels(clips, 3), three)


def test_the_image_tower_takes_video_frames_rgb_triples_and_refuses_more_than_a_clip_has(data_dir):
    config = recipe(data_dir).clip
    facts = families.DataFacts.from_config(config, image_size=32)
    clips = dataclasses.replace(facts, frames=8)
    model_config = clip_family.model_config(config, clips)
    assert model_config.in_channels == 6 and len(model_config.pixel_std) == 6
    assert clip_family.model_config(config, facts).in_channels == 3  # images: one frame
    for bad in (0, 9):
        config.model.video_frames = bad
        with pytest.raises(UserError, match=f"video_frames={bad}.*from 1 to 8"):
            clip_family.model_config(config, clips)


def test_a_clip_and_its_reversal_embed_apart_a_still_clip_and_its_reversal_alike(clip_run):
    _, config = rundir.load_model_config(clip_run)
    assert config.in_channels == 6  # two RGB frames
    model = rundir.load_run_params(clip_run, config, models.CLIP)
    clips = np.random.default_rng(1).uniform(-1, 1, (2, 8, 32, 32, 3)).astype(np.float32)
    still = np.repeat(clips[:, :1], 8, axis=1)
    embed = lambda video: np.asarray(
        model.encode_image(clip_family.image_tower_input({"video": video}, config))
    )
    reverse = lambda video: video[:, ::-1]
    assert np.abs(embed(clips) - embed(reverse(clips))).max() > 1e-3  # motion is seen
    np.testing.assert_array_equal(embed(still), embed(reverse(still)))


# ---------------------------------------------------------------------------------------------
# The video DiT
# ---------------------------------------------------------------------------------------------


def falls(losses) -> bool:
    """Whether the last third of the losses is below the first: noise and times are drawn anew
    each step, so single losses scatter."""
    third = len(losses) // 3
    return np.mean(losses[-third:]) < np.mean(losses[:third])


def test_the_video_dit_learns_its_clips_and_a_resumed_run_is_the_uninterrupted_one(
    data_dir, clip_run, tmp_path
):
    """8 clips and batches of 8: every step sees the same clips, so the loss must fall."""
    uninterrupted = run(video_stage(data_dir, clip_run, 9), tmp_path / "a")
    assert len(uninterrupted) == 9 and np.all(np.isfinite(uninterrupted))
    assert falls(uninterrupted), uninterrupted
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["6", "9"]
    # A kill after step 6's checkpoint: no later checkpoint, no exported weights.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "9")
    shutil.rmtree(tmp_path / "b" / rundir.PARAMS_DIR)
    resumed = run(video_stage(data_dir, clip_run, 9), tmp_path / "b")
    assert resumed == uninterrupted  # losses of steps 1..9, the data order included
    family, config = rundir.load_model_config(str(tmp_path / "a"))
    assert family == "video_dit" and config.patch_size == (2, 8, 8) and config.in_channels == 3
    a, b = (
        nnx.state(rundir.load_run_params(str(tmp_path / n), config, models.VideoDiT))
        for n in ("a", "b")
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_video_dit_learns_images_as_one_frame_clips(data_dir, clip_run, tmp_path):
    config = video_stage(data_dir, clip_run, 9)
    config.data = base_clip.get_config().data  # the shapes images
    config.data.update(data_dir=data_dir, builder_config="16", num_train_examples=8)
    config.data.num_eval_examples = 8
    config.model.patch_size = (1, 4, 4)  # a patch of one frame tiles one-frame clips
    losses = run(config, tmp_path)
    assert len(losses) == 9 and np.all(np.isfinite(losses))
    assert falls(losses), losses
    _, model_config = rundir.load_model_config(str(tmp_path))
    source, builder = inputs.prepare_source(config.data, seed=0)
    assert inputs.frames_of(source, builder) == 0  # images, batched as 'image' (B, H, W, 3)
    assert model_config.patch_size == (1, 4, 4)
