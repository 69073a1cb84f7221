"""Orbax checkpoints: round trip, retention, cross-mesh restore, resume equality, fallback."""

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

from diffusion import checkpoints, sharding


def _mesh(shape, num_devices=8):
    return sharding.make_mesh(shape, devices=jax.devices()[:num_devices])


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
    path = checkpoints.export_params(tmp_path / "ema", state["ema"])
    mesh = _mesh({"fsdp": 2}, 2)
    _, abstract, _ = sharding.abstract_state(lambda: worker.ToyModel(nnx.Rngs(0)), mesh)
    loaded = checkpoints.load_params(path, abstract)
    _assert_trees_equal(loaded, state["ema"])
    assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(sharding.unbox(loaded)))
    with pytest.raises(FileNotFoundError, match="no exported parameters"):
        checkpoints.load_params(tmp_path / "missing", abstract)


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
