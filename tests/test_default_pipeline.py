"""The default job (`make train`, configs/shapes.py) end to end, shrunk to seconds: every stage
writes what it promises, the summary names the files, and a rerun redoes nothing.

Truths: the files exist and parse; the prompt grid's rows are exactly the saved PNGs; a rerun
leaves metrics.json untouched and generates no image.
"""

import json
import os

import numpy as np
import pytest
from conftest import one_block
from PIL import Image

from diffusion import config as config_lib
from diffusion import pipeline
from diffusion.inference import grids
from diffusion.pipeline import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_default(data_dir):
    config = config_lib.load_config(os.path.join(REPO, "configs", "shapes.py"))
    config.data.update(
        data_dir=data_dir, builder_config="16", num_train_examples=256, num_eval_examples=16
    )
    config.tokenizer.vocab_size = 300
    for stage in (config.clip, config.dit):
        one_block(stage)
        stage.training.update(
            global_batch_size=8, num_steps=2, log_every=1, checkpoint_every=100, ema_decay=0.9
        )
        stage.optimizer.warmup_steps = 1
    config.evaluate.update(
        num_samples=8,
        guidance_scales=(1.0, 3.0),
        batch_size=8,
        diversity_captions=2,
        diversity_samples=2,
    )
    config.samples.update(num_per_prompt=2, steps=3, batch_size=8)
    return config


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The tiny default pipeline, run once without interruption: (workdir, data_dir, stdout)."""
    root = tmp_path_factory.mktemp("default")
    workdir, data_dir = str(root / "run"), str(root / "data")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pipeline.train_and_evaluate(tiny_default(data_dir), workdir)  # all 8 devices
    return workdir, data_dir, out.getvalue()


def test_default_pipeline_runs_every_stage_and_a_rerun_redoes_nothing(default_run, capsys):
    workdir, data_dir, out = default_run
    config = tiny_default(data_dir)
    for stage in ("clip", "dit", "evaluate", "samples"):
        assert f"== stage {stage}" in out
    prompts_png = os.path.join(workdir, "samples", "grid.png")
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
    pipeline.train_and_evaluate(tiny_default(data_dir), workdir)
    out = capsys.readouterr().out
    assert "is up to date" in out
    assert os.path.getmtime(dit_metrics) == written
    with open(os.path.join(workdir, "samples", "manifest.jsonl")) as f:
        assert [json.loads(line) for line in f] == manifest


def _without_timings(tree):
    """metrics.json without its wall-clock times and run paths (they differ between any two
    runs in two directories)."""
    if isinstance(tree, dict):
        skip = ("seconds", "checkpoint", "clip_checkpoint")
        return {k: _without_timings(v) for k, v in tree.items() if k not in skip}
    return tree


def test_sigterm_in_each_stage_stops_the_pipeline_there_and_reruns_finish_it_equal(
    default_run, tmp_path, monkeypatch, capsys
):
    """A SIGTERM during any stage (here: as the stage starts) saves that stage, returns normally
    (train.py exits 0) and starts no later stage; each rerun goes one stage further, and the
    last one ends with the uninterrupted run's parameters, metrics and images."""
    import signal

    from diffusion.pipeline import runner

    reference, data_dir, _ = default_run
    workdir = str(tmp_path / "run")
    order = ("clip", "dit", "evaluate", "samples")
    run_stage = runner._run_stage
    for index, stage in enumerate(order):

        def signalled(config, workdir_, name, preemption, stage=stage):
            if name == stage:
                os.kill(os.getpid(), signal.SIGTERM)  # the guard turns it into a stop request
            return run_stage(config, workdir_, name, preemption)

        monkeypatch.setattr(runner, "_run_stage", signalled)
        results = pipeline.train_and_evaluate(tiny_default(data_dir), workdir)
        assert list(results)[-1] == stage  # ran up to the signalled stage, then stopped
        assert f"preempted during stage {stage}" in capsys.readouterr().out
        for later in order[index + 1 :]:
            assert not os.path.exists(os.path.join(workdir, stages_dir(later)))
        if stage in ("clip", "dit"):  # saved where it stopped: after its first step of two
            assert _checkpoint_steps(os.path.join(workdir, stage)) == [1]
        if stage == "evaluate":  # stopped before its first evaluation: no metrics, none torn
            assert not os.path.exists(os.path.join(workdir, "eval", "clip", "metrics.json"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard restored the handler
    monkeypatch.setattr(runner, "_run_stage", run_stage)
    pipeline.train_and_evaluate(tiny_default(data_dir), workdir)  # the last stage's rerun
    for run in ("clip", "dit"):
        a, b = (_exported(os.path.join(root, run)) for root in (reference, workdir))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for run in ("clip", "dit"):
        paths = [os.path.join(root, "eval", run, "metrics.json") for root in (reference, workdir)]
        expected, got = (_without_timings(json.load(open(p))) for p in paths)
        assert got == expected
    for name in sorted(os.listdir(os.path.join(reference, "samples"))):
        if name.endswith(".png"):
            paths = [os.path.join(root, "samples", name) for root in (reference, workdir)]
            np.testing.assert_array_equal(*(np.asarray(Image.open(p)) for p in paths))


def stages_dir(stage: str) -> str:
    return runner_directories().get(stage, stage)


def runner_directories() -> dict:
    from diffusion.pipeline import runner

    return runner.STAGE_DIRECTORIES


def _checkpoint_steps(run_dir: str) -> list[int]:
    directory = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _exported(run_dir: str) -> dict:
    """A run's exported parameters as {path: array}."""
    from flax import nnx

    from diffusion import models, rundir

    family, model_config = rundir.load_model_config(run_dir)
    model_class = models.CLIP if family == "clip" else models.DiT
    state = nnx.state(rundir.load_run_params(run_dir, model_config, model_class))
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_labelled_rows_show_each_row_of_images_in_order(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"prompt {r}", rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)) for r in range(2)]
    path = grids.save_labelled_rows(rows, str(tmp_path / "g.png"), tile=32, label_width=100)
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
