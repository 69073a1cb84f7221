"""Faults during training: preemption (SIGTERM) and non-finite losses, injected for real."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_trainer import run, tiny

from diffusion import checkpoints, errors, metrics
from diffusion import data as data_lib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _poison_batch(monkeypatch, at_step: int):
    """Makes the images of the `at_step`-th batch (1-based) NaN: a fault from the data."""
    calls = {"n": 0}
    original = data_lib.to_global_batch

    def poisoned(batch, mesh):
        calls["n"] += 1
        if calls["n"] == at_step:
            batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        return original(batch, mesh)

    monkeypatch.setattr(data_lib, "to_global_batch", poisoned)


def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    _poison_batch(monkeypatch, at_step=3)
    config = tiny("clip", data_dir, steps=6, checkpoint_every=2)
    with pytest.raises(errors.NonFiniteError) as error:
        run(config, tmp_path)
    message = str(error.value)
    assert "step 3" in message
    assert os.path.join("checkpoints", "2") in message
    manager = checkpoints.make_checkpoint_manager(tmp_path / "checkpoints")
    assert manager.latest_step() == 2  # the poisoned state was never saved
    manager.close()


def test_skip_policy_drops_the_bad_update_and_carries_on(data_dir, tmp_path, monkeypatch):
    _poison_batch(monkeypatch, at_step=3)
    config = tiny("clip", data_dir, steps=5, nan_policy="skip")
    run(config, tmp_path)
    records = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["loss"] is None  # logged as not finite
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    assert all(np.isfinite(r["param_norm"]) for r in records)
    # The skipped update left the parameters exactly as they were after step 2.
    assert records[2]["param_norm"] == records[1]["param_norm"]


def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_resumes(data_dir, tmp_path):
    workdir = tmp_path / "run"
    args = [
        sys.executable,
        "train.py",
        "--config=configs/base_clip.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.builder_config=16",
        "--config.data.num_train_examples=256",
        "--config.data.num_eval_examples=64",
        "--config.tokenizer.vocab_size=300",
        "--config.tokenizer.context_length=16",
        "--config.training.global_batch_size=16",
        "--config.training.log_every=1",
        "--config.training.checkpoint_every=1000",
        "--config.optimizer.warmup_steps=2",
        "--config.model.vision_depth=1",  # one block per tower, as conftest.one_block
        "--config.model.text_depth=1",
    ]
    process = subprocess.Popen([*args, "--config.training.num_steps=100000"], cwd=_ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and not _logged_steps(workdir):
        assert process.poll() is None, "the trainer ended before it was signalled"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    manager = checkpoints.make_checkpoint_manager(workdir / "checkpoints")
    saved = manager.latest_step()
    manager.close()
    assert saved is not None and saved >= 1
    # Saved at the step it stopped: the last logged step (within the step in flight).
    assert saved - max(_logged_steps(workdir)) in (0, 1)
    result = subprocess.run(
        [*args, f"--config.training.num_steps={saved + 2}"],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout
    assert max(_logged_steps(workdir)) == saved + 2


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [r["step"] for r in metrics.read_metrics(str(workdir))]
