"""Orbax checkpoints: round trip, retention, cross-mesh restore, resume equality, fallback."""

import errno
import json
import logging
import os
import subprocess
import sys

import grain
import jax
import ml_collections
import multiprocess_worker as worker
import numpy as np
import pytest
from flax import nnx

from diffusion import checkpoints, errors, meshes, param_export, sharding


def _mesh(shape, num_devices=8):
    return meshes.make_mesh(shape, devices=jax.devices()[:num_devices])


def _plain(tree):
    """Numpy copies of every leaf (typed keys as their key data), for equality checks."""

    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(one, sharding.unbox(tree))


def _assert_trees_equal(got, want):
    assert jax.tree.structure(_plain(got)) == jax.tree.structure(_plain(want))
    for a, b in zip(jax.tree.leaves(_plain(got)), jax.tree.leaves(_plain(want)), strict=True):
        np.testing.assert_array_equal(a, b)


def _trained_state(trainer, steps=2):
    state, _ = trainer.run(trainer.init_state(), 0, steps, batch_size=16)
    return state


def test_round_trip_of_the_whole_train_state(tmp_path):
    trainer = worker.ToyTrainer(_mesh({"data": 2, "fsdp": 4}))
    state = _trained_state(trainer)
    snapshot = _plain(state)
    manager = checkpoints.make_checkpoint_manager(tmp_path / "ckpt")
    iterator_state = b'{"next_index": 32, "worker": [1, 2]}'  # grain DataLoader gives bytes
    checkpoints.save_checkpoint(
        manager, 2, state, data_iterator_state=iterator_state, metadata={"config_hash": "abc"}
    )
    restored = checkpoints.restore_checkpoint(manager, trainer.abstract_state)
    assert restored.step == 2
    assert restored.data_iterator_state == iterator_state
    assert restored.metadata == {"config_hash": "abc"}
    assert restored.path == os.path.join(str(tmp_path / "ckpt"), "2")
    _assert_trees_equal(restored.train_state, state)
    for got, want in zip(
        jax.tree.leaves(_plain(restored.train_state)), jax.tree.leaves(snapshot), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    # Optimizer moments are really there (not zeros) and the key is a typed key again.
    mu = jax.tree.leaves(sharding.unbox(restored.train_state["opt_state"]))
    assert any(np.abs(np.asarray(x)).max() > 0 for x in mu)
    assert jax.dtypes.issubdtype(restored.train_state["rng"].dtype, jax.dtypes.prng_key)
    assert int(restored.train_state["step"]) == 2
    # Shardings come from the abstract target.
    got_specs = jax.tree.map(lambda x: x.sharding, sharding.unbox(restored.train_state))
    want_specs = sharding.unbox(trainer.state_shardings)
    assert jax.tree.leaves(got_specs) == jax.tree.leaves(want_specs)
    manager.close()


def test_grain_iterator_state_round_trip(tmp_path):
    dataset = grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset()
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    trainer = worker.ToyTrainer(_mesh({"data": 8}))
    manager = checkpoints.make_checkpoint_manager(tmp_path)
    state = trainer.init_state()
    checkpoints.save_checkpoint(manager, 3, state, data_iterator_state=iterator.get_state())
    expected_next = [next(iterator).tolist() for _ in range(2)]

    restored = checkpoints.restore_checkpoint(manager, trainer.abstract_state)
    resumed = iter(dataset)
    resumed.set_state(restored.data_iterator_state)
    assert [next(resumed).tolist() for _ in range(2)] == expected_next
    manager.close()


def test_keeps_the_last_n_and_every_kth_step(tmp_path):
    trainer = worker.ToyTrainer(_mesh({"data": 8}))
    state = trainer.init_state()
    manager = checkpoints.make_checkpoint_manager(tmp_path, max_to_keep=2, keep_period=4)
    for step in range(1, 10):
        checkpoints.save_checkpoint(manager, step, state)
    manager.wait_until_finished()
    assert manager.all_steps() == [4, 8, 9]  # last two (8, 9) plus multiples of 4
    assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [4, 8, 9]
    assert manager.latest_step() == 9
    manager.close()


def test_restore_latest_chooses_the_newest_of_several(tmp_path):
    trainer = worker.ToyTrainer(_mesh({"data": 8}))
    manager = checkpoints.make_checkpoint_manager(tmp_path, max_to_keep=5)
    assert checkpoints.restore_latest(manager, trainer.abstract_state) is None
    state = trainer.init_state()
    saved = {}
    for step in (2, 5, 7):
        state, _ = trainer.run(state, step, 1, batch_size=16)
        saved[step] = _plain(state)
        checkpoints.save_checkpoint(manager, step, state, data_iterator_state={"next": step})
    restored = checkpoints.restore_latest(manager, trainer.abstract_state)
    assert restored.step == 7
    assert restored.data_iterator_state == {"next": 7}
    for got, want in zip(
        jax.tree.leaves(_plain(restored.train_state)), jax.tree.leaves(saved[7]), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    manager.close()


MESHES = {
    "8: 2 data x 4 fsdp": ({"data": 2, "fsdp": 4}, 8),
    "8: 2x2x2": ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
    "4: 2 fsdp x 2 tensor": ({"fsdp": 2, "tensor": 2}, 4),
    "2: 2 fsdp": ({"fsdp": 2}, 2),
    "1": ({"data": 1}, 1),
}


@pytest.mark.parametrize(
    "source, targets, optimizer",
    [
        ("8: 2 data x 4 fsdp", ["2: 2 fsdp", "4: 2 fsdp x 2 tensor", "1"], "adamw"),
        ("2: 2 fsdp", ["8: 2x2x2"], "adamw"),
        ("1", ["8: 2 data x 4 fsdp"], "adamw"),
        ("8: 2 data x 4 fsdp", ["4: 2 fsdp x 2 tensor"], "muon"),
    ],
)
def test_restore_onto_a_different_mesh(tmp_path, source, targets, optimizer):
    shape, count = MESHES[source]
    make_trainer = lambda mesh: worker.ToyTrainer(mesh, tx=worker.make_tx(name=optimizer))
    state = _trained_state(make_trainer(_mesh(shape, count)))
    manager = checkpoints.make_checkpoint_manager(tmp_path)
    checkpoints.save_checkpoint(manager, 2, state)
    manager.wait_until_finished()
    for target in targets:
        target_shape, target_count = MESHES[target]
        trainer = make_trainer(_mesh(target_shape, target_count))
        restored = checkpoints.restore_checkpoint(manager, trainer.abstract_state)
        _assert_trees_equal(restored.train_state, state)
        for array, want in zip(
            jax.tree.leaves(sharding.unbox(restored.train_state)),
            jax.tree.leaves(sharding.unbox(trainer.state_shardings)),
            strict=True,
        ):
            assert array.sharding == want
            assert len(array.sharding.device_set) == target_count
        # Training continues on the new mesh.
        trainer.run(restored.train_state, 2, 1, batch_size=16)
    manager.close()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_gives_bitwise_the_same_losses_and_parameters(tmp_path, optimizer):
    """Muon's state holds optax.partition's masked (empty) nodes inside NNX Variables."""
    mesh = _mesh({"data": 2, "fsdp": 4})
    trainer = worker.ToyTrainer(mesh, tx=worker.make_tx(name=optimizer))
    final, uninterrupted = trainer.run(trainer.init_state(), 0, 6, batch_size=16)
    final = _plain(final)

    manager = checkpoints.make_checkpoint_manager(tmp_path)
    state, first = trainer.run(trainer.init_state(), 0, 3, batch_size=16)
    checkpoints.save_checkpoint(manager, 3, state, data_iterator_state={"next_step": 3})
    # Keep training past the (asynchronous) save with a donated state: the checkpoint must hold
    # the step-3 values, not whatever the buffers hold later.
    trainer.run(state, 3, 2, batch_size=16)
    manager.close()

    fresh = worker.ToyTrainer(mesh, tx=worker.make_tx(name=optimizer))  # as a new process would
    resumed_manager = checkpoints.make_checkpoint_manager(tmp_path)
    restored = checkpoints.restore_latest(resumed_manager, fresh.abstract_state)
    next_step = restored.data_iterator_state["next_step"]
    state, second = fresh.run(restored.train_state, next_step, 6 - next_step, batch_size=16)
    assert first + second == uninterrupted  # bitwise: float equality of every loss
    for got, want in zip(jax.tree.leaves(_plain(state)), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(got, want)
    resumed_manager.close()


def test_unfinished_or_corrupt_latest_checkpoint_is_not_used(tmp_path, caplog):
    trainer = worker.ToyTrainer(_mesh({"data": 8}))
    manager = checkpoints.make_checkpoint_manager(tmp_path, max_to_keep=5)
    state = trainer.init_state()
    checkpoints.save_checkpoint(manager, 1, state, data_iterator_state={"next": 1})
    state, _ = trainer.run(state, 1, 1, batch_size=16)
    checkpoints.save_checkpoint(manager, 2, state, data_iterator_state={"next": 2})
    manager.wait_until_finished()
    manager.close()
    # A save killed half-way leaves only a temporary directory: never listed.
    os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-1234567" / "state")
    # Step 2 is finalised but its array files are damaged afterwards.
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")

    manager = checkpoints.make_checkpoint_manager(tmp_path, max_to_keep=5)
    assert manager.latest_step() == 2
    with caplog.at_level(logging.ERROR, logger="diffusion.checkpoints"):
        restored = checkpoints.restore_latest(manager, trainer.abstract_state)
    assert restored.step == 1 and restored.data_iterator_state == {"next": 1}
    assert str(tmp_path / "2") in caplog.text
    assert os.path.isdir(tmp_path / "2")  # nothing deleted
    manager.close()


def test_export_and_load_ema_params_on_another_mesh(tmp_path):
    state = _trained_state(worker.ToyTrainer(_mesh({"data": 2, "fsdp": 4})))
    path = param_export.export_params(tmp_path / "ema", state["ema"])
    mesh = _mesh({"fsdp": 2}, 2)
    _, abstract, _ = sharding.abstract_state(lambda: worker.ToyModel(nnx.Rngs(0)), mesh)
    loaded = param_export.load_params(path, abstract)
    _assert_trees_equal(loaded, state["ema"])
    assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(sharding.unbox(loaded)))
    with pytest.raises(FileNotFoundError, match="no exported parameters"):
        param_export.load_params(tmp_path / "missing", abstract)


def test_our_array_handler_is_registered_without_orbax_override_warning():
    """The handler swap is expected, so Orbax's 'overriding' warning must not greet each run;
    the handler Orbax uses for jax.Array must be ours."""
    probe = (
        "import jax, orbax.checkpoint as ocp; from diffusion import checkpoints; "
        "h = ocp.type_handlers.get_type_handler(jax.Array); "
        "print(h._min_slice_bytes_for_replica_parallel == checkpoints.MIN_REPLICA_SLICE_BYTES)"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert "Type handler registry" not in result.stderr


def test_replicated_arrays_above_and_below_the_replica_slice_threshold_round_trip(tmp_path):
    """On 8 data-parallel replicas Orbax writes an array cooperatively (each replica a slice)
    only when a slice holds MIN_REPLICA_SLICE_BYTES; smaller ones come whole from one replica.
    Both kinds, and one just at the threshold, restore bit for bit onto another mesh."""
    mesh = _mesh({"data": 8})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = np.random.default_rng(0)
    at_threshold = 8 * checkpoints.MIN_REPLICA_SLICE_BYTES // 4  # float32 values, 8 slices
    state = {
        name: jax.device_put(rng.standard_normal(n).astype(np.float32), replicated)
        for name, n in (("bias", 7), ("just_below", at_threshold - 8), ("at", at_threshold))
    }
    manager = checkpoints.make_checkpoint_manager(tmp_path / "ckpt")
    checkpoints.save_checkpoint(manager, 1, state)
    on_two = jax.sharding.NamedSharding(_mesh({"data": 2}, 2), jax.sharding.PartitionSpec())
    target = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_two) for n, x in state.items()}
    restored = checkpoints.restore_checkpoint(manager, target, restore_data_iterator=False)
    manager.close()
    _assert_trees_equal(restored.train_state, state)


def test_write_config_once(tmp_path):
    config = ml_collections.ConfigDict({"seed": 3, "optimizer": {"learning_rate": 1e-3}})
    path = checkpoints.write_config(tmp_path / "run", config)
    assert json.loads(open(path).read()) == {"optimizer": {"learning_rate": 0.001}, "seed": 3}
    config.seed = 4
    assert checkpoints.write_config(tmp_path / "run", config) is None  # written once
    assert json.loads(open(path).read())["seed"] == 3


# ------------------------------------------------------------------------------------------------
# Failed writes leave the earlier checkpoints intact and no temporaries
# ------------------------------------------------------------------------------------------------

DISK_FULL = errno.ENOSPC, os.strerror(errno.ENOSPC)


def _saved_steps_then_failure(tmp_path, inject, monkeypatch):
    """Steps 1 and 2 saved (asynchronously, keeping 2); `inject` makes the save of 3 fail."""
    trainer = worker.ToyTrainer(_mesh({"data": 8}))
    state = trainer.init_state()
    manager = checkpoints.make_checkpoint_manager(tmp_path / "ckpt", max_to_keep=2)
    for step in (1, 2):
        checkpoints.save_checkpoint(manager, step, state, data_iterator_state={"next": step})
    checkpoints.finish_writes(manager)
    inject(monkeypatch, tmp_path)
    return trainer, state, manager


def _fail_data_iterator_write(monkeypatch, tmp_path):
    """Writing the data-iterator file raises OSError(ENOSPC) in the calling thread."""

    def disk_full(self, directory, args):
        raise OSError(*DISK_FULL, os.path.join(os.fspath(directory), "process_0-of-1.json"))

    monkeypatch.setattr(checkpoints.ProcessLocalJsonHandler, "save", disk_full)


def _fail_in_the_background(monkeypatch, tmp_path):
    """The arrays are written, then the background commit fails as TensorStore reports a full
    disk (a ValueError): Orbax raises it at the next save or wait."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    def disk_full(directory, commit_futures, on_commit_callback, **kwargs):
        for commit in commit_futures:
            commit.result()
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing local file "{directory}/state/d/0a1b": '
            "No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", disk_full)


@pytest.mark.parametrize(
    "inject, surfaces",
    [
        (_fail_data_iterator_write, "at-save"),
        (_fail_in_the_background, "at-next-save"),
        (_fail_in_the_background, "at-finish-writes"),
    ],
)
def test_a_failed_save_keeps_earlier_steps_and_removes_its_temporaries(
    tmp_path, monkeypatch, inject, surfaces
):
    trainer, state, manager = _saved_steps_then_failure(tmp_path, inject, monkeypatch)
    directory = tmp_path / "ckpt"
    with pytest.raises(checkpoints.CheckpointWriteError) as raised:
        started = checkpoints.save_checkpoint(manager, 3, state, data_iterator_state={"next": 3})
        assert started and surfaces != "at-save"
        if surfaces == "at-next-save":
            checkpoints.save_checkpoint(manager, 4, state, data_iterator_state={"next": 4})
        else:
            checkpoints.finish_writes(manager)
    message = str(raised.value)
    for words in (
        "could not write a checkpoint (step 3)",
        "the disk is full (No space left on device",
        f"the last complete checkpoint, {directory / '2'}, is intact",
        "the partial write was removed",
    ):
        assert words in message, message
    assert raised.value.failed_steps == (3,) and raised.value.intact == str(directory / "2")
    assert isinstance(raised.value, errors.UserError)  # one paragraph at the entry points
    checkpoints.close_manager(manager)  # the failure is reported once, not again at close
    monkeypatch.undo()

    # Step 1 too: Orbax deletes old steps only after the new one is finalised.
    assert sorted(os.listdir(directory)) == ["1", "2"]  # no *.orbax-checkpoint-tmp* left
    manager = checkpoints.make_checkpoint_manager(directory, max_to_keep=2)
    assert checkpoints.restore_latest(manager, trainer.abstract_state).step == 2
    restored = checkpoints.restore_checkpoint(manager, trainer.abstract_state, 1)
    assert restored.data_iterator_state == {"next": 1}
    _assert_trees_equal(restored.train_state, state)
    # With space again, the same step saves.
    checkpoints.save_checkpoint(manager, 3, state, data_iterator_state={"next": 3})
    checkpoints.close_manager(manager)
    assert sorted(os.listdir(directory)) == ["2", "3"]


def test_an_error_that_is_no_write_failure_passes_through(tmp_path, monkeypatch):
    manager = checkpoints.make_checkpoint_manager(tmp_path / "ckpt")

    def broken(self, directory, args):
        raise ValueError("a bug, not a disk")

    monkeypatch.setattr(checkpoints.ProcessLocalJsonHandler, "save", broken)
    with pytest.raises(ValueError, match="a bug, not a disk") as raised:
        checkpoints.save_checkpoint(manager, 1, {"x": np.zeros(2)}, data_iterator_state={})
    assert not isinstance(raised.value, checkpoints.CheckpointWriteError)
    monkeypatch.undo()
    checkpoints.close_manager(manager)


# ------------------------------------------------------------------------------------------------
# Exported parameters: a complete export of the same values is not rewritten
# ------------------------------------------------------------------------------------------------


def _file_identities(directory):
    """{relative path: (inode, mtime_ns)} of every file and directory under `directory`."""
    identities = {".": (os.stat(directory).st_ino, os.stat(directory).st_mtime_ns)}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            identities[os.path.relpath(path, directory)] = (stat.st_ino, stat.st_mtime_ns)
    return identities


def test_export_of_the_same_values_leaves_the_files_alone_and_new_values_replace_them(tmp_path):
    trainer = worker.ToyTrainer(_mesh({"data": 2, "fsdp": 4}))
    state = _trained_state(trainer)
    path = param_export.export_params(tmp_path / "params", state["ema"], step=2)
    record = param_export.read_export_record(path)
    assert record["step"] == 2 and record["fingerprint"].startswith("sha256:")
    before = _file_identities(path)
    # Rerunning a finished run: the same values (also on another mesh) keep every file.
    again = jax.device_put(state["ema"], jax.tree.map(lambda x: x.sharding, state["ema"]))
    assert param_export.export_params(tmp_path / "params", again, step=2) == path
    assert _file_identities(path) == before
    # Other values are swapped in whole; nothing staged is left beside them.
    state, _ = trainer.run(state, 2, 1, batch_size=16)
    param_export.export_params(tmp_path / "params", state["ema"], step=3)
    assert param_export.read_export_record(path)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["params"]
    _, abstract, _ = sharding.abstract_state(lambda: worker.ToyModel(nnx.Rngs(0)), trainer.mesh)
    _assert_trees_equal(param_export.load_params(path, abstract), state["ema"])
    # An export without its record (written before records existed, or cut short) is redone.
    os.remove(os.path.join(path, param_export.EXPORT_RECORD))
    param_export.export_params(tmp_path / "params", state["ema"], step=3)
    assert param_export.read_export_record(path)["step"] == 3


def test_fingerprint_sees_values_names_and_dtypes():
    base = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.int32)}
    same = {"a": base["a"].copy(), "b": base["b"].copy()}
    assert param_export.fingerprint(base) == param_export.fingerprint(same)
    changed = {"a": base["a"].copy(), "b": base["b"]}
    changed["a"][1, 2] = np.nextafter(np.float32(5), np.float32(6))  # one bit of one value
    assert param_export.fingerprint(changed) != param_export.fingerprint(base)
    assert param_export.fingerprint({"c": base["a"], "b": base["b"]}) != param_export.fingerprint(
        base
    )
    assert param_export.fingerprint({"a": base["a"].astype(np.int32), "b": base["b"]}) != (
        param_export.fingerprint(base)
    )


def test_global_bit_sums_do_not_depend_on_the_mesh():
    """The fingerprint of arrays sharded over processes: integer sums, the same on any mesh."""
    values = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    sums = []
    for shape in ({"data": 8}, {"data": 2, "fsdp": 4}):
        mesh = _mesh(shape)
        spec = jax.sharding.PartitionSpec(tuple(shape))
        x = jax.device_put(values, jax.sharding.NamedSharding(mesh, spec))
        sums.append(np.asarray(param_export._bit_sums([x, x.astype(jax.numpy.bfloat16)])))
    np.testing.assert_array_equal(sums[0], sums[1])
    moved = values.copy()
    moved[[0, 1]] = moved[[1, 0]]  # the same values elsewhere
    assert np.asarray(param_export._bit_sums([jax.numpy.asarray(moved)]))[0] != sums[0][0]


def test_a_failed_export_keeps_the_previous_one_and_removes_the_partial(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    state = _trained_state(worker.ToyTrainer(_mesh({"data": 8})))
    path = param_export.export_params(tmp_path / "params", state["params"], step=2)
    before = _file_identities(path)
    original = ocp.StandardCheckpointer.save

    def disk_full(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)  # leaves a partial write, then fails
        raise OSError(*DISK_FULL, os.fspath(directory))

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", disk_full)
    with pytest.raises(checkpoints.CheckpointWriteError) as raised:
        param_export.export_params(tmp_path / "params", state["ema"], step=2)
    assert "could not export the parameters" in str(raised.value)
    assert "the disk is full" in str(raised.value) and f"{path} is unchanged" in str(raised.value)
    assert _file_identities(path) == before
    assert sorted(os.listdir(tmp_path)) == ["params"]
