"""The autoencoder family (diffusion/families/autoencoder.py) trained by the real loop, the run
directory it writes (rundir.load_autoencoder, also on a diffusers directory) and its evaluation
(diffusion/evaluation/reconstruction.py).

Truths: the Gaussian KL in its general two-Gaussian form; the loss rebuilt from the model's own
encode / decode with the step key's noise; PSNR in closed form; SSIM by a NumPy transcription of
Wang et al. (2004); latent statistics from the samples themselves; a run interrupted by SIGTERM
and resumed has the losses and weights of the uninterrupted one, bit for bit; the exported
weights equal the EMA in the Orbax checkpoint; a diffusers directory decodes as diffusers does.
"""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base_autoencoder
from diffusion import aot, evaluation, families, meshes, metrics, models, rundir, sharding, training
from diffusion.errors import UserError
from diffusion.evaluation import reconstruction
from diffusion.families import autoencoder as family
from diffusion.models.autoencoder import Autoencoder, autoencoder_config
from diffusion.pipeline.periodic import PeriodicEvaluation

STEPS = 4


def tiny_config(data_dir: str, steps: int = STEPS):
    config = base_autoencoder.get_config()
    config.data.update(
        data_dir=data_dir, builder_config="16", num_train_examples=64, num_eval_examples=16
    )
    config.model.update(block_out_channels=(8, 16), latent_channels=4)
    config.training.update(
        global_batch_size=8,
        num_steps=steps,
        log_every=1,
        checkpoint_every=2,
        eval_every=steps,
        eval_examples=8,
        ema_decay=0.9,
    )
    config.optimizer.update(warmup_steps=1, learning_rate=1e-3)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


class SigtermAtStep:
    """A callback that sends this process a real SIGTERM after step `step` (a preemption)."""

    def __init__(self, step: int):
        self.step = step

    def enabled(self, step: int) -> bool:
        return step == self.step

    def __call__(self, context, state, step: int) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)
        return {}


def logged(workdir) -> dict[int, dict]:
    """Every metric of every step but the timings, which differ from run to run."""
    timings = ("step_time", "examples_per_second", "mfu")
    records = metrics.read_metrics(str(workdir))
    return {r["step"]: {k: v for k, v in r.items() if k not in timings} for r in records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run of STEPS steps, and the same run stopped by SIGTERM after step 2
    (saved at step 3) and then continued."""
    root = tmp_path_factory.mktemp("autoencoder")
    data_dir = str(root / "data")
    devices = jax.devices()[:1]
    whole, resumed = str(root / "whole"), str(root / "resumed")
    held_out = [PeriodicEvaluation(tiny_config(data_dir))]  # eval/psnr, eval/ssim at step 4
    training.train(tiny_config(data_dir), whole, devices=devices, callbacks=held_out)
    stop = [SigtermAtStep(2), *held_out]
    training.train(tiny_config(data_dir), resumed, devices=devices, callbacks=stop)
    interrupted_steps = rundir.latest_step(resumed)
    interrupted_exported = os.path.isdir(os.path.join(resumed, rundir.PARAMS_DIR))
    training.train(tiny_config(data_dir), resumed, devices=devices, callbacks=held_out)
    return dict(
        data_dir=data_dir,
        whole=whole,
        resumed=resumed,
        interrupted_steps=interrupted_steps,
        interrupted_exported=interrupted_exported,
    )


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def test_kl_equals_the_general_gaussian_kl():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 2, 2, 4))
    logvar = rng.normal(size=(3, 2, 2, 4))
    # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    s1, m2, s2 = np.exp(logvar / 2), 0.0, 1.0
    expected = np.log(s2 / s1) + (s1**2 + (mean - m2) ** 2) / (2 * s2**2) - 0.5
    got = family.kl_divergence(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected.sum(axis=(1, 2, 3)), rtol=1e-5)
    zero = family.kl_divergence(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))
    assert float(zero[0]) == 0.0  # q = N(0, I) is the prior


@pytest.mark.parametrize("reconstruction_kind", ["l1", "l2"])
def test_loss_is_reconstruction_plus_weighted_kl_of_the_reparameterised_sample(
    reconstruction_kind,
):
    config = autoencoder_config("tiny", block_out_channels=(8, 16), sample_size=8)
    model = Autoencoder(config, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
    key, weight = jax.random.key(2), 0.5
    loss_of = lambda m, x, k: family.autoencoder_loss(
        m, None, {"image": x}, k, reconstruction=reconstruction_kind, kl_weight=weight
    )
    loss, aux = loss_of(model, images, key)
    mean, logvar = (np.asarray(a, np.float64) for a in model.encode(images))
    noise = np.asarray(jax.random.normal(key, mean.shape), np.float64)
    latents = jnp.asarray(mean + np.exp(logvar / 2) * noise, jnp.float32)
    decoded = np.asarray(model.decode(latents), np.float64)
    error = decoded - np.asarray(images, np.float64)
    per_pixel = np.abs(error) if reconstruction_kind == "l1" else error**2
    kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3)).mean()
    np.testing.assert_allclose(float(aux["reconstruction_loss"]), per_pixel.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl"]), kl, rtol=1e-5)
    # LDM's per-image sum of errors + weight x KL, divided by the 8 * 8 * 3 pixel values
    expected = (per_pixel.sum(axis=(1, 2, 3)).mean() + weight * kl) / (8 * 8 * 3)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # another key, another sample: the noise is really drawn from the key
    other, _ = loss_of(model, images, jax.random.key(3))
    assert float(other) != float(loss)


def test_bad_loss_and_model_fields_are_named():
    config = base_autoencoder.get_config()
    facts = families.DataFacts.without_text(16)
    config.loss.reconstruction = "lpips"
    with pytest.raises(UserError, match=r"config.loss.reconstruction='lpips'; valid: l1, l2"):
        family.build(config, facts, None)
    config.loss.reconstruction = "l1"
    config.model.block_out_channels = (8, 16, 16, 16, 16, 16)  # 32x: more than 16 px allow
    with pytest.raises(UserError, match=r"downsamples 32x.*image size 16.*at most 5"):
        family.build(config, facts, None)
    config.model.block_out_channels = (10, 16)  # 10 is not divisible by 4 groups
    with pytest.raises(UserError, match=r"width 10 is not divisible by norm_num_groups 4"):
        family.build(config, facts, None)


def test_aot_builds_and_lowers_the_step_without_a_tokenizer():
    config = base_autoencoder.get_config()
    config.model.block_out_channels = (8, 16)
    config.training.global_batch_size = 2
    assert "tokenizer" not in config
    mesh = meshes.make_mesh({"data": 1}, devices=jax.devices()[:1])
    programs = aot.build_programs(config, mesh)
    assert programs.model_config.sample_size == 32 and programs.sample_fn is None
    batch = programs.train_args[1]
    assert set(batch) == {"image"} and batch["image"].shape == (2, 32, 32, 3)
    with sharding.activate(mesh, programs.train_step.rules):
        lowered = programs.train_step.step_fn.lower(*programs.train_args)
    assert "reconstruction_loss" in str(lowered.out_info)


# ---------------------------------------------------------------------------------------------
# Training: run directory, metrics, resume
# ---------------------------------------------------------------------------------------------


def test_run_directory_has_model_params_metrics_and_no_tokenizer(runs):
    whole = runs["whole"]
    family_name, model_config = rundir.load_model_config(whole)
    assert family_name == "autoencoder"
    assert (model_config.sample_size, model_config.in_channels) == (16, 3)
    assert model_config.block_out_channels == (8, 16)
    assert os.path.isdir(os.path.join(whole, rundir.PARAMS_DIR))
    assert not os.path.exists(rundir.tokenizer_dir(whole))  # no captions, no tokenizer
    records = metrics.read_metrics(whole)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    for record in (r for r in records if "loss" in r):
        assert {"reconstruction_loss", "kl", "grad_norm", "learning_rate"} <= set(record)
        assert record["loss"] >= record["reconstruction_loss"]  # the KL term is >= 0
    held_out = [r for r in records if "eval/psnr" in r]
    assert [r["step"] for r in held_out] == [STEPS] and -1 < held_out[0]["eval/ssim"] < 1
    config = rundir.load_run_config(whole)  # sampling and encoding read it without tokenizer keys
    assert config.family == "autoencoder"


def test_run_interrupted_by_sigterm_resumes_bitwise(runs):
    assert runs["interrupted_steps"] == 3  # the signal after step 2 stops after step 3, saved
    assert not runs["interrupted_exported"]  # params/ only once the run is finished
    # losses, KL, norms of steps 1..4 (the data order too) and the held-out PSNR of step 4
    assert logged(runs["resumed"]) == logged(runs["whole"])
    a, b = (rundir.load_autoencoder(runs[name])[0] for name in ("whole", "resumed"))
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# rundir.load_autoencoder
# ---------------------------------------------------------------------------------------------


def test_load_autoencoder_of_a_run_gives_the_ema_weights_of_its_last_checkpoint(runs):
    whole = runs["whole"]
    model, config = rundir.load_autoencoder(whole)
    assert config == rundir.load_model_config(whole)[1]
    run_config = rundir.load_run_config(whole)
    mesh = meshes.make_mesh({"data": 1}, devices=jax.devices()[:1])
    ema, step = rundir.load_checkpoint_params(
        whole, run_config, config, Autoencoder, mesh, None, use_ema=True
    )
    assert step == STEPS
    exported = jax.tree.leaves(sharding.unbox(nnx.state(model, nnx.Param)))
    for x, y in zip(exported, jax.tree.leaves(sharding.unbox(ema)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    half, half_config = rundir.load_autoencoder(whole, dtype="bfloat16")
    assert half_config == dataclasses.replace(config, dtype="bfloat16") == half.config


def test_load_autoencoder_of_a_diffusers_directory_decodes_as_diffusers(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        latent_channels=4,
        sample_size=16,
        scaling_factor=0.3,
    ).eval()
    vae.save_pretrained(str(tmp_path / "vae"))
    model, config = rundir.load_autoencoder(str(tmp_path / "vae"))
    assert (config.scaling_factor, config.latent_channels, config.downsampling_factor) == (
        0.3,
        4,
        2,
    )
    latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
    expected = expected.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(model.decode(jnp.asarray(latents))), expected, atol=1e-4)


def test_load_autoencoder_errors_name_the_path_and_what_was_expected(runs, tmp_path):
    def expect(path, *words):
        with pytest.raises(UserError) as error:
            rundir.load_autoencoder(str(path))
        for word in (str(path), *words):
            assert word in str(error.value)

    expect(tmp_path / "missing", "is not a directory", "AutoencoderKL", "base_autoencoder.py")
    (tmp_path / "empty").mkdir()
    expect(tmp_path / "empty", "neither a run directory", "model.json", "config.json")
    clip_run = tmp_path / "clip_run"
    rundir.save_model_config(str(clip_run), "clip", models.clip_config("tiny"))
    expect(clip_run, "a clip model, not of an autoencoder")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    expect(unet, "UNet2DModel", "not an AutoencoderKL")
    unfinished = tmp_path / "unfinished"
    rundir.save_model_config(
        str(unfinished), "autoencoder", rundir.load_model_config(runs["whole"])[1]
    )
    expect(unfinished, "no exported parameters", "Rerun train.py")
    with pytest.raises(UserError, match=r"unknown options \['scaling_factor'\]"):
        rundir.load_autoencoder(runs["whole"], scaling_factor=0.2)


# ---------------------------------------------------------------------------------------------
# Reconstruction metrics and evaluate.py
# ---------------------------------------------------------------------------------------------


def _gaussian_window(size=11, sigma=1.5):
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _valid_filter(image, window):
    """2-D 'valid' correlation of (H, W) with the separable window."""
    k = len(window)
    rows = np.stack([image[i : i + k] for i in range(image.shape[0] - k + 1)])  # (H', k, W)
    rows = np.tensordot(rows, window, axes=([1], [0]))  # (H', W)
    cols = np.stack([rows[:, j : j + k] for j in range(rows.shape[1] - k + 1)], axis=1)
    return np.tensordot(cols, window, axes=([2], [0]))  # (H', W')


def _ssim_numpy(a, b, c1=0.01**2, c2=0.03**2):
    """Wang et al. (2004), eq. 13, per channel with an 11x11 Gaussian window (sigma 1.5), the
    map averaged over positions and channels."""
    window = _gaussian_window()
    values = []
    for c in range(a.shape[-1]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = _valid_filter(x, window), _valid_filter(y, window)
        sxx = _valid_filter(x * x, window) - mx**2
        syy = _valid_filter(y * y, window) - my**2
        sxy = _valid_filter(x * y, window) - mx * my
        ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        values.append(ssim_map)
    return float(np.mean(values))


def test_psnr_and_ssim_against_closed_forms():
    a = np.zeros((2, 16, 16, 3), np.float32)
    np.testing.assert_allclose(reconstruction.psnr(a, a + 0.1), [20.0, 20.0], rtol=1e-5)
    assert reconstruction.psnr(a, a)[0] == pytest.approx(100.0)  # an exact copy, capped
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 16, 16, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(scale=0.1, size=x.shape), 0, 1).astype(np.float32)
    mse = np.mean((x.astype(np.float64) - y) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(reconstruction.psnr(x, y), 10 * np.log10(1 / mse), rtol=1e-5)
    expected = [_ssim_numpy(x[i], y[i]) for i in range(3)]
    np.testing.assert_allclose(reconstruction.ssim(x, y), expected, rtol=1e-4)
    np.testing.assert_allclose(reconstruction.ssim(x, x), 1.0, rtol=1e-6)


def test_latent_statistics_are_those_of_the_sampled_latents():
    rng = np.random.default_rng(0)
    mean = rng.normal(loc=[0.5, -1.0], scale=[2.0, 0.5], size=(64, 4, 4, 2))
    moments = reconstruction.LatentMoments()
    moments.add(mean[:40], np.full((40, 4, 4, 2), -30.0))  # sigma ~ 3e-7: z = the means
    moments.add(mean[40:], np.full((24, 4, 4, 2), -30.0))
    stats = moments.statistics()
    np.testing.assert_allclose(stats["mean"], mean.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], mean.std(axis=(0, 1, 2)), rtol=1e-6)
    assert stats["scaling_factor"] == pytest.approx(1 / mean.std(), rel=1e-6)
    assert stats["shift_factor"] == pytest.approx(mean.mean(), rel=1e-9)
    # with posterior noise: the statistics of many samples z = mu + sigma eps
    logvar = rng.normal(size=mean.shape)
    noisy = reconstruction.LatentMoments()
    noisy.add(mean, logvar)
    eps = rng.normal(size=(200, *mean.shape))
    samples = mean + np.exp(logvar / 2) * eps
    stats = noisy.statistics()
    np.testing.assert_allclose(stats["mean"], samples.mean(axis=(0, 1, 2, 3)), atol=0.02)
    np.testing.assert_allclose(stats["std"], samples.std(axis=(0, 1, 2, 3)), rtol=0.01)
    assert stats["scaling_factor"] == pytest.approx(1 / samples.std(), rel=0.01)


def test_evaluate_an_autoencoder_run(runs, tmp_path):
    options = evaluation.EvaluationOptions(num_samples=16, splits=("test",), batch_size=8)
    output = str(tmp_path / "eval")
    result = evaluation.evaluate_checkpoint(runs["whole"], output, options)
    with open(os.path.join(output, "metrics.json"), encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["family"] == "autoencoder" and result["checkpoint_step"] == STEPS
    assert (result["resolution"], result["downsampling_factor"]) == (16, 2)
    entry = result["splits"]["test"]
    assert entry["num_examples"] == 16 and entry["latent_shape"] == [8, 8, 4]
    assert entry["real_oracle_accuracy"]["all"] == 1.0
    assert set(entry["oracle_accuracy"]) >= {"shape", "color", "size", "position", "all"}
    # PSNR of the same reconstructions computed here: the posterior mean, decoded, as uint8
    model, _ = rundir.load_autoencoder(runs["whole"])
    examples = evaluation.load_split_examples(
        rundir.load_run_config(runs["whole"]).data, 0, "test", 16
    )
    decoded = model(jnp.asarray(examples.images, jnp.float32) / 127.5 - 1)
    decoded = np.clip(np.round((np.asarray(decoded) + 1) * 127.5), 0, 255) / 255.0
    mse = np.mean((examples.images / 255.0 - decoded) ** 2, axis=(1, 2, 3))
    assert entry["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-4)
    latents = entry["latents"]
    assert len(latents["mean"]) == len(latents["std"]) == 4
    assert latents["scaling_factor"] == pytest.approx(1 / latents["overall_std"])
    for name in ("index.html", entry["grid"]):
        assert os.path.isfile(os.path.join(output, name))
    with open(os.path.join(output, "index.html"), encoding="utf-8") as f:
        assert "PSNR" in f.read()


def test_evaluate_a_diffusers_directory_reads_shapes_at_its_sample_size(tmp_path):
    model_config = autoencoder_config("tiny", sample_size=32)
    options = evaluation.EvaluationOptions(data_dir=str(tmp_path / "data"))
    data, seed = reconstruction.autoencoder_data("vae", None, model_config, options)
    assert (data.name, data.builder_config, data.data_dir, seed) == (
        "shapes",
        "32",
        str(tmp_path / "data"),
        0,
    )
    with pytest.raises(UserError, match=r"not 512 \(its config.json's sample_size 512\)"):
        reconstruction.autoencoder_data(
            "vae", None, autoencoder_config("tiny", sample_size=512), options
        )


def test_clips_train_the_autoencoder_on_all_their_frames_or_k_distinct_random_ones():
    # Clip c, frame t holds the value 10 c + t everywhere: the frames drawn are readable.
    clips = jnp.asarray(10 * np.arange(4)[:, None] + np.arange(6)[None], jnp.float32)
    clips = jnp.broadcast_to(clips[:, :, None, None, None], (4, 6, 2, 2, 3))
    key = jax.random.key(0)
    every, left = family.images_of({"video": clips}, key)
    assert every.shape == (24, 2, 2, 3) and left is key  # all frames, the key untouched
    np.testing.assert_array_equal(every[:, 0, 0, 0], np.asarray(clips[:, :, 0, 0, 0]).ravel())
    drawn, left = family.images_of({"video": clips}, key, frames_per_clip=3)
    assert drawn.shape == (12, 2, 2, 3) and left is not key
    values = np.asarray(drawn[:, 0, 0, 0]).reshape(4, 3)
    for c, row in enumerate(values):
        assert set(row // 10) == {c} and len(set(row % 10)) == 3  # 3 distinct frames of clip c
    first_clip = lambda seed: family.images_of({"video": clips}, jax.random.key(seed), 3)[0][:3]
    draws = {tuple(np.asarray(first_clip(seed)[:, 0, 0, 0])) for seed in range(8)}
    assert len(draws) > 1  # the key decides which frames
    images = jnp.zeros((5, 2, 2, 3))
    assert family.images_of({"image": images}, key, frames_per_clip=3)[0] is images


def test_a_negative_frames_per_clip_is_named_with_what_is_valid():
    # The config's types refuse a non-integer already (train.py names the key and its type).
    config = base_autoencoder.get_config()
    assert family.loss_options(config)["frames_per_clip"] == 0
    config.loss.frames_per_clip = -1
    with pytest.raises(UserError, match=r"config.loss.frames_per_clip=-1 must be an integer >= 0"):
        family.loss_options(config)
