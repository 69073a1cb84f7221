"""Text-to-video through the training loop: CLIP on moving_shapes clips, then the video DiT on its
frozen text tower, on the embedded recipe's runlocal sizes; images as one-frame clips.

Truths: a resumed run is the uninterrupted run (bitwise on CPU, as tests/test_trainer.py proves
for the DiT); the loss falls on clips (or images) seen again and again; the image tower sees
exactly the first and last frames (an explicit concatenation), so a clip and its time reversal
embed apart while a still clip and its reversal embed alike.
"""

import dataclasses
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import base_clip, moving_shapes
from diffusion import (
    aot,
    families,
    inference,
    meshes,
    metrics,
    models,
    rundir,
    schedules,
    training,
)
from diffusion import data as data_lib
from diffusion.errors import UserError
from diffusion.families import clip as clip_family
from diffusion.families import dit as dit_family
from diffusion.families import video_dit as video_dit_family
from diffusion.inference import batch_io, video_files
from diffusion.pipeline.periodic import PeriodicEvaluation
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
    """The recipe's video DiT with word conditioning and the conv input stem on: training,
    resuming and sampling read the words and convolve the frames too (the recipe's defaults,
    off and linear patches, are the same paths without them)."""
    config = recipe(data_dir).video_dit
    config.model.word_conditioning = True
    config.model.input_stem = "conv"
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


def test_checks_during_training_are_refused_on_clips_before_any_step(data_dir):
    config = recipe(data_dir)
    for stage in (config.clip, config.video_dit):
        stage.training.eval_every = 5
        with pytest.raises(UserError, match="eval_every=5.*trains on clips"):
            PeriodicEvaluation(stage)
    images = base_clip.get_config()
    images.data.update(data_dir=data_dir, builder_config="16", num_train_examples=8)
    images.data.num_eval_examples = 8
    images.training.eval_every = 5
    PeriodicEvaluation(images)  # a CLIP on images keeps its retrieval check


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


@pytest.fixture(scope="module")
def video_run(data_dir, clip_run, tmp_path_factory):
    """The recipe's video DiT on the CLIP run, 9 steps on 8 clips: (run directory, losses)."""
    workdir = tmp_path_factory.mktemp("video")
    return str(workdir), run(video_stage(data_dir, clip_run, 9), workdir)


def test_the_video_dit_learns_its_clips_and_a_resumed_run_is_the_uninterrupted_one(
    data_dir, clip_run, video_run, tmp_path
):
    """8 clips and batches of 8: every step sees the same clips, so the loss must fall."""
    shutil.copytree(video_run[0], tmp_path / "a")
    uninterrupted = video_run[1]
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
    assert config.word_conditioning and config.input_stem == "conv"
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

    # evaluate.py reads its images as the image DiT's, with the shapes oracle.
    from diffusion.evaluation import ClipEncoder, EvaluationOptions, evaluate_checkpoint
    from diffusion.evaluation.held_out import load_split_examples

    options = EvaluationOptions(
        num_samples=4, splits=("test_unseen",), guidance_scales=(2.0,), samplers=(("euler", 2),),
        batch_size=4, negative_color="", diversity_captions=0, grid_size=2,
    )  # fmt: skip
    metrics = evaluate_checkpoint(str(tmp_path), str(tmp_path / "eval"), options)
    assert metrics["family"] == "video_dit" and "frames" not in metrics
    entry = metrics["splits"]["test_unseen"]
    read = entry["samples"]["euler:2"]["2"]["accuracy"]
    assert set(entry["real"]["oracle_accuracy"]) == set(read)
    assert set(entry["real"]["oracle_accuracy"]) == {"shape", "color", "size", "position",
                                                     "background", "all"}  # fmt: skip
    page = open(tmp_path / "eval" / "index.html", encoding="utf-8").read()
    assert "real images (oracle" in page and ".gif" not in page
    # Its CLIP score comes from a tower trained on clips: an image embeds as its still clip.
    encoder = ClipEncoder.load(clip_run, batch_size=4)
    images = load_split_examples(config.data, 0, "test_unseen", 4).images  # (4, H, W, 3)
    still_clips = np.repeat(images[:, None], 8, axis=1)
    np.testing.assert_array_equal(encoder.encode_images(images), encoder.encode_images(still_clips))


def test_aot_builds_the_recipes_step_on_the_clips_and_state_training_uses(
    data_dir, clip_run, video_run
):
    """From the recipe alone (the frames from the builder config "32_8", the text tower's
    shapes from its run), the AOT step reads the batch the input pipeline makes of clips and
    holds the parameters train.py saved."""
    config = video_stage(data_dir, clip_run, 9)
    state, batch, _ = aot.build_programs(config, one_device_mesh()).train_args
    b, length = config.training.global_batch_size, config.tokenizer.context_length
    assert {k: v.shape for k, v in batch.items()} == {
        "video": (b, 8, 32, 32, 3), "tokens": (b, length), "mask": (b, length),
    }  # fmt: skip
    _, model_config = rundir.load_model_config(video_run[0])
    saved = nnx.state(rundir.load_run_params(video_run[0], model_config, models.VideoDiT))
    shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))
    assert shapes(state["params"]) == shapes(saved)


# ---------------------------------------------------------------------------------------------
# Sampling and evaluating the video run
# ---------------------------------------------------------------------------------------------

PROMPTS = ["a small red circle moves up slowly", "a large blue star grows fast", "a green square"]


@pytest.fixture(scope="module")
def video_pipe(video_run):
    return inference.TextToImage.from_run(video_run[0], mesh=one_device_mesh(), micro_batch=1)


def one_device_mesh():
    return meshes.make_mesh({"data": 1}, jax.devices()[:1])


def reference_clip(video_run, clip_run, prompt, seed, scale, steps):
    """Classifier-free guided flow Euler written as a plain loop over the video DiT, on the flow
    levels of the run's shift, for one clip. A DiT that predicts the clean clip x0 gives the
    velocity (x_t - x0) / t of x_t = (1 - t) x0 + t eps."""
    _, config = rundir.load_model_config(video_run)
    diffusion = rundir.load_run_config(video_run).diffusion
    dit = rundir.load_run_params(video_run, config, models.VideoDiT)
    clip = rundir.load_text_encoder(clip_run, {"dtype": "float32"})
    tokenizer = data_lib.load_tokenizer(os.path.join(clip_run, "tokenizer"))
    length = rundir.load_run_config(video_run).tokenizer.context_length
    predict = video_dit_family.video_model_fn(dit)

    def velocity(x, t, cond):
        out = predict(x, t, cond)
        if diffusion.flow_prediction_type == "sample":
            return (x - out) / t[:, None, None, None, None]
        return out

    words = config.word_conditioning
    cond, uncond = (
        dit_family.text_condition(clip, *data_lib.tokenize(tokenizer, [text], length), words=words)
        for text in (prompt, "")
    )
    noise_key, _ = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(noise_key, (1, 8, 32, 32, 3), jnp.float32)
    times = schedules.flow_levels(steps, diffusion.shift).t
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        t_batch = jnp.full((1,), t, jnp.float32)
        v_cond, v_uncond = velocity(x, t_batch, cond), velocity(x, t_batch, uncond)
        x = x + (t_next - t) * (v_uncond + scale * (v_cond - v_uncond))
    return np.asarray(jnp.clip(jnp.round((x[0] + 1) * 127.5), 0, 255)).astype(np.int64)


def test_sampled_clips_are_a_plain_guided_euler_loop_for_any_batch_and_device_count(
    video_run, clip_run, video_pipe
):
    clips = video_pipe.generate(PROMPTS, seeds=[3, 4, 5], steps=3, guidance_scale=2.0)
    assert clips.shape == (3, 8, 32, 32, 3) and clips.dtype == np.uint8
    expected = reference_clip(video_run[0], clip_run, PROMPTS[0], 3, 2.0, 3)
    # Float32 in another order of operations: at most one level off, almost never.
    assert np.abs(clips[0].astype(np.int64) - expected).max() <= 1
    assert np.mean(clips[0] == expected) > 0.99
    eight = inference.TextToImage.from_run(video_run[0], micro_batch=1)  # 8 devices
    for pipe, batch_size in ((video_pipe, 1), (eight, 8)):
        again = pipe.generate(
            PROMPTS, seeds=[3, 4, 5], steps=3, guidance_scale=2.0, batch_size=batch_size
        )
        np.testing.assert_array_equal(again, clips)


def test_sample_to_directory_writes_mp4_gif_manifest_and_strip_and_a_rerun_redoes_only_the_missing(
    video_pipe, tmp_path
):
    items = [
        inference.PromptItem(line=i + 1, index=0, prompt=p, negative_prompt="", seed=i,
                             guidance_scale=2.0)
        for i, p in enumerate(PROMPTS[:2])
    ]  # fmt: skip
    out = str(tmp_path)
    made = inference.sample_to_directory(video_pipe, items, out, steps=2, progress=False)
    assert made == {"generated": 2, "skipped": 0}
    names = {"00001_000.mp4", "00001_000.gif", "00002_000.mp4", "00002_000.gif"}
    assert names | {"manifest.jsonl", "grid.png"} == set(os.listdir(out))
    records = batch_io.read_manifest(out)
    assert set(records) == {"00001_000.mp4", "00002_000.mp4"}
    assert records["00001_000.mp4"]["gif"] == "00001_000.gif"
    assert records["00001_000.mp4"]["frames"] == 8
    clips = video_pipe.generate(PROMPTS[:2], seeds=[0, 1], steps=2, guidance_scale=2.0)
    back = video_files.read_mp4(os.path.join(out, "00002_000.mp4"), 32, 32)
    assert back.shape == (8, 32, 32, 3)
    assert np.abs(back.astype(float) - clips[1]).mean() < 6  # H.264 at CRF 18: close, not equal
    with Image.open(os.path.join(out, "grid.png")) as strip:  # two rows of 8 frames, labelled
        assert strip.width > 8 * 32 and strip.height >= 2 * 32
    first = open(os.path.join(out, "00001_000.mp4"), "rb").read()
    os.remove(os.path.join(out, "00001_000.gif"))
    made = inference.sample_to_directory(video_pipe, items, out, steps=2, progress=False)
    assert made == {"generated": 1, "skipped": 1}
    assert open(os.path.join(out, "00001_000.mp4"), "rb").read() == first  # the same bytes


def test_evaluate_reads_the_sampled_clips_with_the_video_oracle(video_run, tmp_path):
    from diffusion.evaluation import EvaluationOptions, evaluate_checkpoint

    options = EvaluationOptions(
        num_samples=4, splits=("test_unseen",), guidance_scales=(2.0,), samplers=(("euler", 2),),
        batch_size=4, negative_color="", diversity_captions=0, grid_size=2,
    )  # fmt: skip
    metrics = evaluate_checkpoint(video_run[0], str(tmp_path), options)
    assert metrics["family"] == "video_dit" and metrics["frames"] == 8
    entry = metrics["splits"]["test_unseen"]
    assert entry["num_samples"] == 4
    # The oracle reads the real clips as their labels (its own tests bound how often).
    assert entry["real"]["oracle_accuracy"]["motion"] >= 0.75
    result = entry["samples"]["euler:2"]["2"]
    assert set(result["accuracy"]) == {"shape", "color", "size", "motion", "speed",
                                       "background", "all"}  # fmt: skip
    assert 0 <= result["temporal_consistency"]["consistency"] <= 1
    page = open(tmp_path / "index.html", encoding="utf-8").read()
    gifs = re.findall(r"<img src='([^']+\.gif)'", page)
    assert len(gifs) == 2 and all(os.path.isfile(tmp_path / g) for g in gifs)
