"""Class-conditional DiTs through train.py, sample.py and evaluate.py: class ids, label dropout,
training, sampling by id and by name, guidance against the null class, errors.

Truths: a class of several ClassLabel features is the index of its values in the product of the
features' value lists (itertools.product enumerates it independently); label dropout draws the
null class with its configured probability (binomial bounds); at guidance scale 1 the guided
sampler is the conditional model, and at any scale it is null + w (class - null) over a plain
Euler loop of the same DiT; an image is a function of (weights, class, seed, settings) only, so
its bytes do not change with the batch size, the batch mates or the device count.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_block
from flax import nnx
from PIL import Image

from configs import base_dit
from diffusion import data as data_lib
from diffusion import inference, meshes, metrics, models, param_export, rundir, training
from diffusion.data import shapes as shapes_lib
from diffusion.errors import UserError
from diffusion.families import dit as dit_family
from diffusion.inference import grids
from diffusion.inference.dit_pipeline import load_dit_run
from diffusion.pipeline.periodic import PeriodicEvaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = ("color", "shape")
NUM_CLASSES = len(shapes_lib.COLOR_NAMES) * len(shapes_lib.SHAPES)  # 40
# The same classes by name and by id (mixed radix, colour most significant), computed apart.
PRODUCT = [f"{c} {s}" for c, s in itertools.product(shapes_lib.COLOR_NAMES, shapes_lib.SHAPES)]
NAMES = ["red circle", "green star", "white heart", "blue square", "yellow triangle"]
IDS = [PRODUCT.index(name) for name in NAMES]
SEEDS = [3, 1, 4, 1, 5]


def tiny_class_config(data_dir, steps=2, **model):
    config = base_dit.get_config()
    config.data.update(
        data_dir=data_dir, builder_config="16", num_train_examples=256, num_eval_examples=64
    )
    config.data.class_features = FEATURES
    config.model.num_classes = NUM_CLASSES
    one_block(config, **model)
    config.training.update(
        global_batch_size=16, num_steps=steps, log_every=1, checkpoint_every=100, ema_decay=0.9
    )
    config.optimizer.update(warmup_steps=0, learning_rate=1e-3)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The trained run (2 steps, one device) and `random`: a copy whose exported weights get
    N(0, 0.05) noise, so that a 2-step DiT's image depends on its class (its adaLN-Zero gates are
    still ~0) and guidance visibly matters."""
    root = tmp_path_factory.mktemp("class_runs")
    data_dir, trained = str(root / "data"), str(root / "trained")
    config = tiny_class_config(data_dir)
    config.training.eval_every = 2  # train.py's periodic sample grid, of classes
    config.sampling.steps = 2
    callbacks = [PeriodicEvaluation(config)]
    training.train(config, trained, devices=jax.devices()[:1], callbacks=callbacks)
    random_dir = str(root / "random")
    shutil.copytree(trained, random_dir)
    _, dit_config = rundir.load_model_config(trained)
    state = nnx.state(rundir.load_run_params(trained, dit_config, models.DiT))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    noise = [
        0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    leaves = [x + n for x, n in zip(leaves, noise, strict=True)]
    param_export.export_params(
        os.path.join(random_dir, "params"), jax.tree.unflatten(treedef, leaves)
    )
    return {"data_dir": data_dir, "trained": trained, "random": random_dir}


@pytest.fixture(scope="module")
def pipe(runs):
    return inference.ClassToImage.from_run(runs["random"])  # sample.py's micro-batch


def one_device_mesh():
    return meshes.make_mesh({"data": 1}, jax.devices()[:1])


# ---------------------------------------------------------------------------------------------
# Class ids and label dropout
# ---------------------------------------------------------------------------------------------


def test_class_ids_are_the_index_of_the_feature_values_in_their_product(runs):
    source, builder = training.inputs.prepare_source(
        tiny_class_config(runs["data_dir"]).data, seed=0
    )
    iterator = data_lib.make_input_pipeline(
        source, None, split="train", global_batch_size=64, seed=0, context_length=0,
        captions=False, class_features=FEATURES,
    )  # fmt: skip
    batch = next(iterator)
    assert "tokens" not in batch and batch["image"].shape == (64, 16, 16, 3)
    expected = [
        PRODUCT.index(f"{shapes_lib.COLOR_NAMES[c]} {shapes_lib.SHAPES[s]}")
        for c, s in zip(batch["color"], batch["shape"], strict=True)
    ]
    np.testing.assert_array_equal(batch["label"], expected)
    space = data_lib.ClassSpace.from_features(builder.info.features, FEATURES, "shapes")
    assert space.num_classes == NUM_CLASSES and space.names() == PRODUCT
    assert [space.resolve(n) for n in ("Red  Circle", "green star", "7", 39)] == [0, 8, 7, 39]
    labels = space.feature_labels(batch["label"])
    np.testing.assert_array_equal(labels["shape"], batch["shape"])
    # One feature through label_key: the class is that feature's label.
    config = tiny_class_config(runs["data_dir"]).data
    config.update(class_features=(), label_key="shape")
    assert data_lib.class_features_of(config) == ("shape",)


@pytest.mark.parametrize(("rate", "seed"), [(0.0, 0), (0.1, 1), (0.1, 2), (0.5, 3), (1.0, 4)])
def test_label_dropout_gives_the_null_class_at_its_rate_and_keeps_the_other_labels(rate, seed):
    count, null = 20_000, NUM_CLASSES
    labels = jax.random.randint(jax.random.key(100 + seed), (count,), 0, null)
    seen = {}

    def model(x, t, labels):  # records what the DiT would be conditioned on
        seen["labels"] = np.asarray(labels)
        return jnp.zeros_like(x)

    batch = {"image": jnp.zeros((count, 1, 1, 1)), "label": labels}
    dit_family.class_conditional_loss(
        model, None, batch, jax.random.key(seed), objective=dit_family.DiffusionObjective(),
        num_classes=null, cond_dropout=rate,
    )  # fmt: skip
    dropped = seen["labels"] == null
    bound = 5 * np.sqrt(rate * (1 - rate) / count)  # five binomial standard deviations
    assert abs(dropped.mean() - rate) <= bound
    np.testing.assert_array_equal(seen["labels"][~dropped], np.asarray(labels)[~dropped])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_training_writes_a_class_run_without_tokenizer_or_text_encoder(runs):
    run = runs["trained"]
    names = set(os.listdir(run))
    assert {"classes.json", "model.json", "config.json", "params", "checkpoints"} <= names
    assert "tokenizer" not in names
    family, model_config = rundir.load_model_config(run)
    assert (family, model_config.conditioning, model_config.num_classes) == ("dit", "class", 40)
    assert rundir.load_run_config(run).text_encoder.checkpoint is None
    assert rundir.load_classes(run).names() == PRODUCT
    losses = [r["loss"] for r in metrics.read_metrics(run)]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    grid = np.asarray(Image.open(os.path.join(run, "samples", "step_2.png")))
    assert grid.shape[:2] == (8 * 102, 4 * 102)  # the first 8 classes x 4 seeds, 96 px tiles


def test_the_runlocal_imagenet_recipe_trains_on_shapes(runs, tmp_path):
    """configs/dit_xl2_imagenet.py:runlocal: the DiT paper's recipe (DDPM epsilon, scanned
    blocks, FSDP over the 8 devices) on shapes, class = shape."""
    from diffusion import config as config_lib

    config = config_lib.load_config(
        "configs/dit_xl2_imagenet.py:runlocal",
        [("data.data_dir", runs["data_dir"]), ("training.num_steps", "2")],
    )
    training.train(config, str(tmp_path))
    assert rundir.load_classes(str(tmp_path)).names() == list(shapes_lib.SHAPES)
    _, model_config = rundir.load_model_config(str(tmp_path))
    assert (model_config.num_classes, model_config.scan_layers) == (5, True)
    assert np.all(np.isfinite([r["loss"] for r in metrics.read_metrics(str(tmp_path))]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"model.num_classes": 10},
            r"num_classes=10, but the class features \('color', 'shape'\) .* give 8 color x "
            r"5 shape = 40 classes\. Pass --config\.model\.num_classes=40",
        ),
        (
            {"data.class_features": ("colour", "shape")},
            r"class feature 'colour' .* is not a feature .* ClassLabel features are "
            r"\['background', 'color', 'position', 'shape', 'size'\]",
        ),
        (
            {"model.num_classes": 0},
            r"class_features=\('color', 'shape'\) is set but config\.model\.num_classes=0",
        ),
        (
            {"data.class_features": ()},
            r"needs the features its class is made of: set config\.data\.class_features",
        ),
    ],
)
def test_recipes_that_do_not_make_their_classes_are_refused_before_any_file(
    runs, tmp_path, changes, message
):
    config = tiny_class_config(runs["data_dir"])
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    with pytest.raises(UserError, match=message):
        training.train(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not os.path.exists(tmp_path / "run" / "config.json")


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_classes_by_name_and_by_id_give_the_same_images(pipe):
    by_name = pipe.generate(NAMES, seeds=SEEDS, steps=2)
    assert by_name.shape == (5, 16, 16, 3) and by_name.dtype == np.uint8
    np.testing.assert_array_equal(pipe.generate(IDS, seeds=SEEDS, steps=2), by_name)
    assert not np.array_equal(by_name[1], by_name[3])  # seed 1 twice: other classes, images


def reference_euler(run_dir, label, seed, steps, scale=None):
    """Flow Euler written as a plain loop over the DiT for one sample: conditional only
    (scale None), or null + w (class - null) with the null class NUM_CLASSES."""
    _, dit_config = rundir.load_model_config(run_dir)
    dit = rundir.load_run_params(run_dir, dit_config, models.DiT)
    noise_key, _ = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(noise_key, (1, 16, 16, 3), jnp.float32)
    times = np.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        t_batch = jnp.full((1,), t, jnp.float32)
        velocity = dit(x, t_batch, labels=jnp.array([label]))
        if scale is not None:
            null = dit(x, t_batch, labels=jnp.array([NUM_CLASSES]))
            velocity = null + scale * (velocity - null)
        x = x + (t_next - t) * velocity
    return np.asarray(jnp.clip(jnp.round((x[0] + 1) * 127.5), 0, 255)).astype(np.int64)


@pytest.mark.parametrize(("scale", "reference_scale"), [(1.0, None), (3.0, 3.0)])
def test_guidance_is_null_plus_scale_times_class_minus_null(runs, pipe, scale, reference_scale):
    """Scale 1 is the unguided conditional sampler (the null class cannot matter)."""
    image = pipe.generate(["green star"], seeds=[11], steps=3, guidance_scale=scale)[0]
    expected = reference_euler(runs["random"], IDS[1], 11, 3, reference_scale)
    difference = np.abs(image.astype(np.int64) - expected)
    assert difference.max() <= 1 and np.mean(difference == 0) > 0.99  # float32 rounding only
    if scale != 1.0:  # guidance really acts
        assert np.abs(reference_euler(runs["random"], IDS[1], 11, 3) - expected).max() > 8


def test_same_bytes_for_any_batch_size_batch_mates_and_device_count(runs, pipe):
    # Micro-batches of 4: one device runs 1 or 2 of them (and padding), eight devices 1 each.
    one = inference.ClassToImage.from_run(runs["random"], mesh=one_device_mesh())
    options = dict(seeds=SEEDS, sampler="euler_stochastic", eta=1.0, steps=2)
    reference = one.generate(IDS, batch_size=8, **options)
    for sampler in (one, pipe):
        for batch_size in (1, 3, 8):
            np.testing.assert_array_equal(
                sampler.generate(NAMES, batch_size=batch_size, **options), reference
            )
    order = [4, 2, 0, 3, 1]
    shuffled = one.generate([IDS[i] for i in order], seeds=[SEEDS[i] for i in order],
                            sampler="euler_stochastic", eta=1.0, steps=2, batch_size=2)  # fmt: skip
    np.testing.assert_array_equal(shuffled, reference[order])


def test_new_scales_and_classes_reuse_the_compiled_program(pipe):
    weak = pipe.generate([0], seeds=[2], steps=2, guidance_scale=1.0)  # compiled (or cached)
    before = pipe.num_compilations
    strong = pipe.generate([0], seeds=[2], steps=2, guidance_scale=6.0)
    pipe.generate([5, 9], seeds=[2, 3], steps=2, guidance_scale=[2.0, 4.0])
    assert pipe.num_compilations == before
    assert not np.array_equal(weak, strong)


def test_sample_py_by_class_labels_and_a_jsonl_class_field(runs, pipe, tmp_path):
    run = runs["random"]
    out = tmp_path / "labels"
    command = [sys.executable, os.path.join(REPO, "sample.py"), f"--checkpoint={run}",
               "--class_labels=green star,3", f"--output_dir={out}", "--steps=2",
               "--num_per_prompt=2", "--seed=5"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(out / "manifest.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [(r["class"], r["class_name"], r["seed"]) for r in records] == [
        (8, "green star", 5), (8, "green star", 6), (3, "red star", 5), (3, "red star", 6),
    ]  # fmt: skip
    # The grid names each row's class as the manifest does (not only its id).
    rows = [
        (label, np.stack([np.asarray(Image.open(out / f"{line:05d}_{k:03d}.png")) for k in (0, 1)]))
        for line, label in ((1, "green star (class 8)"), (2, "red star (class 3)"))
    ]
    expected_grid = np.asarray(grids.labelled_rows_image(rows))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "grid.png")), expected_grid)
    prompts = tmp_path / "classes.jsonl"
    prompts.write_text('{"class": "green star", "seed": 5}\n\n{"class": 3, "guidance_scale": 1}\n')
    items = inference.read_prompt_file(str(prompts), seed=6)
    assert [(i.line, i.class_label, i.seed, i.guidance_scale) for i in items] == [
        (1, "green star", 5, 3.0), (3, 3, 6, 1.0),
    ]  # fmt: skip
    inference.sample_to_directory(pipe, items, str(tmp_path / "jsonl"), steps=2)
    expected = pipe.generate([8, 3], seeds=[5, 6], steps=2, guidance_scale=[3.0, 1.0])
    read = lambda path: np.asarray(Image.open(path))
    np.testing.assert_array_equal(read(tmp_path / "jsonl" / "00001_000.png"), expected[0])
    np.testing.assert_array_equal(read(tmp_path / "jsonl" / "00003_000.png"), expected[1])
    np.testing.assert_array_equal(read(out / "00001_000.png"), expected[0])  # the same image


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_an_unknown_class_name_names_the_valid_classes(pipe):
    with pytest.raises(UserError, match=r"class 'red circel' is not a class of this run.*40 "
                       r"classes.*'<color> <shape>'.*Close matches: \['red circle'"):  # fmt: skip
        pipe.generate(["red circel"])
    with pytest.raises(UserError, match=r"class 40 is out of range.*ids 0-39"):
        pipe.generate([40])


def text_pipeline():
    """A text-conditional pipeline of random weights (its checks run before any sampling)."""
    dit = models.DiT(models.DiTConfig(conditioning="text"), rngs=nnx.Rngs(0))
    clip = models.CLIP(models.clip_config("tiny"), rngs=nnx.Rngs(0))
    diffusion_config = base_dit.get_config().diffusion
    return inference.TextToImage(
        dit=dit, text_encoder=clip, tokenizer=None, diffusion_config=diffusion_config,
        context_length=16, resolution=16,
    )  # fmt: skip


def test_classes_for_a_text_run_and_prompts_for_a_class_run_are_refused(runs, pipe, tmp_path):
    classes = inference.class_label_items(["red circle"])
    with pytest.raises(UserError, match=r"is a text-conditional DiT: give prompts.*not class"):
        inference.sample_to_directory(text_pipeline(), classes, str(tmp_path / "a"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    items = inference.read_prompt_file(str(prompts))
    with pytest.raises(UserError, match=r"is a class-conditional DiT \(40 classes.*--class_labels"):
        inference.sample_to_directory(pipe, items, str(tmp_path / "b"))
    with pytest.raises(UserError, match=r"class-conditioned DiT; text-to-image sampling needs"):
        inference.TextToImage.from_run(runs["random"])
    text_run = tmp_path / "text_run"
    rundir.save_model_config(str(text_run), "dit", models.DiTConfig(conditioning="text"))
    with pytest.raises(UserError, match=r"text-conditioned DiT; class-to-image sampling needs"):
        load_dit_run(str(text_run), conditioning="class")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"class": "red circle", "negative_prompt": "blue"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: a 'class' line takes no 'negative_prompt'"):
        inference.read_prompt_file(str(bad_jsonl))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def test_evaluate_reports_the_oracles_accuracy_of_the_asked_class(runs, tmp_path):
    from diffusion import evaluation

    options = evaluation.EvaluationOptions(
        num_samples=8, splits=("test",), guidance_scales=(1.0, 3.0), samplers=(("euler", 2),),
        batch_size=8, grid_size=4,
    )  # fmt: skip
    result = evaluation.evaluate_checkpoint(runs["random"], str(tmp_path), options)
    assert (result["conditioning"], result["class_features"]) == ("class", list(FEATURES))
    entry = result["splits"]["test"]
    assert entry["real"]["oracle_accuracy"] == {"color": 1.0, "shape": 1.0, "class": 1.0}
    accuracy = entry["samples"]["euler:2"]["3"]["accuracy"]
    assert set(accuracy) == {"color", "shape", "class"}
    assert accuracy["class"] <= min(accuracy["color"], accuracy["shape"])
    assert set(entry["best"]["per_class"]) <= set(PRODUCT)
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["splits"]["test"]["best"]["sampler"] == "euler:2"
    assert "Accuracy of the asked class" in (tmp_path / "index.html").read_text()

    # Asked to stop (a pipeline's SIGTERM) after the first setting: it ends, writing nothing.
    from diffusion.evaluation.sweep import EvaluationStopped

    answers = iter([False, True])
    stopped = tmp_path / "stopped"
    with pytest.raises(EvaluationStopped, match="stopped before test euler 3.0"):
        evaluation.evaluate_checkpoint(runs["random"], str(stopped), options, lambda: next(answers))
    assert not (stopped / "metrics.json").exists()
