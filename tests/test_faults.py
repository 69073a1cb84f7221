"""Faults injected for real into train.py processes: SIGKILL at random moments (during start-up,
training steps and checkpoint writes), a damaged latest checkpoint, a lost peer process of a
2-process run, and a preemption notice (SIGTERM) sent to one process of two.

Truths: training is deterministic on CPU, so a run that was killed and restarted any number of
times must equal the uninterrupted run bitwise (every step's loss, the final parameters); a
2-process run that stops must stop at one step on both processes; a process that loses its peer
must say so and exit, not wait forever. Every run is a real `python train.py` subprocess.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import single_device_env
from test_trainer import _load_params

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TMP_MARK = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _train_args(workdir, data_dir, num_steps, checkpoint_every):
    """train.py on a tiny CLIP with a constant learning rate (the step does not depend on
    num_steps, so runs of different lengths are the same computation)."""
    overrides = {
        "data.data_dir": data_dir,
        "data.builder_config": "16",
        "data.num_train_examples": 256,
        "data.num_eval_examples": 64,
        "tokenizer.vocab_size": 300,
        "tokenizer.context_length": 16,
        "training.global_batch_size": 16,
        "training.num_steps": num_steps,
        "training.log_every": 1,
        "training.checkpoint_every": checkpoint_every,
        "training.ema_decay": 0.9,
        "optimizer.schedule": "constant",
        "optimizer.warmup_steps": 2,
        "model.vision_depth": 1,  # one block per tower, as conftest.one_block
        "model.text_depth": 1,
    }
    return [
        sys.executable,
        "train.py",
        "--config=configs/base_clip.py",
        f"--workdir={workdir}",
        *(f"--config.{name}={value}" for name, value in overrides.items()),
    ]


def _spawn(args, log_path, env=None):
    """A train.py process on one CPU device (`env`: single_device_env(...) by default)."""
    env = env or single_device_env()
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            args, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
    process.log_path = log_path
    return process


def _records(workdir):
    """The complete lines of metrics.jsonl (a line being appended right now is left out)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _numbers(record):
    """What a training step computed (timings left out)."""
    return {k: record[k] for k in ("loss", "grad_norm", "param_norm", "logit_scale")}


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def _wait_for(predicate, processes, timeout, poll=0.2):
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in processes:
            if p.poll() is not None:
                tail = _read(p.log_path)[-3000:]
                raise AssertionError(f"{p.log_path} ended early ({p.returncode}):\n{tail}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL anywhere, restart until done: the same run as one never killed
# ---------------------------------------------------------------------------------------------

NUM_STEPS = 20
NUM_KILLS = 10
CHECKPOINT_EVERY = 2  # frequent asynchronous writes: many kills land in one


def _sleep_unless(seconds, predicate, poll=0.01):
    """Sleeps `seconds`, or less if `predicate` comes true first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not predicate():
        time.sleep(poll)


def _new_tmp_dirs(checkpoint_dir, before):
    if not os.path.isdir(checkpoint_dir):
        return set()
    return {n for n in os.listdir(checkpoint_dir) if _TMP_MARK in n} - before


def test_sigkill_at_random_moments_then_restarts_equal_the_uninterrupted_run(data_dir, tmp_path):
    rng = np.random.default_rng(20240611)
    args = lambda workdir: _train_args(workdir, data_dir, NUM_STEPS, CHECKPOINT_EVERY)
    # The reference run fills a compilation cache that every restart loads: a restart costs its
    # start-up, not a compile (the kill delays below scale with the measured times).
    env = single_device_env(compilation_cache=tmp_path / "xla_cache")
    reference = tmp_path / "reference"
    process = _spawn(args(reference), tmp_path / "reference.log", env)
    _wait_for(lambda: _records(reference), [process], timeout=300, poll=0.05)
    started = time.monotonic()
    assert process.wait(timeout=300) == 0, _read(tmp_path / "reference.log")[-3000:]
    step_time = (time.monotonic() - started) / (NUM_STEPS - 1)  # checkpoints included

    workdir = tmp_path / "killed"
    checkpoint_dir = workdir / "checkpoints"
    kills = {"start-up": 0, "training step": 0, "checkpoint write": 0}
    start_up = None
    for attempt in range(NUM_KILLS):
        records = _records(workdir)
        done = max([r["step"] for r in records] or [0])
        tmp_before = _new_tmp_dirs(checkpoint_dir, set())
        log_path = tmp_path / f"attempt{attempt}.log"
        started = time.monotonic()
        process = _spawn(args(workdir), log_path, env)
        # Where this kill lands: while Orbax writes a step (its temporary directory exists), a
        # random moment of the start-up, or a random moment within the 1st or 2nd step this
        # attempt trains. At most 2 new steps per attempt: the run never finishes before kill 10.
        where = "checkpoint write" if attempt in (0, 5) else rng.choice(["start-up", "training"])
        if where == "training" and done >= NUM_STEPS - 2:
            where = "start-up"
        if where == "checkpoint write":
            writing = lambda before=tmp_before: _new_tmp_dirs(checkpoint_dir, before)
            _wait_for(writing, [process], timeout=300, poll=0.002)
        elif where == "start-up":
            # A restart on a less loaded machine can outrun attempt 0's start-up: never past the
            # first step it trains (else one attempt may train to the end before kill 10).
            first_step = lambda before=records: len(_records(workdir)) > len(before)
            _sleep_unless(rng.uniform(0.1, 0.9) * start_up, first_step)
        else:
            target = len(records) + int(rng.integers(1, 3))
            trained = lambda target=target: len(_records(workdir)) >= target
            _wait_for(trained, [process], timeout=300)
            one_more = lambda target=target: len(_records(workdir)) > target
            _sleep_unless(rng.uniform(0, 1) * step_time, one_more)
        assert process.poll() is None, _read(log_path)[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if _new_tmp_dirs(checkpoint_dir, tmp_before):  # the write in flight was never finalised
            kills["checkpoint write"] += 1
        elif len(_records(workdir)) > len(records):
            kills["training step"] += 1
        else:
            kills["start-up"] += 1
        if attempt == 0:  # time to the first step (start-up and compilation)
            start_up = time.monotonic() - started
    process = _spawn(args(workdir), tmp_path / "last.log", env)
    assert process.wait(timeout=300) == 0, _read(tmp_path / "last.log")[-3000:]
    print(f"SIGKILLs by where they landed: {kills}; restart to first step {start_up:.1f} s")
    assert sum(kills.values()) == NUM_KILLS and kills["checkpoint write"] >= 1

    want = {r["step"]: r for r in _records(reference)}
    assert sorted(want) == list(range(1, NUM_STEPS + 1))
    got: dict[int, list] = {}
    for r in _records(workdir):  # a step logged before a kill and again after the restart
        got.setdefault(r["step"], []).append(r)
    assert sorted(got) == list(range(1, NUM_STEPS + 1))  # no step skipped
    for step, records in got.items():
        # The last record of a step is the one the final parameters descend from: any later rerun
        # of that step restarted from an older checkpoint and discarded it. Determinism makes every
        # record of the step equal anyway, which also proves the same data batch was used.
        for r in records:
            assert _numbers(r) == _numbers(want[step]), (step, len(records))
    reruns = sum(len(records) - 1 for records in got.values())
    a, b = _load_params(reference), _load_params(workdir)
    as_bytes = lambda x: np.frombuffer(np.asarray(x).tobytes(), np.uint8)
    differing = sum(
        int(np.sum(as_bytes(x) != as_bytes(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    print(f"{reruns} steps trained again after a restart; {differing} bytes of the params differ")
    assert differing == 0  # bitwise: not a byte of the final (EMA) parameters differs


# ---------------------------------------------------------------------------------------------
# 2. A damaged latest checkpoint: reported, set aside (not deleted), resumed from the one before
# ---------------------------------------------------------------------------------------------


def _files(directory):
    """{relative path: bytes} of every file under `directory`."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


def _run(args, timeout=300):
    result = subprocess.run(
        args, cwd=_ROOT, env=single_device_env(), capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def test_corrupt_latest_checkpoint_is_reported_kept_aside_and_the_one_before_resumes(
    data_dir, tmp_path
):
    workdir = tmp_path / "run"
    checkpoint_dir = workdir / "checkpoints"
    _run(_train_args(workdir, data_dir, 4, 2))
    first = _records(workdir)
    assert sorted(os.listdir(checkpoint_dir)) == ["2", "4"]
    # Cut the largest array file of step 4 in half, as a full disk or a broken copy leaves it.
    damaged = checkpoint_dir / "4"
    files = [os.path.join(root, n) for root, _, names in os.walk(damaged / "state") for n in names]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)
    left = _files(damaged)

    output = _run(_train_args(workdir, data_dir, 8, 2))
    assert f"checkpoint {damaged} failed to restore" in output
    assert f"resumed from {checkpoint_dir / '2'} (step 2)" in output
    # Kept byte for byte under a name Orbax does not list, so it survived the new saves of steps
    # 4, 6 and 8 and the retention of the last two (which deleted steps 2 and the new 4).
    assert f"moved the unreadable checkpoint {damaged} to {damaged}.corrupt" in output
    assert sorted(os.listdir(checkpoint_dir)) == ["4.corrupt", "6", "8"]
    assert _files(checkpoint_dir / "4.corrupt") == left
    records = _records(workdir)
    # The log holds each step once: the records of the lost steps 3 and 4 were dropped at the
    # resume from step 2, and steps 3 and 4 logged again, with the same batches and updates.
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [_numbers(r) for r in records[2:4]] == [_numbers(r) for r in first[2:4]]
    assert os.path.isdir(workdir / "params")


# ---------------------------------------------------------------------------------------------
# 3, 4. Two processes (jax.distributed, gloo over loopback), one device each: a preemption
# notice to one of them, then a rerun that resumes and loses one of its processes
# ---------------------------------------------------------------------------------------------

# Far more steps than the test lets run (~0.07 s each here): the preemption notice reaches the
# other process through the coordination service, and with 12 steps the run sometimes finished
# before it arrived (a flaky CI failure: exit 0, no save).
TWO_PROCESS_STEPS = 500


def _two_processes(args, log_prefix):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return [_spawn([*args, *flags, f"--process_id={i}"], f"{log_prefix}{i}.log") for i in range(2)]


def _end(processes):
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def preempted_run(data_dir, tmp_path_factory):
    """A 2-process run whose process 1 alone got SIGTERM after the first logged step."""
    directory = tmp_path_factory.mktemp("preempted")
    workdir = directory / "run"
    args = _train_args(workdir, data_dir, TWO_PROCESS_STEPS, 1000)
    processes = _two_processes(args, directory / "first")
    try:
        _wait_for(lambda: _records(workdir), processes, timeout=300)
        processes[1].send_signal(signal.SIGTERM)  # a preemption notice to one host only
        statuses = [p.wait(timeout=120) for p in processes]
    finally:
        _end(processes)
    logs = [_read(directory / f"first{i}.log") for i in range(2)]
    return {"args": args, "workdir": workdir, "directory": directory}, statuses, logs


def test_sigterm_to_one_of_two_processes_saves_both_at_one_step_and_exits_0(preempted_run):
    run, statuses, logs = preempted_run
    checkpoint_dir = run["workdir"] / "checkpoints"
    assert statuses == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    saved = [re.findall(r"preemption requested: saved step (\d+)", log) for log in logs]
    assert len(saved[0]) == 1 and saved[0] == saved[1]  # both stopped at the same step
    step = int(saved[0][0])
    assert 1 <= step < TWO_PROCESS_STEPS
    assert sorted(os.listdir(checkpoint_dir)) == [str(step)]
    iterators = os.listdir(checkpoint_dir / str(step) / "data_iterator")
    assert sorted(n for n in iterators if n.endswith(".json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    assert [r["step"] for r in _records(run["workdir"])] == list(range(1, step + 1))


def test_rerun_of_two_resumes_and_a_lost_peer_stops_the_other_with_a_clear_error(preempted_run):
    run, _, logs = preempted_run
    step = int(re.findall(r"preemption requested: saved step (\d+)", logs[0])[0])
    workdir, directory = run["workdir"], run["directory"]
    processes = _two_processes(run["args"], directory / "rerun")
    try:
        _wait_for(lambda: len(_records(workdir)) > step, processes, timeout=300)
        # No checkpoint is in flight, so process 0 learns it from its next gloo collective
        # (connection reset). Blocked in an Orbax barrier instead, it would learn it from the
        # coordination service's heartbeat timeout (100 s by default): slower, same message.
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        status = processes[0].wait(timeout=120)  # bounded: no hang on the dead peer
        waited = time.monotonic() - killed
    finally:
        _end(processes)
    logs = [_read(directory / f"rerun{i}.log") for i in range(2)]
    for log in logs:
        assert f"resumed from {workdir / 'checkpoints' / str(step)} (step {step})" in log
    # The first step after the preemption is the next one, logged once: none lost or repeated.
    steps = [r["step"] for r in _records(workdir)]
    assert steps[: step + 1] == list(range(1, step + 2))
    print(f"process 0 exited with status {status} {waited:.1f} s after process 1 was killed")
    assert status == 1, logs[0][-3000:]
    assert "train.py: lost a peer: process 0 of 2 lost contact" in logs[0]
    assert "start all 2 processes again with the same flags" in logs[0]
    assert f"newest complete checkpoint under {workdir}" in logs[0]


# ---------------------------------------------------------------------------------------------
# 4. The stages without steps of their own (evaluation, sampling) stop together as well
# ---------------------------------------------------------------------------------------------

POLLING = """
import sys, time
from diffusion import distributed
from diffusion.training import PreemptionGuard

distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
with PreemptionGuard() as guard:
    for batch in range(20000):  # a batch of sampling every 10 ms, in either process
        if batch == 1:
            print("polling", flush=True)
        time.sleep(0.01)
        if guard.poll():
            print(f"stopped after batch {batch}", flush=True)
            break
"""


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_polled_batch(tmp_path):
    """PreemptionGuard.poll, what the evaluate and samples stages call after each batch: a
    SIGTERM to process 1 alone stops both processes after one and the same batch, exit 0."""
    script = tmp_path / "polling.py"
    script.write_text(POLLING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    args = lambda i: [sys.executable, str(script), address, str(i)]
    env = {**single_device_env(), "PYTHONPATH": _ROOT}
    processes = [_spawn(args(i), tmp_path / f"poll{i}.log", env) for i in range(2)]
    try:
        polling = lambda: all("polling" in _read(p.log_path) for p in processes)
        _wait_for(polling, processes, timeout=120)
        processes[1].send_signal(signal.SIGTERM)  # a preemption notice to one host only
        statuses = [p.wait(timeout=60) for p in processes]
    finally:
        _end(processes)
    logs = [_read(p.log_path) for p in processes]
    assert statuses == [0, 0], logs
    stopped = [re.findall(r"stopped after batch (\d+)", log) for log in logs]
    assert len(stopped[0]) == 1 and stopped[0] == stopped[1], logs
    assert int(stopped[0][0]) < 19999  # stopped by the notice, not by the end of the loop
