"""sample.py and the batch sampling behind it: prompt files, outputs, resume after a kill, errors.

Truths: every PNG holds exactly what `TextToImage.generate` returns for its manifest record
(prompt, negative prompt, seed, settings); an interrupted run, rerun, ends with the files and
manifest of an uninterrupted one, byte for byte; user mistakes exit with status 2 and one
message, no traceback.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import single_device_env
from PIL import Image
from test_text2image import train_tiny_runs

from diffusion import inference, meshes
from diffusion.errors import UserError
from diffusion.inference import grids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS_TXT = "a red circle\n\na blue square in the top left corner\n  a green star  \n"
PROMPTS_JSONL = (
    '{"prompt": "a red circle", "seed": 40}\n'
    '{"prompt": "a blue square", "negative_prompt": "blue", "guidance_scale": 5.5}\n'
    "\n"
    '{"prompt": "a green star", "negative_prompt": null, "seed": 7, "guidance_scale": 1}\n'
)
SETTINGS = dict(sampler="euler", steps=3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_runs(tmp_path_factory.mktemp("runs"), copies=False)["dit"]


@pytest.fixture(scope="module")
def pipeline(run_dir):
    return inference.TextToImage.from_run(run_dir)


def write(path, text):
    path.write_text(text)
    return str(path)


def read_png(path):
    return np.asarray(Image.open(path))


def manifest_lines(output_dir):
    with open(os.path.join(output_dir, "manifest.jsonl")) as f:
        return f.read().splitlines()


def directory_bytes(output_dir):
    result = {}
    for name in sorted(os.listdir(output_dir)):
        with open(os.path.join(output_dir, name), "rb") as f:
            result[name] = f.read()
    return result


def test_text_file_gives_named_pngs_manifest_and_grid(pipeline, tmp_path):
    prompts = write(tmp_path / "prompts.txt", PROMPTS_TXT)
    items = inference.read_prompt_file(prompts, seed=10, num_per_prompt=2)
    out = str(tmp_path / "out")
    result = inference.sample_to_directory(pipeline, items, out, batch_size=3, **SETTINGS)
    assert result == {"generated": 6, "skipped": 0}
    pngs = [f"{line:05d}_{k:03d}.png" for line in (1, 3, 4) for k in (0, 1)]
    assert sorted(os.listdir(out)) == sorted(pngs + ["grid.png", "manifest.jsonl"])
    records = [json.loads(line) for line in manifest_lines(out)]
    assert [r["file"] for r in records] == pngs
    expected_prompts = ["a red circle", "a blue square in the top left corner", "a green star"]
    for record in records:
        assert record["prompt"] == expected_prompts[(1, 3, 4).index(record["line"])]
        assert record["seed"] == 10 + record["index"]
        assert record["negative_prompt"] == ""
        assert (record["sampler"], record["steps"], record["guidance_scale"]) == ("euler", 3, 3.0)
        assert (record["eta"], record["shift"], record["guidance_rescale"]) == (0.0, 1.0, 0.0)
        assert record["checkpoint_step"] == 1 and record["checkpoint"] == pipeline.run_dir
    images = pipeline.generate(
        [r["prompt"] for r in records], seeds=[r["seed"] for r in records], **SETTINGS
    )
    for record, image in zip(records, images, strict=True):
        np.testing.assert_array_equal(read_png(os.path.join(out, record["file"])), image)
    # A row per prompt, its label on the left, a column per seed; 16-pixel images shown 4x
    # with 4-pixel gaps.
    grid = read_png(os.path.join(out, "grid.png"))
    cell, label_width = 4 * 16 + grids.GAP, 360
    assert grid.shape == (3 * cell, label_width + 2 * cell, 3)
    for index, image in enumerate(images):
        row, column = divmod(index, 2)
        top, left = row * cell, label_width + column * cell
        shown = grid[top : top + 64, left : left + 64]
        np.testing.assert_array_equal(shown, image.repeat(4, 0).repeat(4, 1))
        assert (grid[top + 64 : top + cell, left : left + cell] == grids.PAGE_COLOR).all()  # gap
    labels = [grid[r * cell : r * cell + 64, :label_width] for r in range(3)]
    assert all((label < 100).any() for label in labels)  # text drawn on every row
    assert not np.array_equal(labels[0], labels[1])  # each row its own prompt


def test_jsonl_fields_override_the_defaults(pipeline, tmp_path):
    prompts = write(tmp_path / "prompts.jsonl", PROMPTS_JSONL)
    items = inference.read_prompt_file(prompts, negative_prompt="red", seed=3, guidance_scale=2.0)
    assert [(i.line, i.prompt, i.negative_prompt, i.seed, i.guidance_scale) for i in items] == [
        (1, "a red circle", "red", 40, 2.0),
        (2, "a blue square", "blue", 3, 5.5),
        (4, "a green star", "red", 7, 1.0),
    ]
    out = str(tmp_path / "out")
    inference.sample_to_directory(pipeline, items, out, **SETTINGS)
    for item in items:
        expected = pipeline.generate(
            [item.prompt], [item.negative_prompt], [item.seed],
            guidance_scale=item.guidance_scale, **SETTINGS,
        )[0]  # fmt: skip
        np.testing.assert_array_equal(read_png(os.path.join(out, item.file)), expected)


def test_stop_ends_the_job_after_the_batch_in_flight_and_a_rerun_finishes_it(run_dir, tmp_path):
    """A pipeline's SIGTERM (`stop`): the batches made so far are kept and listed, no grid."""
    one_device = meshes.make_mesh({"data": 1}, jax.devices()[:1])
    pipe = inference.TextToImage.from_run(run_dir, mesh=one_device, micro_batch=1)
    items = inference.read_prompt_file(write(tmp_path / "p.txt", PROMPTS_TXT), num_per_prompt=3)
    out = str(tmp_path / "out")
    asked = []
    stop = lambda: asked.append(True) or True  # noqa: E731 - stop at the first question
    result = inference.sample_to_directory(pipe, items, out, batch_size=4, stop=stop, **SETTINGS)
    assert result == {"generated": 4, "skipped": 0, "stopped": True} and len(asked) == 1
    assert len(manifest_lines(out)) == 4 and not os.path.exists(os.path.join(out, "grid.png"))
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == sorted(
        item.file for item in items[:4]
    )
    result = inference.sample_to_directory(pipe, items, out, batch_size=4, **SETTINGS)
    assert result == {"generated": 5, "skipped": 4}
    assert len(manifest_lines(out)) == 9 and os.path.exists(os.path.join(out, "grid.png"))


def test_interrupted_run_resumes_to_the_uninterrupted_result(pipeline, tmp_path):
    prompts = write(tmp_path / "prompts.txt", PROMPTS_TXT)
    items = inference.read_prompt_file(prompts, num_per_prompt=3)
    whole = str(tmp_path / "whole")
    inference.sample_to_directory(pipeline, items, whole, batch_size=4, **SETTINGS)
    # The interrupted run finished the first prompt, then died: a PNG renamed into place before
    # the manifest listed it, and a temporary file of the next one.
    resumed = str(tmp_path / "resumed")
    inference.sample_to_directory(pipeline, items[:3], resumed, batch_size=4, **SETTINGS)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(resumed, items[3].file))
    with open(os.path.join(resumed, f".{items[4].file}.tmp-12345"), "wb") as f:
        f.write(b"\x89PNG half")
    result = inference.sample_to_directory(pipeline, items, resumed, batch_size=4, **SETTINGS)
    assert result == {"generated": 6, "skipped": 3}
    assert directory_bytes(resumed) == directory_bytes(whole)
    lines = manifest_lines(resumed)
    assert len(lines) == len(set(lines)) == len(items)
    again = inference.sample_to_directory(pipeline, items, resumed, batch_size=4, **SETTINGS)
    assert again == {"generated": 0, "skipped": 9}
    assert directory_bytes(resumed) == directory_bytes(whole)


def test_other_settings_replace_the_records_without_duplicates(pipeline, tmp_path):
    prompts = write(tmp_path / "prompts.txt", PROMPTS_TXT)
    items = inference.read_prompt_file(prompts)
    out = str(tmp_path / "out")
    inference.sample_to_directory(pipeline, items, out, sampler="euler", steps=3)
    result = inference.sample_to_directory(pipeline, items, out, sampler="heun", steps=3)
    assert result == {"generated": 3, "skipped": 0}
    records = [json.loads(line) for line in manifest_lines(out)]
    assert [r["sampler"] for r in records] == ["heun"] * 3
    heun = pipeline.generate([items[0].prompt], seeds=[0], sampler="heun", steps=3)[0]
    np.testing.assert_array_equal(read_png(os.path.join(out, items[0].file)), heun)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "a"}\n{"prompt": "b",\n', r"prompts.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}\n\n["a list"]\n', r"prompts.jsonl:3: expected a JSON object"),
        ('{"promt": "a"}\n', r"prompts.jsonl:1: unknown fields \['promt'\]"),
        ('{"prompt": "a", "seed": -2}\n', r"prompts.jsonl:1: 'seed' must be an integer"),
        ('{"prompt": "a", "guidance_scale": "x"}\n', r"prompts.jsonl:1: 'guidance_scale' must"),
        ("\n\n", r"has no prompts"),
    ],
)
def test_malformed_prompt_files_name_the_line(tmp_path, text, message):
    path = write(tmp_path / "prompts.jsonl", text)
    with pytest.raises(UserError, match=message):
        inference.read_prompt_file(path)


def run_sample_py(*args, **popen):
    command = [sys.executable, os.path.join(REPO, "sample.py"), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, **popen)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed", r"prompts.jsonl:2: not valid JSON"),
        ("sampler", r"unknown sampler 'plms'; valid samplers: ddim, ddpm, dpmpp_2m, euler"),
        ("steps", r"steps must be an integer >= 1, got 0"),
        ("checkpoint", r"does not exist; pass a DiT run directory"),
    ],
)
def test_user_errors_exit_2_with_one_message(run_dir, tmp_path, case, message):
    good = write(tmp_path / "good.txt", "a red circle\n")
    bad = write(tmp_path / "prompts.jsonl", '{"prompt": "a"}\n{"prompt": \n')
    args = {
        "malformed": [f"--checkpoint={run_dir}", f"--prompts={bad}"],
        "sampler": [f"--checkpoint={run_dir}", f"--prompts={good}", "--sampler=plms"],
        "steps": [f"--checkpoint={run_dir}", f"--prompts={good}", "--steps=0"],
        "checkpoint": [f"--checkpoint={tmp_path / 'nowhere'}", f"--prompts={good}"],
    }[case]
    result = run_sample_py(*args, f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr.replace("\n", " ")), result.stderr
    assert result.stderr.count("sample.py: error:") == 1


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(run_dir, pipeline, tmp_path):
    prompts = write(tmp_path / "prompts.txt", "".join(f"shape number {i}\n" for i in range(20)))
    killed = tmp_path / "killed"
    # 20 prompts x 4 = 80 images in batches of 32 (8 devices x micro-batch 4): three batches.
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "sample.py"), f"--checkpoint={run_dir}",
         f"--prompts={prompts}", f"--output_dir={killed}", "--num_per_prompt=4", "--steps=3"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if killed.is_dir() and any(n.endswith(".png") for n in os.listdir(killed)):
            break
        time.sleep(0.02)
    assert process.poll() is None, "sample.py ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    # Killed for real: unfinished, yet every PNG in place is whole (temporaries are dotted).
    assert len(inference.batch_io.read_manifest(str(killed))) < 80
    assert not os.path.exists(killed / "grid.png")
    for name in os.listdir(killed):
        if name.endswith(".png") and not name.startswith("."):
            Image.open(killed / name).verify()
    items = inference.read_prompt_file(prompts, num_per_prompt=4)
    whole = str(tmp_path / "whole")
    inference.sample_to_directory(pipeline, items, whole, steps=3)
    inference.sample_to_directory(pipeline, items, str(killed), steps=3)
    assert directory_bytes(str(killed)) == directory_bytes(whole)
    lines = manifest_lines(str(killed))
    assert len(lines) == len(set(lines)) == 80


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_then_a_rerun_equal_an_uninterrupted_run(
    run_dir, pipeline, tmp_path
):
    """Kills land anywhere: start-up, sampling, PNG or manifest writes (seeded delays scaled by
    the measured time to the first image); the finished directory is byte for byte the
    uninterrupted one and the manifest has each image once.

    The sample.py processes run on one device with a compilation cache that the first one
    fills (a restart loads the program instead of compiling it); the uninterrupted directory is
    written in this process on 8 devices, so equal bytes also show device-count independence."""
    prompts = write(tmp_path / "prompts.txt", "".join(f"shape number {i}\n" for i in range(12)))
    out = tmp_path / "killed"
    command = [
        sys.executable, os.path.join(REPO, "sample.py"), f"--checkpoint={run_dir}",
        f"--prompts={prompts}", f"--output_dir={out}", "--num_per_prompt=4", "--steps=3",
        "--batch_size=8",
    ]  # fmt: skip
    env = single_device_env(compilation_cache=tmp_path / "xla_cache")
    spawn = lambda: subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    has_image = lambda: out.is_dir() and any(n.endswith(".png") for n in os.listdir(out))
    started, process = time.time(), spawn()  # measure the time to the first image
    while process.poll() is None and not has_image():
        time.sleep(0.02)
    first_image = time.time() - started
    rng = np.random.default_rng(0)
    kills = 0
    while kills < 10:
        if process.poll() is not None:  # finished before the kill: start another run
            process = spawn()
            time.sleep(rng.uniform(0.0, first_image + 1.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        process = spawn()
        time.sleep(rng.uniform(0.0, first_image + 1.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = run_sample_py(*command[2:], env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    whole = str(tmp_path / "whole")
    items = inference.read_prompt_file(prompts, num_per_prompt=4)
    inference.sample_to_directory(pipeline, items, whole, steps=3, batch_size=8)
    assert directory_bytes(str(out)) == directory_bytes(whole)
    lines = manifest_lines(str(out))
    assert len(lines) == len(set(lines)) == 48
