"""The text-to-image pipeline on a tiny trained run: loading, determinism, guidance, errors.

Truths: an image is a pure function of (checkpoint, prompt, negative prompt, seed, settings),
so its bytes cannot change with the batch size, the batch position, the batch mates or the
device count; a plain Python Euler loop over the same DiT gives the same images; at guidance
scale 1 the guided model is the conditional one bit for bit (so the negative prompt cannot
matter); the EMA weights of checkpoint N are the exported params/ of a run that ended at N.
"""

import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_block
from flax import nnx
from test_trainer import tiny

from diffusion import data as data_lib
from diffusion import inference, meshes, models, param_export, rundir, training
from diffusion.errors import UserError
from diffusion.families import dit as dit_family

PROMPTS = [
    "a large red circle in the center",
    "a small blue square",
    "a green star",
    "a yellow heart",
    "a red triangle",
]
SEEDS = [3, 1, 4, 1, 5]


def train_tiny_runs(root, copies: bool = True) -> dict[str, str]:
    """Run directories for the tests, from a CLIP and a DiT trained for one step each.

    dit: the trained run. A one-step DiT still has its adaLN-Zero gates at ~0, so its images barely
    depend on the prompt; `random` is a copy whose exported weights get N(0, 0.05) noise, so that
    prompts, negative prompts and guidance visibly matter. `ddpm` is `random` read as a DDPM model
    (v prediction) by its config.json, which is all the sampler path looks at.
    """
    data_dir = str(root / "data")
    clip_dir, dit_dir = str(root / "clip"), str(root / "dit")
    devices = jax.devices()[:1]  # one device compiles fastest
    # Two blocks in the towers sampling reads: the scanned copies (test below) stack them.
    config = one_block(tiny("clip", data_dir, steps=1, mesh="1"), text_depth=2)
    config.optimizer.warmup_steps = 0
    training.train(config, clip_dir, devices=devices)
    config = one_block(tiny("dit", data_dir, steps=1, mesh="1"), depth=2)
    config.optimizer.warmup_steps = 0
    config.text_encoder.checkpoint = clip_dir
    config.tokenizer.path = os.path.join(clip_dir, "tokenizer")
    training.train(config, dit_dir, devices=devices)
    if not copies:
        return {"clip": clip_dir, "dit": dit_dir}
    random_dir = str(root / "random")
    shutil.copytree(dit_dir, random_dir)
    _, dit_config = rundir.load_model_config(dit_dir)
    state = nnx.state(rundir.load_run_params(dit_dir, dit_config, models.DiT))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    noise = [
        0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    leaves = [x + n for x, n in zip(leaves, noise, strict=True)]
    param_export.export_params(
        os.path.join(random_dir, "params"), jax.tree.unflatten(treedef, leaves)
    )
    ddpm_dir = str(root / "ddpm")
    shutil.copytree(random_dir, ddpm_dir)
    with open(os.path.join(ddpm_dir, "config.json")) as f:
        recipe = json.load(f)
    recipe["diffusion"].update(objective="ddpm", prediction_type="v_prediction")
    with open(os.path.join(ddpm_dir, "config.json"), "w") as f:
        json.dump(recipe, f)
    return {"clip": clip_dir, "dit": dit_dir, "random": random_dir, "ddpm": ddpm_dir}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_tiny_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def pipeline(runs):
    return inference.TextToImage.from_run(runs["random"])


def one_device_mesh():
    return meshes.make_mesh({"data": 1}, jax.devices()[:1])


def test_loads_a_run_and_returns_uint8_images(pipeline):
    assert (pipeline.checkpoint_step, pipeline.resolution, pipeline.objective) == (1, 16, "flow")
    assert pipeline.num_data_devices == 8
    images = pipeline.generate(PROMPTS[:2], seeds=[0, 1], steps=2)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])  # other prompt and seed, other image


def test_same_bytes_for_any_batch_size_position_and_device_count(runs):
    # Stochastic Euler draws noise at every step as well as at the start. micro_batch=2 so that
    # the batch sizes below give 1, 2 or 4 micro-batches per device.
    sampler, eta = "euler_stochastic", 1.0
    eight = inference.TextToImage.from_run(runs["random"], micro_batch=2)
    one = inference.TextToImage.from_run(runs["random"], micro_batch=2, mesh=one_device_mesh())
    options = dict(seeds=SEEDS, sampler=sampler, eta=eta, steps=3)
    reference = one.generate(PROMPTS, batch_size=8, **options)
    for pipe in (one, eight):
        for batch_size in (1, 3, 8):
            images = pipe.generate(PROMPTS, batch_size=batch_size, **options)
            np.testing.assert_array_equal(images, reference)
    order = [4, 2, 0, 3, 1]
    shuffled = one.generate(
        [PROMPTS[i] for i in order], seeds=[SEEDS[i] for i in order], sampler=sampler,
        eta=eta, steps=3, batch_size=2,
    )  # fmt: skip
    np.testing.assert_array_equal(shuffled, reference[order])
    # Seeds 1 (prompts 1 and 3) are the same seed with other prompts: the images still differ.
    assert not np.array_equal(reference[1], reference[3])


def test_stochastic_step_noise_comes_from_each_samples_own_seed(pipeline):
    options = dict(sampler="euler_stochastic", eta=1.0, steps=3, guidance_scale=1.0)
    alone = pipeline.generate(["a red circle"], seeds=[7], **options)[0]
    with_mates = pipeline.generate(["a blue square", "a red circle", "a red circle"],
                                   seeds=[7, 7, 8], **options)  # fmt: skip
    np.testing.assert_array_equal(with_mates[1], alone)
    assert not np.array_equal(with_mates[2], alone)  # another seed: other step noise


def test_seed_keys_are_jax_random_key_of_each_seed():
    seeds = [0, 1, 2**31 + 5, 2**32 - 1]
    keys = inference.program.seed_keys(jnp.asarray(seeds, jnp.uint32))
    for seed, key in zip(seeds, keys, strict=True):
        np.testing.assert_array_equal(
            jax.random.key_data(key), jax.random.key_data(jax.random.key(seed))
        )


def reference_euler(runs, prompt, negative, seed, scale, steps, predicts_x0=False):
    """Classifier-free guided flow Euler written as a plain loop over the DiT, for one sample.

    predicts_x0: read the DiT's output as x0, whose velocity at x_t is (x_t - x0) / t."""
    _, dit_config = rundir.load_model_config(runs["random"])
    dit = rundir.load_run_params(runs["random"], dit_config, models.DiT)
    clip = rundir.load_text_encoder(runs["clip"], {"dtype": "float32"})
    tokenizer = data_lib.load_tokenizer(os.path.join(runs["dit"], "tokenizer"))
    words = dit_config.word_conditioning
    cond = dit_family.text_condition(clip, *data_lib.tokenize(tokenizer, [prompt], 16), words=words)
    uncond = dit_family.text_condition(
        clip, *data_lib.tokenize(tokenizer, [negative], 16), words=words
    )
    noise_key, _ = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(noise_key, (1, 16, 16, 3), jnp.float32)
    times = np.linspace(1.0, 0.0, steps + 1)
    model_fn = dit_family.dit_model_fn(dit)  # the condition's fields as the DiT's arguments
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        t_batch = jnp.full((1,), t, jnp.float32)
        v_cond, v_uncond = model_fn(x, t_batch, cond), model_fn(x, t_batch, uncond)
        if predicts_x0:
            v_cond, v_uncond = (x - v_cond) / t, (x - v_uncond) / t
        x = x + (t_next - t) * (v_uncond + scale * (v_cond - v_uncond))
    return np.asarray(jnp.clip(jnp.round((x[0] + 1) * 127.5), 0, 255)).astype(np.int64)


def test_matches_a_plain_guided_euler_loop(runs, pipeline):
    image = pipeline.generate(["a red circle"], ["a blue square"], seeds=[11], steps=4,
                              guidance_scale=2.5)[0].astype(np.int64)  # fmt: skip
    expected = reference_euler(runs, "a red circle", "a blue square", 11, 2.5, 4)
    # Float32 in another order of operations: at most one level off, almost never.
    assert np.abs(image - expected).max() <= 1
    assert np.mean(image == expected) > 0.99


def test_a_flow_model_that_predicts_x0_samples_as_a_plain_loop_over_its_x0(runs, tmp_path):
    """config.diffusion.flow_prediction_type="sample": the sampler reads the output as x0."""
    run = tmp_path / "sample"
    shutil.copytree(runs["random"], run)
    with open(run / "config.json") as f:
        recipe = json.load(f)
    recipe["diffusion"]["flow_prediction_type"] = "sample"
    with open(run / "config.json", "w") as f:
        json.dump(recipe, f)
    pipe = inference.TextToImage.from_run(str(run))
    assert pipe.prediction_type == "sample"
    image = pipe.generate(["a red circle"], ["a blue square"], seeds=[11], steps=4,
                          guidance_scale=2.5)[0].astype(np.int64)  # fmt: skip
    expected = reference_euler(runs, "a red circle", "a blue square", 11, 2.5, 4, predicts_x0=True)
    assert np.abs(image - expected).max() <= 1
    assert np.mean(image == expected) > 0.99
    as_velocity = reference_euler(runs, "a red circle", "a blue square", 11, 2.5, 4)
    assert np.abs(image - as_velocity).max() > 8  # the output really is read another way


def scanned_copy(run_dir, new_dir, model_cls, **config_changes):
    """A copy of a run whose model.json says scan_layers=True, with the same weights stacked
    along the scanned 'layers' axis."""
    from diffusion.models import layers

    shutil.copytree(run_dir, new_dir)
    family, config = rundir.load_model_config(run_dir)
    scanned_config = dataclasses.replace(config, scan_layers=True)
    scanned = model_cls(scanned_config, rngs=nnx.Rngs(0))
    layers.copy_params_into_scanned(rundir.load_run_params(run_dir, config, model_cls), scanned)
    shutil.rmtree(os.path.join(new_dir, "params"))
    param_export.export_params(os.path.join(new_dir, "params"), nnx.state(scanned))
    rundir.save_model_config(new_dir, family, scanned_config)
    with open(os.path.join(new_dir, "config.json")) as f:
        recipe = json.load(f)
    for section, fields in config_changes.items():
        recipe[section].update(fields)
    with open(os.path.join(new_dir, "config.json"), "w") as f:
        json.dump(recipe, f)
    return new_dir


def test_scanned_dit_and_text_tower_sample_the_images_of_unscanned_ones(runs, pipeline, tmp_path):
    """scan_layers is an execution choice: a run trained with it samples the same images
    (nnx.scan inside the sampler's own loops must see parameters of its trace)."""
    clip = scanned_copy(runs["clip"], tmp_path / "clip", models.CLIP)
    dit = scanned_copy(runs["random"], tmp_path / "dit", models.DiT,
                       text_encoder={"checkpoint": str(clip)})  # fmt: skip
    scanned = inference.TextToImage.from_run(str(dit))
    options = dict(seeds=SEEDS, steps=3, guidance_scale=3.0)
    images = scanned.generate(PROMPTS, **options).astype(np.int64)
    expected = pipeline.generate(PROMPTS, **options).astype(np.int64)
    # Float32 in another order of operations: at most one level off, almost never.
    assert np.abs(images - expected).max() <= 1
    assert np.mean(images == expected) > 0.99


def test_new_scales_prompts_and_seeds_reuse_the_compiled_program(pipeline):
    # Compilations are shared by equal programs (module-level cache): settings no other test uses.
    options = dict(steps=6, guidance_rescale=0.25)
    before = pipeline.num_compilations
    weak = pipeline.generate(["a red circle"], seeds=[2], guidance_scale=1.0, **options)
    strong = pipeline.generate(["a red circle"], seeds=[2], guidance_scale=7.0, **options)
    pipeline.generate(["a star", "a heart"], ["red", None], seeds=[5, 6],
                      guidance_scale=[2.0, 4.0], **options)  # fmt: skip
    assert pipeline.num_compilations == before + 1
    assert not np.array_equal(weak, strong)  # the traced scale reaches the program
    pipeline.generate(["a red circle"], steps=7, guidance_rescale=0.25)  # another program
    assert pipeline.num_compilations == before + 2


def test_negative_prompt_acts_only_through_guidance(pipeline):
    options = dict(seeds=[9], steps=3)
    plain = pipeline.generate(["a circle"], guidance_scale=1.0, **options)
    negative = pipeline.generate(["a circle"], ["red"], guidance_scale=1.0, **options)
    np.testing.assert_array_equal(plain, negative)  # w = 1: the conditional model exactly
    guided = pipeline.generate(["a circle"], guidance_scale=4.0, **options)
    guided_negative = pipeline.generate(["a circle"], ["red"], guidance_scale=4.0, **options)
    assert not np.array_equal(guided, guided_negative)
    empty = pipeline.generate(["a circle"], [""], guidance_scale=4.0, **options)
    np.testing.assert_array_equal(empty, guided)  # no negative prompt = the empty prompt


def test_checkpoint_step_directory_loads_that_steps_weights(runs):
    step_dir = os.path.join(runs["dit"], "checkpoints", "1")
    options = dict(seeds=[4], steps=2)
    exported = inference.TextToImage.from_run(runs["dit"]).generate(["a red circle"], **options)
    ema = inference.TextToImage.from_run(step_dir)
    assert ema.checkpoint_step == 1
    np.testing.assert_array_equal(ema.generate(["a red circle"], **options), exported)
    raw = inference.TextToImage.from_run(step_dir, use_ema=False)
    assert not raw.use_ema
    assert not np.array_equal(raw.generate(["a red circle"], **options), exported)


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before_as_training_does(
    runs, tmp_path, caplog
):
    """sample.py on a run without exported params/ (or --use_ema=false) reads the latest
    checkpoint; a damaged one (a truncated array file) is reported by path and the step before
    it is sampled, as train.py resumes from it. A named damaged step is a one-line error."""
    run = str(tmp_path / "run")
    shutil.copytree(runs["dit"], run)
    shutil.rmtree(os.path.join(run, "params"))
    steps = os.path.join(run, "checkpoints")
    shutil.copytree(os.path.join(steps, "1"), os.path.join(steps, "2"))  # a newer step ...
    state = os.path.join(steps, "2", "state")
    files = [os.path.join(root, n) for root, _, names in os.walk(state) for n in names]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)  # ... cut short by a full disk
    options = dict(seeds=[4], steps=2)
    expected = inference.TextToImage.from_run(os.path.join(runs["dit"], "checkpoints", "1"))
    with caplog.at_level(logging.WARNING):
        pipe = inference.TextToImage.from_run(run)
    assert pipe.checkpoint_step == 1
    assert f"checkpoint {os.path.join(steps, '2')} could not be restored" in caplog.text
    np.testing.assert_array_equal(
        pipe.generate(["a red circle"], **options), expected.generate(["a red circle"], **options)
    )
    with pytest.raises(UserError) as error:
        inference.TextToImage.from_run(os.path.join(steps, "2"))
    message = str(error.value)
    assert "could not be restored" in message and "pass another of its steps [1]" in message
    assert len(message) < 1000 and "\n" not in message  # no TensorStore dump


def test_ddpm_model_samplers(runs):
    pipe = inference.TextToImage.from_run(runs["ddpm"], micro_batch=1)
    one = inference.TextToImage.from_run(runs["ddpm"], micro_batch=1, mesh=one_device_mesh())
    assert pipe.objective == "ddpm" and pipe.prediction_type == "v_prediction"
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "unipc"):
        images = pipe.generate(PROMPTS[:3], seeds=SEEDS[:3], sampler=sampler, steps=3)
        assert images.shape == (3, 16, 16, 3) and images.std() > 0
    # The ancestral sampler draws fresh noise every step, from each sample's own key.
    eight = pipe.generate(PROMPTS[:3], seeds=SEEDS[:3], sampler="ddpm", steps=3)
    np.testing.assert_array_equal(
        one.generate(PROMPTS[:3], seeds=SEEDS[:3], sampler="ddpm", steps=3, batch_size=1), eight
    )
    with pytest.raises(UserError, match=r"'euler' does not apply to a ddpm.*ddpm, ddim, dpmpp_2m"):
        pipe.generate(PROMPTS[:1], sampler="euler")
    with pytest.raises(UserError, match="shift applies to flow"):
        pipe.generate(PROMPTS[:1], sampler="ddim", shift=3.0)


def test_long_prompt_is_truncated_with_a_warning_naming_it(pipeline, caplog):
    long_prompt = "a red circle " * 20
    with caplog.at_level(logging.WARNING, logger="diffusion.inference.text2image"):
        images = pipeline.generate([long_prompt, "a star"], steps=2)
    messages = [r.getMessage() for r in caplog.records]
    # Named by its first 77 characters: a 100k-character prompt is not echoed whole.
    shown = repr(long_prompt[:77] + "...")
    assert any(shown in m and "truncated" in m and len(m) < 200 for m in messages)
    assert not any("'a star'" in m for m in messages)
    assert images.shape == (2, 16, 16, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(sampler="plms"),
            r"unknown sampler 'plms'; valid samplers for this flow model: euler",
        ),
        (dict(sampler="ddpm"), r"'ddpm' does not apply to a flow.*euler, heun"),
        (dict(steps=0), r"steps must be an integer >= 1, got 0"),
        (dict(steps=2.5), r"steps must be an integer >= 1, got 2.5"),
        (dict(guidance_scale="high"), r"guidance_scale must be a finite number, got 'high'"),
        (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number"),
        (dict(guidance_scale=[1.0, 2.0]), r"guidance_scale has 2 entries for 1 prompts"),
        (dict(seeds=[-1]), r"seeds must be integers in \[0, 2\*\*32\), got -1"),
        (dict(eta=0.5), r"eta=0.5 has no effect on sampler 'euler'"),
        (dict(batch_size=0), r"batch_size must be an integer >= 1"),
        (dict(negative_prompts=["a", "b"]), r"negative_prompts has 2 entries for 1 prompts"),
    ],
)
def test_bad_settings_are_user_errors(pipeline, kwargs, message):
    with pytest.raises(UserError, match=message):
        pipeline.generate(["a red circle"], **kwargs)


def test_bad_checkpoints_are_user_errors(runs, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        inference.TextToImage.from_run(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="holds a clip model.*needs a DiT"):
        inference.TextToImage.from_run(runs["clip"])
    with pytest.raises(UserError, match="neither a run directory"):
        inference.TextToImage.from_run(str(tmp_path))
    with pytest.raises(UserError, match=r"checkpoints/7' could not be restored"):
        os.makedirs(os.path.join(runs["dit"], "checkpoints", "7"), exist_ok=True)
        try:
            inference.TextToImage.from_run(os.path.join(runs["dit"], "checkpoints", "7"))
        finally:
            os.rmdir(os.path.join(runs["dit"], "checkpoints", "7"))


def test_the_ahead_of_time_sampling_program_is_the_one_sample_py_runs(pipeline, runs):
    """diffusion.aot compiles for TPU the very program TextToImage (sample.py, evaluate.py) runs:
    the same static spec (so the same jit entry), arguments of the same shapes and shardings,
    and on real weights the same images."""
    from diffusion import aot

    config = rundir.load_run_config(runs["random"])
    config.sampling.update(sampler="euler", steps=3)
    count = pipeline.program_batch_size(8)  # whole micro-batches on each of the 8 devices
    programs = aot.build_programs(config, pipeline.mesh, sample_batch=count)
    program, (params, text_state, inputs, spec, decoder_state) = (
        programs.sample_fn,
        programs.sample_args,
    )
    assert decoder_state is None  # pixels: no autoencoder (tests/test_aot.py has a latent DiT)
    settings = pipeline.settings(sampler="euler", steps=3)
    assert spec == pipeline.spec_for(settings)
    assert program is inference.program.sampling_program
    prompts, seeds = [PROMPTS[k % 5] for k in range(count)], list(range(count))
    host = pipeline.program_inputs(prompts, [""] * count, seeds, [3.0] * count)
    concrete = inference.program.host_to_global(host, pipeline.mesh)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)
    for abstract, real in (
        (params, pipeline._dit_state),
        (text_state, pipeline._text_state),
        (inputs, concrete),
    ):
        assert shapes(abstract) == shapes(real)
    images = np.asarray(program(pipeline._dit_state, pipeline._text_state, concrete, spec))
    expected = pipeline.generate(prompts, seeds=seeds, guidance_scale=3.0, settings=settings)
    np.testing.assert_array_equal(images, expected)
