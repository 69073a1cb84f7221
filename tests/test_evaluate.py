"""evaluate.py end to end on tiny trained CLIP and DiT runs: metrics.json, TensorBoard, report.

Truths: the real dataset images are read right by the oracle; every image the report links to
exists; retrieval numbers equal `contrastive.retrieval_metrics` on the same embeddings; bad
inputs exit with status 2 and a one-paragraph message, no traceback.
"""

import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import jax
import numpy as np
import pytest
from conftest import one_block
from flax import nnx

from configs import base_clip, base_dit
from diffusion import evaluation, metrics, param_export, rundir, training
from diffusion.errors import UserError
from diffusion.models.autoencoder import Autoencoder, autoencoder_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(family, data_dir, steps=2):
    config = (base_clip if family == "clip" else base_dit).get_config()
    config.data.data_dir = data_dir
    config.data.builder_config = "16"
    config.data.num_train_examples = 256
    config.data.num_eval_examples = 32
    config.tokenizer.vocab_size = 300
    config.tokenizer.context_length = 32
    config.training.update(
        global_batch_size=16, num_steps=steps, log_every=1, checkpoint_every=100, ema_decay=0.9
    )
    config.optimizer.update(warmup_steps=1, learning_rate=1e-3)
    config.model.dtype = "float32"
    config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1})
    return one_block(config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data_dir = str(root / "data")
    clip_dir, dit_dir = str(root / "clip"), str(root / "dit")
    training.train(_tiny("clip", data_dir), clip_dir, devices=jax.devices()[:1])
    dit = _tiny("dit", data_dir)
    dit.text_encoder.checkpoint = clip_dir
    dit.tokenizer.path = os.path.join(clip_dir, "tokenizer")
    training.train(dit, dit_dir, devices=jax.devices()[:1])
    return {"clip": clip_dir, "dit": dit_dir}


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _check_page(output_dir, expected_images):
    """Every <img> of index.html exists as a PNG file; the expected ones are linked."""
    parser = _Images()
    with open(os.path.join(output_dir, "index.html"), encoding="utf-8") as f:
        parser.feed(f.read())
    for source in parser.sources:
        path = os.path.join(output_dir, source)
        assert os.path.isfile(path), source
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", source
    assert set(expected_images) <= set(parser.sources), parser.sources
    return parser.sources


def _check_tensorboard(output_dir, some_key):
    events = os.listdir(os.path.join(output_dir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert some_key in metrics.read_metrics(output_dir)[-1]


def test_clip_run(runs, tmp_path):
    options = evaluation.EvaluationOptions(num_samples=24, batch_size=16)
    result = evaluation.evaluate_checkpoint(runs["clip"], str(tmp_path), options)
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f) == result
    assert result["family"] == "clip" and result["checkpoint_step"] == 2
    assert set(result["splits"]) == {"test", "test_unseen"}
    for entry in result["splits"].values():
        assert entry["num_examples"] == 24
        assert set(entry["zero_shot"]) == {*evaluation.ATTRIBUTES, "mean"}
        assert set(entry["retrieval"]) == {
            f"{d}_recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)
        }
        for value in [*entry["zero_shot"].values(), *entry["retrieval"].values()]:
            assert 0.0 <= value <= 1.0
        assert 0.0 <= entry["clip_score"] <= 100.0
    _check_page(str(tmp_path), ["plots/zero_shot.png"])
    _check_tensorboard(str(tmp_path), "test/zero_shot/shape")

    # The retrieval numbers are contrastive.retrieval_metrics of the same embeddings.
    from diffusion.contrastive import retrieval_metrics

    encoder = evaluation.ClipEncoder.load(runs["clip"])
    from diffusion.rundir import load_run_config

    run_config = load_run_config(runs["clip"])
    examples = evaluation.load_split_examples(run_config.data, run_config.seed, "test", 24)
    expected = retrieval_metrics(
        encoder.encode_images(examples.images),
        encoder.encode_texts(examples.captions),
        (1, 5, 10),
        captions=examples.captions,
    )
    for key, value in expected.items():
        assert result["splits"]["test"]["retrieval"][key] == pytest.approx(float(value))
    # Shapes has several ClassLabels and no label_key: its zero-shot is the attributes'.
    assert "zero_shot_classes" not in result["splits"]["test"]


def test_clip_run_on_a_labelled_dataset(runs, tmp_path):
    """The same CLIP evaluated on shapes read as a labelled dataset (label_key="shape", captions
    "a photo of a {label}"): zero-shot top-1/5 over the class names, and retrieval that counts an
    identical caption as a hit; truths in NumPy on the same embeddings."""
    import shutil

    from diffusion.rundir import CONFIG_FILE, load_run_config

    run_dir = str(tmp_path / "labelled")
    shutil.copytree(runs["clip"], run_dir)
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        record = json.load(f)
    record["data"]["label_key"] = "shape"
    with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
        json.dump(record, f)
    config = load_run_config(run_dir)
    options = evaluation.EvaluationOptions(num_samples=24, batch_size=16, splits=("test",))
    output_dir = str(tmp_path / "evaluation")
    entry = evaluation.evaluate_checkpoint(run_dir, output_dir, options)["splits"]["test"]
    _check_tensorboard(output_dir, "test/zero_shot_classes/top1")
    with open(os.path.join(output_dir, "index.html"), encoding="utf-8") as f:
        assert "Zero-shot classification over the class names" in f.read()
    zero_shot = entry["zero_shot_classes"]
    assert zero_shot["num_classes"] == 5 and zero_shot["features"] == ["shape"]
    assert zero_shot["template"] == "a photo of a {label}"
    assert zero_shot["top5"] == 1.0  # five classes: the true one is always among the top five

    examples = evaluation.load_split_examples(config.data, config.seed, "test", 24)
    names = examples.classes.values[0]
    assert examples.captions == [f"a photo of a {names[c]}" for c in examples.class_ids]
    encoder = evaluation.ClipEncoder.load(run_dir)
    images = encoder.encode_images(examples.images)
    classes = encoder.encode_texts([f"a photo of a {n}" for n in names])
    cosine = images @ classes.T
    assert zero_shot["top1"] == pytest.approx(np.mean(cosine.argmax(1) == examples.class_ids))
    # Retrieval: a hit when the top caption (image) has the partner's caption.
    similarity = images @ encoder.encode_texts(examples.captions).T
    captions = np.array(examples.captions)
    for direction, axis in (("image_to_text", 1), ("text_to_image", 0)):
        truth = np.mean(captions[similarity.argmax(axis)] == captions)
        assert entry["retrieval"][f"{direction}_recall@1"] == pytest.approx(truth)


def _untrained_autoencoder_run(path: str) -> str:
    """An autoencoder run directory (model.json, params/) with initial weights: its encoder is
    as good a feature space as any for checking the wiring."""
    config = autoencoder_config("tiny", block_out_channels=(8, 16), norm_num_groups=4)
    rundir.save_model_config(path, "autoencoder", config)
    state = nnx.state(Autoencoder(config, rngs=nnx.Rngs(0)))
    param_export.export_params(os.path.join(path, rundir.PARAMS_DIR), state)
    return path


def test_dit_run(runs, tmp_path):
    autoencoder = _untrained_autoencoder_run(str(tmp_path / "autoencoder"))
    options = evaluation.EvaluationOptions(
        num_samples=8,
        guidance_scales=(2.0,),
        samplers=(("euler", 2),),
        batch_size=8,
        grid_size=8,
        diversity_captions=2,
        diversity_samples=3,
        feature_autoencoder=autoencoder,
    )
    output = tmp_path / "eval"
    result = evaluation.evaluate_checkpoint(runs["dit"], str(output), options)
    with open(output / "metrics.json") as f:
        assert json.load(f) == result
    assert result["family"] == "dit" and result["checkpoint_step"] == 2
    assert result["feature_autoencoder"] == os.path.abspath(autoencoder)
    assert result["resolution"] == 16 and result["objective"] == "flow"
    assert result["clip_checkpoint"] == os.path.abspath(runs["clip"])
    assert result["samplers"] == ["euler:2"] and result["guidance_scales"] == [2.0]
    accuracy_keys = {*evaluation.ATTRIBUTES, "all"}
    grids = []
    for entry in result["splits"].values():
        assert entry["num_samples"] == 8
        # The oracle reads the real images of the split right: the score's own sanity check.
        assert entry["real"]["oracle_accuracy"] == {k: 1.0 for k in accuracy_keys}
        sample = entry["samples"]["euler:2"]["2"]
        assert set(sample) == {
            "accuracy",
            "misreads",
            "clip_score",
            "frechet_distance",
            "autoencoder_frechet_distance",
            "open_attributes",
            "seconds",
            "grid",
            "diversity",
        }
        assert set(sample["accuracy"]) == accuracy_keys
        assert all(0.0 <= v <= 1.0 for v in sample["accuracy"].values())
        # Each misread sample is counted once, under its attribute: the accuracy's complement.
        for attribute, counts in sample["misreads"].items():
            wrong = round((1 - sample["accuracy"][attribute]) * entry["num_samples"])
            assert sum(counts.values()) == wrong, attribute
        for key in ("frechet_distance", "autoencoder_frechet_distance"):
            assert np.isfinite(sample[key]) and sample[key] >= 0, key
        open_ = sample["open_attributes"]
        assert {"position_spread_ratio", "size_spread_ratio"} <= set(open_)
        if "background" in open_:  # captions that name no background among the 8
            assert 0.0 <= open_["background"]["total_variation"] <= 1.0
            assert 1 <= open_["background"]["num_captions"] <= 8
        assert entry["best"]["sampler"] == "euler:2" and entry["best"]["guidance_scale"] == 2.0
        assert entry["best"]["open_attributes"] == open_
        diversity = entry["diversity"]
        assert diversity["num_captions"] == 2 and diversity["samples_per_caption"] == 3
        assert diversity["sampler"] == "euler:2" and diversity["guidance_scale"] == 2.0
        assert diversity["ratio"] >= 0 and 0 <= diversity["fraction_at_target"] <= 1
        assert diversity["ratio_min"] <= diversity["ratio"]
        # Each setting holds its own diversity; the best's (here the only one) is the split's.
        assert sample["diversity"] == diversity
        grids += [sample["grid"], diversity["samples_grid"], diversity["real_grid"]]
    negative = result["negative_prompt"]
    assert negative["prompt"] == "a large circle in the center"
    assert negative["negative_prompt"] == "red" and negative["guidance_scale"] == 2.0
    for way in ("without_negative", "with_negative"):
        histogram = negative[way]["color_histogram"]
        assert sum(histogram.values()) == pytest.approx(1.0)
        assert negative[way]["color_fraction"] == histogram["red"]
    plots = [f"plots/{n}.png" for n in ("accuracy_vs_guidance", "accuracy_vs_steps")]
    _check_page(str(output), [*grids, *plots, "grids/negative_with.png"])
    _check_tensorboard(str(output), "test/samples/euler:2/2/accuracy/all")
    _check_tensorboard(str(output), "test/diversity/ratio")


def test_library_errors_name_the_fix(runs, tmp_path):
    options = evaluation.EvaluationOptions(num_samples=4)
    with pytest.raises(UserError, match="does not exist"):
        evaluation.evaluate_checkpoint(str(tmp_path / "missing"), str(tmp_path / "o"), options)
    with pytest.raises(UserError, match="no model.json"):
        evaluation.evaluate_checkpoint(str(tmp_path), str(tmp_path / "o"), options)
    bad = evaluation.EvaluationOptions(num_samples=4, samplers=(("ddpm", 10),))
    with pytest.raises(UserError, match="ddpm.*does not apply to a flow"):
        evaluation.evaluate_checkpoint(runs["dit"], str(tmp_path / "o"), bad)
    bad = evaluation.EvaluationOptions(num_samples=4, negative_color="teal")
    with pytest.raises(UserError, match="teal.*red"):
        evaluation.evaluate_checkpoint(runs["dit"], str(tmp_path / "o"), bad)
    bad = evaluation.EvaluationOptions(num_samples=4, feature_autoencoder=runs["clip"])
    with pytest.raises(UserError, match="--feature_autoencoder=.*clip model, not of an autoenc"):
        evaluation.evaluate_checkpoint(runs["dit"], str(tmp_path / "o"), bad)
    bad = evaluation.EvaluationOptions(num_samples=4, diversity_samples=1)
    with pytest.raises(UserError, match="--diversity_samples must be >= 2"):
        evaluation.evaluate_checkpoint(runs["dit"], str(tmp_path / "o"), bad)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--checkpoint=/nonexistent/run"], "does not exist"),
        (["--checkpoint=.", "--samplers=foo:20"], "unknown sampler 'foo'"),
        (["--checkpoint=.", "--guidance_scales=1,x"], "'x' is not a finite number"),
        (["--checkpoint=.", "--diversity_samples=1"], "--diversity_samples must be >= 2"),
    ],
)
def test_entry_point_exits_2_without_traceback(arguments, message, tmp_path):
    process = subprocess.run(
        [sys.executable, "evaluate.py", *arguments, f"--output_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2, process.stderr
    assert message in process.stderr and "Traceback" not in process.stderr
