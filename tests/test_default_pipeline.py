"""The default job (`make train`, configs/shapes.py) end to end, shrunk to seconds: every stage
writes what it promises, the summary names the files, and a rerun redoes nothing.

Truths: the files exist and parse; the prompt grid's rows are exactly the saved PNGs; a rerun
leaves metrics.json untouched and generates no image.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffusion import config as config_lib
from diffusion import report, stages, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_default(data_dir):
    config = config_lib.load_config(os.path.join(REPO, "configs", "shapes.py"))
    config.data.update(
        data_dir=data_dir, builder_config="16", num_train_examples=256, num_eval_examples=16
    )
    config.tokenizer.vocab_size = 300
    for stage in (config.clip, config.dit):
        stage.training.update(
            global_batch_size=8, num_steps=2, log_every=1, checkpoint_every=100, ema_decay=0.9
        )
        stage.optimizer.warmup_steps = 1
    config.evaluate.update(num_samples=8, guidance_scales=(1.0, 3.0), batch_size=8)
    config.samples.update(num_per_prompt=2, steps=3, batch_size=8)
    return config


def test_default_pipeline_runs_every_stage_and_a_rerun_redoes_nothing(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    config = tiny_default(str(tmp_path / "data"))
    trainer.train_and_evaluate(config, workdir)  # on all 8 test devices, data parallel
    out = capsys.readouterr().out
    for stage in ("clip", "dit", "evaluate", "samples"):
        assert f"== stage {stage}" in out
    prompts_png = os.path.join(workdir, "samples", "prompts.png")
    for path in (
        prompts_png,
        os.path.join(workdir, "eval", "dit", "index.html"),
        os.path.join(workdir, "eval", "clip", "metrics.json"),
    ):
        assert path in out  # the summary says where everything is
        assert os.path.isfile(path)
    dit_metrics = os.path.join(workdir, "eval", "dit", "metrics.json")
    with open(dit_metrics) as f:
        metrics = json.load(f)
    assert metrics["checkpoint_step"] == 2
    assert set(metrics["splits"]) == {"test", "test_unseen"}
    assert "negative_prompt" in metrics
    rows = len(config.samples.prompts) + len(config.samples.negative_examples)
    with open(os.path.join(workdir, "samples", "manifest.jsonl")) as f:
        manifest = [json.loads(line) for line in f]
    assert len(manifest) == rows * 2
    best = metrics["splits"]["test"]["best"]["guidance_scale"]
    negative = metrics["negative_prompt"]["guidance_scale"] if best <= 1 else best
    assert {r["guidance_scale"] for r in manifest if not r["negative_prompt"]} == {best}
    assert {r["guidance_scale"] for r in manifest if r["negative_prompt"]} == {negative}
    assert {r["negative_prompt"] for r in manifest} == {"", "red", "blue"}

    written = os.path.getmtime(dit_metrics)
    trainer.train_and_evaluate(tiny_default(str(tmp_path / "data")), workdir)
    out = capsys.readouterr().out
    assert "is up to date" in out
    assert os.path.getmtime(dit_metrics) == written
    with open(os.path.join(workdir, "samples", "manifest.jsonl")) as f:
        assert [json.loads(line) for line in f] == manifest


def test_labelled_rows_show_each_row_of_images_in_order(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"prompt {r}", rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)) for r in range(2)]
    path = report.save_labelled_rows(rows, str(tmp_path / "g.png"), tile=32, label_width=100)
    canvas = np.asarray(Image.open(path))
    assert canvas.shape == (2 * 36, 100 + 3 * 36, 3)
    for r, (_, images) in enumerate(rows):
        for c, image in enumerate(images):
            top, left = r * 36, 100 + c * 36
            shown = canvas[top : top + 32, left : left + 32]
            np.testing.assert_array_equal(shown, image.repeat(2, 0).repeat(2, 1))


def test_sample_items_cover_prompts_and_negative_examples_with_stable_lines():
    config = config_lib.load_config(os.path.join(REPO, "configs", "shapes.py"))
    items = stages.sample_items(config.samples, guidance_scale=4.0)
    per = config.samples.num_per_prompt
    assert len(items) == per * (len(config.samples.prompts) + len(config.samples.negative_examples))
    assert len({i.file for i in items}) == len(items)
    negatives = [i for i in items if i.negative_prompt]
    assert {(i.prompt, i.negative_prompt) for i in negatives} == set(
        config.samples.negative_examples
    )
    assert {i.seed for i in items} == set(range(per))
    assert {i.guidance_scale for i in items} == {4.0}


@pytest.mark.parametrize(
    "best, checked, expected",
    [
        (1.0, 3.0, (1.0, 3.0)),
        (1.0, None, (1.0, 3.0)),
        (3.0, 6.0, (3.0, 3.0)),
        (None, None, (3.0, 3.0)),
    ],
)
def test_negative_examples_of_the_grid_are_guided_where_the_best_scale_is_one(
    tmp_path, best, checked, expected
):
    """At scale 1 the unconditional branch, where the negative prompt sits, cancels out of
    uncond + w (cond - uncond), so the grid's negative rows would equal the plain prompt's:
    they take the scale of the evaluation's negative-prompt check, or else the configured
    one (3). Above 1 the grid's scale serves both; no evaluation: the configured scale."""
    config = config_lib.load_config(os.path.join(REPO, "configs", "shapes.py"))
    if best is not None:
        os.makedirs(tmp_path / "eval" / "dit")
        metrics = {"splits": {"test": {"best": {"guidance_scale": best}}}}
        if checked is not None:
            metrics["negative_prompt"] = {"guidance_scale": checked}
        (tmp_path / "eval" / "dit" / "metrics.json").write_text(json.dumps(metrics))
    assert stages.grid_guidance_scales(config, str(tmp_path)) == expected
    items = stages.sample_items(config.samples, *expected)
    assert {i.guidance_scale for i in items if i.negative_prompt} == {expected[1]}
    assert {i.guidance_scale for i in items if not i.negative_prompt} == {expected[0]}
