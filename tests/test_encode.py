"""encode.py and diffusion.encoding: a TFDS image dataset -> a TFDS dataset of latents.

Truths: the stored posterior is diffusers' AutoencoderKL posterior of each source image (PyTorch,
same weights); every other feature is the source record's; TFDS reads the output without a
builder class; a job killed at a random moment and rerun ends with the bytes of an uninterrupted
job; mismatched images and a changed plan are refused before anything is written over.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import single_device_env
from PIL import Image

from configs import common
from diffusion import config as config_lib
from diffusion import encoding, inference, rundir, training
from diffusion.data import input_pipeline, sources
from diffusion.data import latents as latents_lib
from diffusion.errors import UserError
from diffusion.evaluation import report
from diffusion.evaluation.autoencoder_features import AutoencoderFeatures, feature_autoencoder_path
from diffusion.inference.settings import SamplingError
from diffusion.models.autoencoder import AutoencoderConfig
from diffusion.pipeline.periodic import PeriodicEvaluation
from diffusion.training import inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = dict(num_train_examples=40, num_eval_examples=12)


def data_config(data_dir):
    config = common.data_config()
    config.update(data_dir=data_dir, builder_config="16", **NUM)
    return config


@pytest.fixture(scope="module")
def diffusers_autoencoder(tmp_path_factory):
    """A tiny diffusers AutoencoderKL with random weights, saved as safetensors."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    with torch.no_grad():  # random norms and biases too, so that every tensor matters
        for name, parameter in vae.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.copy_(torch.randn_like(parameter) * 0.1 + (name.endswith("weight")))
    directory = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(directory, safe_serialization=True)
    return directory, vae


@pytest.fixture(scope="module")
def encoded(diffusers_autoencoder, tmp_path_factory):
    """The shapes 16x16 test dataset encoded in this process on 8 devices."""
    root = tmp_path_factory.mktemp("encode")
    config = data_config(str(root / "data"))
    options = encoding.EncodeOptions(
        output_dir=str(root / "latents"), batch_size=8, examples_per_shard=16
    )
    dataset_dir = encoding.encode_dataset(diffusers_autoencoder[0], config, 0, options)
    return dataset_dir, config, options


def test_latents_are_the_diffusers_posterior_and_other_features_are_kept(
    encoded, diffusers_autoencoder
):
    import torch

    dataset_dir, config, options = encoded
    _, vae = diffusers_autoencoder
    latent = sources.dataset_builder(
        sources.SourceConfig(name="shapes_latents", data_dir=options.output_dir)
    )
    image_builder = tfds.builder("shapes/16_n40-12-12_s0", data_dir=config.data_dir)
    assert set(latent.info.splits) == {"train", "test", "test_unseen"}
    for split in ("train", "test_unseen"):
        images = image_builder.as_data_source(split=split)
        latents = latent.as_data_source(split=split)
        assert len(latents) == len(images) == (40 if split == "train" else 12)
        for index in (0, len(images) - 1):  # first shard and a last, shorter one
            source, record = images[index], latents[index]
            for key, value in source.items():
                if key != "image":
                    assert record[key] == value, key
            pixels = torch.tensor(source["image"], dtype=torch.float32) / 127.5 - 1
            with torch.no_grad():
                posterior = vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist
            want_mean = posterior.mean[0].permute(1, 2, 0).numpy()
            want_std = posterior.std[0].permute(1, 2, 0).numpy()
            assert record["latent_mean"].shape == (8, 8, 4)
            np.testing.assert_allclose(record["latent_mean"], want_mean, atol=1e-4)
            np.testing.assert_allclose(record["latent_std"], want_std, atol=1e-4)
    assert latent.info.features["shape"].names == image_builder.info.features["shape"].names
    info = encoding.read_encoding(dataset_dir)
    assert info["latent_shape"] == [8, 8, 4] and info["image_shape"] == [16, 16, 3]
    assert info["scaling_factor"] == vae.config.scaling_factor


def test_a_rerun_of_a_complete_dataset_changes_nothing_and_another_plan_is_refused(encoded):
    dataset_dir, config, options = encoded
    before = _files(dataset_dir)
    assert encoding.encode_dataset(_autoencoder_of(dataset_dir), config, 0, options) == dataset_dir
    assert _files(dataset_dir) == before
    changed = dataclasses.replace(options, examples_per_shard=8)
    refused = r"another plan \(differs in \['examples_per_shard'\]\)"
    with pytest.raises(encoding.PlanChanged, match=refused):  # finished: not what was asked
        encoding.encode_dataset(_autoencoder_of(dataset_dir), config, 0, changed)
    assert _files(dataset_dir) == before
    os.remove(os.path.join(dataset_dir, "encoding.json"))  # unfinished: the plan is compared
    with pytest.raises(UserError, match=refused):
        encoding.encode_dataset(_autoencoder_of(dataset_dir), config, 0, changed)
    finished = before.pop("encoding.json")
    assert _files(dataset_dir) == before
    encoding.encode_dataset(_autoencoder_of(dataset_dir), config, 0, options)  # finishes it
    assert _files(dataset_dir) == dict(before, **{"encoding.json": finished})


def _autoencoder_of(dataset_dir):
    with open(os.path.join(dataset_dir, "plan.json")) as f:
        return json.load(f)["autoencoder"]


def _files(directory):
    result = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            result[name] = f.read()
    return result


def test_images_the_autoencoder_cannot_encode_are_refused():
    config = AutoencoderConfig(block_out_channels=(8, 16, 16), norm_num_groups=4)  # factor 4
    image = lambda shape: {"image": tfds.features.Image(shape=shape)}
    assert encoding.check_images(image((16, 16, 3)), "image", config, "d") == (16, 16, 3)
    with pytest.raises(UserError, match="1-channel images but the autoencoder encodes 3"):
        encoding.check_images(image((16, 16, 1)), "image", config, "d")
    with pytest.raises(UserError, match="18x16, not a multiple of the .* factor 4"):
        encoding.check_images(image((18, 16, 3)), "image", config, "d")
    with pytest.raises(UserError, match=r"shape \(None, None, 3\).*one fixed size"):
        encoding.check_images(image((None, None, 3)), "image", config, "d")
    with pytest.raises(UserError, match="image_key='img' is not a feature"):
        encoding.check_images(image((16, 16, 3)), "img", config, "d")


def test_sigkills_and_a_sigterm_at_random_moments_then_a_rerun_equals_an_uninterrupted_job(
    encoded, diffusers_autoencoder, tmp_path
):
    """encode.py processes (one device, a compilation cache the first fills) killed while they
    encode and write shards (SIGKILL, and once SIGTERM, which must exit 0); the rerun's files
    equal an uninterrupted process's byte for byte."""
    _, config, _ = encoded
    env = single_device_env(compilation_cache=tmp_path / "xla_cache")

    def command(output_dir):
        overrides = {**NUM, "data_dir": config.data_dir, "builder_config": "16"}
        return [
            sys.executable, "encode.py", f"--autoencoder={diffusers_autoencoder[0]}",
            "--config=configs/base_clip.py", f"--output_dir={output_dir}", "--batch_size=2",
            "--examples_per_shard=4",
            *(f"--config.data.{key}={value}" for key, value in overrides.items()),
        ]  # fmt: skip

    whole = tmp_path / "whole"
    result = subprocess.run(command(whole), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "latent dataset:" in result.stdout
    killed = tmp_path / "killed"
    root = killed / "shapes_latents" / "1.0.0"
    shards = lambda: [n for n in os.listdir(root) if ".array_record-" in n and n[0] != "."]
    rng = np.random.default_rng(0)
    for attempt in range(3):
        process = subprocess.Popen(
            command(killed), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        before = len(shards()) if root.is_dir() else 0
        deadline = time.monotonic() + 120
        while not (root.is_dir() and len(shards()) > before) and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.005))  # within the next shard's encoding or writing
        assert process.poll() is None, process.stderr.read()[-3000:]
        if attempt == 1:  # a preemption notice: stops after the batch in flight, exit 0
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, stderr[-3000:]
            assert "preempted (stopped " in stdout.decode(), stdout
        else:
            process.send_signal(signal.SIGKILL)
            process.communicate()
        assert not (root / "encoding.json").exists()  # never marked complete when stopped
    result = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    want = _files(whole / "shapes_latents" / "1.0.0")
    got = _files(root)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_round_of_shards(
    diffusers_autoencoder, tmp_path
):
    """Two encode.py processes (one device each, a coordinator on localhost): a SIGTERM to
    process 1 alone stops both after one and the same round of shards, exit 0, no dataset
    marked complete; a rerun by one process ends with the bytes of an uninterrupted job."""
    import socket

    env = single_device_env(compilation_cache=tmp_path / "xla_cache")
    data = {"num_train_examples": 1000, "num_eval_examples": 12, "builder_config": "16"}
    data["data_dir"] = str(tmp_path / "data")

    def command(output_dir, *flags):
        return [
            sys.executable, "encode.py", f"--autoencoder={diffusers_autoencoder[0]}",
            "--config=configs/base_clip.py", f"--output_dir={output_dir}", "--batch_size=2",
            "--examples_per_shard=4", *flags,
            *(f"--config.data.{key}={value}" for key, value in data.items()),
        ]  # fmt: skip

    whole = subprocess.run(command(tmp_path / "whole"), cwd=REPO, env=env, capture_output=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"--coordinator_address=127.0.0.1:{s.getsockname()[1]}"
    root = tmp_path / "stopped" / "shapes_latents" / "1.0.0"
    flags = lambda i: (address, "--num_processes=2", f"--process_id={i}")
    processes = [
        subprocess.Popen(
            command(tmp_path / "stopped", *flags(i)), cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (root.is_dir() and _shards(root)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
            time.sleep(0.01)
        processes[1].send_signal(signal.SIGTERM)  # a preemption notice to one host only
        outputs = [p.communicate(timeout=120)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs
    rounds = [re.findall(r"preempted \(stopped after (\d+) of (\d+) rounds", o) for o in outputs]
    assert len(rounds[0]) == 1 and rounds[0] == rounds[1], outputs
    done, total = map(int, rounds[0][0])
    assert done < total
    assert len(_shards(root)) == 2 * done  # each process its first `done` shards, whole
    assert not (root / "encoding.json").exists()
    rerun = subprocess.run(command(tmp_path / "stopped"), cwd=REPO, env=env, capture_output=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _files(root) == _files(tmp_path / "whole" / "shapes_latents" / "1.0.0")


def sigterm_after_the_first_shard(monkeypatch) -> list:
    """Sends this process a SIGTERM once the job's first shard is written (a preemption notice
    while the second is encoded); returns the list of shards written, filled as they are."""
    write = encoding.LatentDatasetWriter.write
    written = []

    def write_then_signal(self, shard, examples):
        write(self, shard, examples)
        written.append(shard)
        if len(written) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(encoding.LatentDatasetWriter, "write", write_then_signal)
    return written


def _encode_again(encoded, output_dir, stop=lambda: False) -> str:
    """The `encoded` fixture's job into another directory (the same plan)."""
    dataset_dir, config, options = encoded
    options = dataclasses.replace(options, output_dir=str(output_dir))
    return encoding.encode_dataset(_autoencoder_of(dataset_dir), config, 0, options, stop)


TRAIN_SHARD = "shapes_latents-train.array_record-{:05d}-of-00003"  # 40 examples, 16 a shard


def _shards(directory):
    return sorted(n for n in os.listdir(directory) if ".array_record-" in n and n[0] != ".")


def test_sigterm_stops_after_the_batch_in_flight_and_a_rerun_finishes_the_same_bytes(
    encoded, tmp_path, monkeypatch
):
    """A SIGTERM (through the PreemptionGuard encode.py and the pipeline hold) while the 2nd
    shard is encoded: the job stops with the 1st shard whole, no temporary, not marked complete;
    the same call then finishes it with the bytes of the uninterrupted job."""
    written = sigterm_after_the_first_shard(monkeypatch)
    with training.PreemptionGuard() as preemption:
        with pytest.raises(encoding.EncodingStopped):
            _encode_again(encoded, tmp_path, stop=lambda: preemption.requested)
    root = tmp_path / "shapes_latents" / "1.0.0"
    assert len(written) == 1 and _shards(root) == [TRAIN_SHARD.format(0)]
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    assert not (root / "encoding.json").exists()
    monkeypatch.undo()
    assert _encode_again(encoded, tmp_path) == str(root)
    assert _files(root) == _files(encoded[0])


def test_a_full_disk_names_the_shard_and_keeps_the_shards_before(encoded, tmp_path, capsys):
    """The 2nd shard's writer gets a real ENOSPC (/dev/full): encode.py's error boundary prints
    one paragraph naming the shard's file and the cause (exit 1, no traceback); the 1st shard
    is whole, no temporary is left, and with space again the rerun ends equal to the
    uninterrupted job."""
    from array_record.python import array_record_module

    from diffusion.encoding import latent_dataset
    from diffusion.errors import error_boundary

    real = array_record_module.ArrayRecordWriter
    opened = []

    def writer(path, options):
        opened.append(path)
        return real("/dev/full" if len(opened) == 2 else path, options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(latent_dataset.array_record_module, "ArrayRecordWriter", writer)
        with pytest.raises(SystemExit) as exited, error_boundary("encode.py"):
            _encode_again(encoded, tmp_path)
    assert exited.value.code == 1
    message = " ".join(capsys.readouterr().err.split())
    root = tmp_path / "shapes_latents" / "1.0.0"
    second = root / TRAIN_SHARD.format(1)
    assert f"encode.py: error: cannot use {second}: the disk is full" in message, message
    assert "Traceback" not in message
    assert _shards(root) == [TRAIN_SHARD.format(0)]
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    _encode_again(encoded, tmp_path)
    assert _files(root) == _files(encoded[0])


def test_a_damaged_shard_of_an_unfinished_job_is_set_aside_and_encoded_again(
    encoded, tmp_path, capsys
):
    """A written shard cut short afterwards (a copy cut off, a disk fault): the rerun warns,
    keeps it as a dotted .damaged file and writes the shard again, ending equal to the
    uninterrupted job."""
    root = tmp_path / "shapes_latents" / "1.0.0"
    shutil.copytree(encoded[0], root)
    os.remove(root / "encoding.json")  # unfinished: the rerun checks what is there
    damaged = root / _shards(root)[2]
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[: len(whole) // 2])
    _encode_again(encoded, tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert f"warning: {damaged} holds 0 records, not its" in out, out
    aside = root / f".{damaged.name}.damaged"
    assert aside.read_bytes() == whole[: len(whole) // 2]
    os.remove(aside)
    assert _files(root) == _files(encoded[0])


def test_a_truncated_source_shard_is_named(encoded, tmp_path):
    _, config, _ = encoded
    source = tmp_path / "data"
    shutil.copytree(config.data_dir, source)
    shard = next(
        os.path.join(where, name)
        for where, _, names in os.walk(source)
        for name in names
        if "-train.array_record-" in name
    )
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    moved = dataclasses.replace(encoded[2], output_dir=str(tmp_path / "latents"))
    with pytest.raises(UserError, match="truncated or corrupt") as raised:
        encoding.encode_dataset(
            _autoencoder_of(encoded[0]), dict_with(config, data_dir=str(source)), 0, moved
        )
    assert shard in str(raised.value)


def dict_with(config, **changes):
    config = config.copy_and_resolve_references()
    config.update(changes)
    return config


def test_encode_py_refuses_a_missing_flag_with_one_line():
    result = subprocess.run(
        [sys.executable, "encode.py", "--config=configs/base_clip.py"],
        cwd=REPO,
        env=single_device_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "encode.py: error: --autoencoder is required" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# A DiT trained on the latent dataset, sampled through the autoencoder's decoder
# ---------------------------------------------------------------------------------------------


def test_latent_statistics_are_those_of_posterior_draws():
    rng = np.random.default_rng(0)
    means = rng.normal(0.7, 2.0, (64, 4, 4, 2)).astype(np.float32)
    stds = rng.uniform(0.1, 1.5, means.shape).astype(np.float32)
    statistics = latents_lib.LatentStatistics()
    statistics.add(means[:40], stds[:40])
    statistics.add(means[40:], stds[40:])
    draws = means[None] + stds[None] * rng.standard_normal((400, *means.shape), np.float32)
    got = statistics.result()
    np.testing.assert_allclose([got["mean"], got["std"]], [draws.mean(), draws.std()], rtol=1e-2)


def latent_dit_config(options, steps=2):
    """The DiT-XL/2 ImageNet recipe's runlocal variant (DDPM, epsilon, class = shape) on the
    encoded shapes."""
    config = config_lib.load_config(os.path.join(REPO, "configs", "dit_xl2_imagenet.py:runlocal"))
    config.data.update(name="shapes_latents", data_dir=options.output_dir, builder_config=None)
    config.model.update(patch_size=2, depth=1)
    config.training.update(global_batch_size=8, num_steps=steps, eval_every=0)
    return config


@pytest.fixture(scope="module")
def latent_run(encoded, tmp_path_factory):
    """A class-conditional DiT trained 2 steps on the encoded dataset, its sample grid drawn at
    step 2 by the periodic callback."""
    _, _, options = encoded
    workdir = str(tmp_path_factory.mktemp("latent_dit"))
    config = latent_dit_config(options)
    config.training.eval_every = 2
    training.train(config, workdir, callbacks=[PeriodicEvaluation(config)])
    return workdir


def test_the_periodic_grid_decodes_the_samples_of_the_exported_weights(latent_run, tmp_path):
    config = rundir.load_run_config(latent_run)
    s = config.sampling
    pipe = inference.ClassToImage.from_run(latent_run)
    per_class = PeriodicEvaluation.SEEDS_PER_PROMPT
    classes = [c for c in range(5) for _ in range(per_class)]  # 5 classes, fewer than shown
    seeds = [k for _ in range(5) for k in range(per_class)]
    images = pipe.generate(
        classes, seeds=seeds, sampler=s.sampler, steps=s.steps, guidance_scale=s.guidance_scale
    )
    assert images.shape == (20, 16, 16, 3)
    expected = report.save_grid(images, str(tmp_path / "grid.png"), columns=per_class)
    got = os.path.join(latent_run, "samples", "step_2.png")
    np.testing.assert_array_equal(np.asarray(Image.open(got)), np.asarray(Image.open(expected)))


def test_training_reads_a_normalised_draw_from_each_posterior(encoded):
    dataset_dir, _, options = encoded
    info = encoding.read_encoding(dataset_dir)
    source, _ = inputs.prepare_source(latent_dit_config(options).data, 0)
    assert source.latents.scaling_factor == info["scaling_factor"]
    reader = sources.open_source(source, "train", captions=False)
    decode = input_pipeline.BatchDecoder(reader, source, None, 0, seed=3, captions=False)
    indices = np.arange(32)
    batch = decode(indices)["image"]  # (32, 8, 8, 4)
    records = reader.read(list(indices))
    means = np.stack([r["latent_mean"] for r in records])
    stds = np.stack([r["latent_std"] for r in records])
    eps = (batch / info["scaling_factor"] + info["shift_factor"] - means) / stds
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05  # 8192 standard normals
    np.testing.assert_array_equal(decode(indices)["image"], batch)  # a resumed run draws the same
    assert not np.array_equal(decode(indices + 1)["image"][:-1], batch[1:])  # a fresh draw


def test_a_latent_run_records_its_autoencoder_and_samples_decoded_images(
    encoded, latent_run, diffusers_autoencoder
):
    dataset_dir, _, _ = encoded
    info = encoding.read_encoding(dataset_dir)
    recorded = rundir.load_latents(latent_run)
    assert recorded.autoencoder == os.path.abspath(diffusers_autoencoder[0])
    assert (recorded.scaling_factor, recorded.shift_factor) == (
        info["scaling_factor"],
        info["shift_factor"],
    )
    _, model_config = rundir.load_model_config(latent_run)
    assert (model_config.in_channels, model_config.num_classes) == (4, 5)
    pipe = inference.ClassToImage.from_run(latent_run)
    assert (pipe.resolution, pipe.image_size) == (8, 16)
    images = pipe.generate([0, 1, 2], seeds=[0, 1, 2], sampler="ddim", steps=2)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    one_by_one = [
        pipe.generate([c], seeds=[c], sampler="ddim", steps=2, batch_size=1) for c in range(3)
    ]
    np.testing.assert_array_equal(np.concatenate(one_by_one), images)
    # evaluate.py measures a latent run in the space of its own autoencoder.
    features = AutoencoderFeatures.load(*feature_autoencoder_path(latent_run, None))
    assert features.path == recorded.autoencoder
    assert features.encode(images).shape == (3, 8 * 8 * 4)  # posterior means, flattened
    bigger = inference.ClassToImage.from_run(latent_run, resolution=32)  # tokens 16x16 latents
    assert bigger.generate([0], seeds=[0], sampler="ddim", steps=1).shape == (1, 32, 32, 3)
    with pytest.raises(SamplingError, match="multiple of the DiT's patch size 4"):
        inference.ClassToImage.from_run(latent_run, resolution=18)


def test_a_latent_run_whose_autoencoder_is_gone_names_it(latent_run, tmp_path):
    moved = str(tmp_path / "run")
    shutil.copytree(latent_run, moved)
    recorded = json.loads(open(os.path.join(moved, "latents.json")).read())
    recorded["autoencoder"] = str(tmp_path / "gone")
    with open(os.path.join(moved, "latents.json"), "w") as f:
        json.dump(recorded, f)
    with pytest.raises(SamplingError, match=r"trained on latents of the autoencoder .*gone"):
        inference.ClassToImage.from_run(moved)


def test_the_encoded_images_are_read_where_they_moved_and_a_missing_place_names_the_flag(
    encoded, tmp_path
):
    """Evaluating a latent run reads the images its latents were encoded from (at the
    source_data_dir of encoding.json); moved, they are read from --source_data_dir, the same
    records; gone, the error names the flag."""
    from diffusion.evaluation.held_out import load_split_examples

    _, config, options = encoded
    data = latent_dit_config(options).data
    where_encoded = load_split_examples(data, 0, "test", 5)
    moved = tmp_path / "moved"
    shutil.copytree(config.data_dir, moved)
    where_moved = load_split_examples(data, 0, "test", 5, source_data_dir=str(moved))
    np.testing.assert_array_equal(where_moved.images, where_encoded.images)
    assert where_moved.captions == where_encoded.captions
    with pytest.raises(UserError, match="pass evaluate.py --source_data_dir=DIR") as raised:
        load_split_examples(data, 0, "test", 5, source_data_dir=str(tmp_path / "gone"))
    assert "whose images are not under" in str(raised.value)
