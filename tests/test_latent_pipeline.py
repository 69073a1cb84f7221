"""configs/shapes_latent.py end to end, shrunk to seconds: autoencoder -> CLIP -> encode (latents
and the CLIP's text features of each caption) -> DiT on the latents and those cached features ->
evaluate -> samples, each stage writing what it promises; a rerun redoes nothing.

Truths: the DiT's run directory reads the encoded dataset and records the autoencoder and the
text encoder that made it; its step reads the cached text features, never running the tower;
the evaluation and the grid hold decoded images of the dataset's side (16), not latents (8); a
rerun leaves the latent dataset and the metrics untouched; latents of another plan (without text
features) are refused, not used; a SIGTERM during encoding stops the pipeline there with the
shards written so far, and the rerun finishes it.
"""

import contextlib
import io
import json
import os
import signal

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import one_block
from PIL import Image

from diffusion import config as config_lib
from diffusion import metrics as metrics_lib
from diffusion import pipeline, rundir
from diffusion.data import latents as latents_lib
from diffusion.encoding import LatentDatasetWriter, PlanChanged
from diffusion.families import dit as dit_family
from diffusion.inference import video_files
from diffusion.pipeline import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_latent_pipeline(data_dir):
    config = config_lib.load_config(os.path.join(REPO, "configs", "shapes_latent.py"))
    config.data.update(
        data_dir=data_dir, builder_config="16", num_train_examples=128, num_eval_examples=16
    )
    config.tokenizer.vocab_size = 300
    config.autoencoder.model.update(block_out_channels=(8, 16), norm_num_groups=4)
    for stage in (config.clip, config.dit):
        one_block(stage)
    for stage in (config.autoencoder, config.clip, config.dit):
        stage.training.update(
            global_batch_size=8, num_steps=2, log_every=1, checkpoint_every=100, eval_every=0
        )
        stage.optimizer.warmup_steps = 1
    config.encode.update(batch_size=16, examples_per_shard=64)
    config.evaluate.update(
        num_samples=8, guidance_scales=(3.0,), batch_size=8, samplers="euler_stochastic:2"
    )
    config.samples.update(num_per_prompt=1, steps=2, batch_size=8)
    return config


def _run(config, workdir) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pipeline.train_and_evaluate(config, workdir)
    return out.getvalue()


def _tree(directory):
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return files


def test_the_latent_pipeline_trains_the_dit_on_encoded_latents_and_decodes_its_samples(
    tmp_path, monkeypatch
):
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    config = tiny_latent_pipeline(data_dir)
    # A SIGTERM once the encode stage has written its first shard: the stage keeps that shard,
    # the pipeline stops there (exit 0), and the rerun below finishes everything.
    write = LatentDatasetWriter.write

    def write_then_signal(self, shard, examples):
        write(self, shard, examples)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(LatentDatasetWriter, "write", write_then_signal)
    out = _run(config, workdir)
    assert "preempted during stage encode" in out
    latents_dir = os.path.join(workdir, "latents", "shapes_latents", "1.0.0")
    assert [n for n in os.listdir(latents_dir) if ".array_record-" in n] == [
        "shapes_latents-train.array_record-00000-of-00002"
    ]
    assert os.path.isdir(os.path.join(workdir, "clip"))  # before encode, whose text tower it is
    assert not os.path.exists(os.path.join(workdir, "dit"))
    monkeypatch.undo()

    def tower_in_the_step(*args, **kwargs):
        raise AssertionError("the DiT's step ran the text tower on cached text features")

    monkeypatch.setattr(dit_family, "text_conditional_loss", tower_in_the_step)
    out = _run(config, workdir)
    for stage in config.stages:
        assert f"== stage {stage}" in out
    with open(os.path.join(latents_dir, "encoding.json")) as f:
        encoding = json.load(f)
    assert encoding["autoencoder"] == os.path.abspath(os.path.join(workdir, "autoencoder"))
    assert encoding["latent_shape"] == [8, 8, 4]
    # The autoencoder sets no factors: the train split's statistics normalise the latents.
    assert encoding["normalisation"] == "train split statistics"
    np.testing.assert_allclose(encoding["scaling_factor"], 1 / encoding["statistics"]["std"])
    # The CLIP's text features of each caption, with the word embeddings the DiT reads.
    clip = os.path.abspath(os.path.join(workdir, "clip"))
    assert (encoding["text_encoder"], encoding["text_words"]) == (clip, True)
    features = tfds.builder_from_directory(latents_dir).info.features
    assert set(latents_lib.text_keys(True)) <= set(features)

    dit = os.path.join(workdir, "dit")
    run_config = rundir.load_run_config(dit)
    assert (run_config.data.name, run_config.data.data_dir) == (
        "shapes_latents",
        os.path.join(workdir, "latents"),
    )
    assert rundir.load_latents(dit).autoencoder == encoding["autoencoder"]
    assert rundir.load_latents(dit).text_encoder == clip  # it trained on the cached features
    _, dit_config = rundir.load_model_config(dit)
    assert (dit_config.in_channels, dit_config.patch_size) == (4, 2)

    # The evaluate stage measures the autoencoder too: its reconstructions of the source images.
    with open(os.path.join(workdir, "eval", "autoencoder", "metrics.json")) as f:
        reconstructions = json.load(f)["splits"]["test"]
    assert reconstructions["real_oracle_accuracy"]["all"] > 0.9
    assert np.isfinite(reconstructions["psnr"]) and "shape" in reconstructions["oracle_misreads"]
    with open(os.path.join(workdir, "eval", "dit", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["resolution"] == 16 and set(metrics["splits"]) == {"test", "test_unseen"}
    # The real images evaluated are the encoded ones: the oracle reads them as the data says.
    assert metrics["splits"]["test"]["real"]["oracle_accuracy"]["all"] > 0.9
    with open(os.path.join(workdir, "samples", "manifest.jsonl")) as f:
        first = json.loads(f.readline())
    image = Image.open(os.path.join(workdir, "samples", first["file"]))
    assert image.size == (16, 16) and image.mode == "RGB"

    before = _tree(os.path.join(workdir, "latents")), _tree(os.path.join(workdir, "eval"))
    again = _run(config, workdir)
    assert "is complete; nothing to encode" in again
    assert (_tree(os.path.join(workdir, "latents")), _tree(os.path.join(workdir, "eval"))) == before

    # Latents encoded without text features (by this recipe before it cached them): refused with
    # the fix, not handed to a DiT that expects them; nothing is written over.
    plan_path = os.path.join(latents_dir, "plan.json")
    with open(plan_path) as f:
        plan = json.load(f)
    with open(plan_path, "w") as f:
        json.dump({k: v for k, v in plan.items() if not k.startswith("text_")}, f)
    with pytest.raises(PlanChanged) as refused:
        stages.run_encode_stage(config, workdir)
    message = str(refused.value)
    assert "text_encoder" in message and "--config.encode.text_features=False" in message
    assert f"Delete {os.path.join(workdir, 'latents')}" in message
    with open(plan_path, "w") as f:
        f.write(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    assert _tree(os.path.join(workdir, "latents")) == before[0]


def tiny_video_latent_pipeline(data_dir):
    config = config_lib.load_config(os.path.join(REPO, "configs", "moving_shapes_latent.py"))
    config.data.update(data_dir=data_dir, num_train_examples=16, num_eval_examples=8)
    config.tokenizer.vocab_size = 300
    config.autoencoder.model.update(block_out_channels=(8, 16), norm_num_groups=4)
    config.clip.model.update(vision_depth=1, text_depth=1, text_width=64)
    config.video_dit.model.update(depth=1, width=64, num_heads=2, ffn_dim=128)
    for stage in (config.autoencoder, config.clip, config.video_dit):
        stage.training.update(
            global_batch_size=8, num_steps=2, log_every=1, checkpoint_every=100, eval_every=0
        )
        stage.optimizer.warmup_steps = 1
    # The autoencoder's check during training reads held-out clips too (their frames).
    config.autoencoder.training.update(eval_every=2, eval_examples=4)
    config.encode.update(batch_size=8, examples_per_shard=8)
    config.evaluate.update(num_samples=8, guidance_scales=(3.0,), batch_size=8, samplers="euler:2")
    config.samples.update(prompts=config.samples.prompts[:1], num_per_prompt=1, steps=2)
    return config


def test_the_video_latent_pipeline_encodes_clips_frame_by_frame_and_decodes_sampled_clips(
    tmp_path,
):
    """configs/moving_shapes_latent.py: the autoencoder trains on the clips' frames, encode.py
    stores each clip's posterior frame by frame (the autoencoder's posterior of each frame as an
    image), the video DiT trains on the latent clips, and the evaluation and the grid hold
    decoded clips of the dataset's frames and side."""
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    config = tiny_video_latent_pipeline(data_dir)
    out = _run(config, workdir)
    for stage in config.stages:
        assert f"== stage {stage}" in out
    latents_dir = os.path.join(workdir, "latents", "moving_shapes_latents", "1.0.0")
    with open(os.path.join(latents_dir, "encoding.json")) as f:
        encoding = json.load(f)
    assert encoding["image_shape"] == [8, 32, 32, 3] and encoding["latent_shape"] == [8, 16, 16, 4]

    # A stored posterior is the autoencoder's of each frame, encoded as an image on its own.
    autoencoder, _ = rundir.load_autoencoder(os.path.join(workdir, "autoencoder"))
    source = tfds.builder_from_directory(encoding_source_dir(encoding))
    clip = source.as_data_source("test")[0]
    stored = tfds.builder_from_directory(latents_dir).as_data_source("test")[0]
    frames = np.asarray(clip["video"], np.float32) / 127.5 - 1.0  # (8, 32, 32, 3)
    mean, logvar = autoencoder.encode(frames)
    np.testing.assert_allclose(stored[latents_lib.MEAN_KEY], mean, atol=1e-5)
    np.testing.assert_allclose(stored[latents_lib.STD_KEY], np.exp(0.5 * logvar), atol=1e-5)

    logged = metrics_lib.read_metrics(os.path.join(workdir, "autoencoder"))
    psnr = [r["eval/psnr"] for r in logged if "eval/psnr" in r]
    assert psnr and np.isfinite(psnr).all()

    run = os.path.join(workdir, "video_dit")
    assert rundir.load_run_config(run).data.name == "moving_shapes_latents"
    assert rundir.load_latents(run).autoencoder == encoding["autoencoder"]
    _, model_config = rundir.load_model_config(run)
    assert (model_config.in_channels, model_config.patch_size) == (4, (2, 4, 4))

    with open(os.path.join(workdir, "eval", "autoencoder", "metrics.json")) as f:
        reconstructions = json.load(f)["splits"]["test"]
    # Clips reconstructed frame by frame and read by the moving-shapes oracle, motion included.
    assert reconstructions["num_examples"] == 8 and np.isfinite(reconstructions["psnr"])
    assert reconstructions["real_oracle_accuracy"]["motion"] == 1.0
    assert "motion" in reconstructions["oracle_accuracy"]
    with open(os.path.join(workdir, "eval", "video_dit", "metrics.json")) as f:
        metrics = json.load(f)
    assert (metrics["resolution"], metrics["frames"]) == (32, 8)
    assert metrics["splits"]["test"]["real"]["oracle_accuracy"]["motion"] == 1.0
    with open(os.path.join(workdir, "samples", "manifest.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["file"].endswith(".mp4")
    gif = Image.open(os.path.join(workdir, "samples", first["gif"]))
    side = 32 * video_files.display_scale(32, 32)  # shown scaled up by a whole factor
    assert gif.size == (side, side) and gif.n_frames == 8


def encoding_source_dir(encoding) -> str:
    """The prepared source dataset a latent dataset's encoding.json names."""
    return tfds.builder(encoding["source"], data_dir=encoding["source_data_dir"]).data_dir
