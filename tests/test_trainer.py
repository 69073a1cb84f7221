"""The real training loop on tiny CLIP and DiT configs: meshes, resume, metrics, learning.

Truths: the same run on different meshes is the same computation (losses equal up to float32
reduction order); a resumed run is the uninterrupted run (bitwise on CPU).
"""

import json
import os

import jax
import numpy as np
import pytest
from conftest import one_block, xla_flags

from configs import base_clip, base_dit
from diffusion import checkpoints, families, meshes, metrics, optim, rundir, training
from diffusion import data as data_lib
from diffusion.errors import UserError
from diffusion.families import dit as dit_family
from diffusion.pipeline.periodic import PeriodicEvaluation
from diffusion.train_step import TrainStep
from diffusion.training import flops, inputs

MESHES = {
    "1": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
    "8data": ({"data": 8, "fsdp": 1, "tensor": 1}, 8),
    "2data4fsdp": ({"data": 2, "fsdp": 4, "tensor": 1}, 8),
    "2x2x2": ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def tiny(family, data_dir, steps=4, mesh="8data", **training):
    config = (base_clip if family == "clip" else base_dit).get_config()
    config.data.data_dir = data_dir
    config.data.builder_config = "16"
    config.data.num_train_examples = 256
    config.data.num_eval_examples = 64
    config.tokenizer.vocab_size = 300
    config.tokenizer.context_length = 16
    config.training.update(
        global_batch_size=16, num_steps=steps, log_every=1, checkpoint_every=100, ema_decay=0.9
    )
    config.training.update(training)
    config.optimizer.update(warmup_steps=2, learning_rate=1e-3)
    config.model.dtype = "float32"
    if family == "clip":
        config.model.variant = "tiny"
    config.mesh.update(MESHES[mesh][0])
    return one_block(config)


def run(config, workdir, mesh="8data"):
    """train.py's training of one family (with its periodic checks) on the mesh's devices."""
    devices = jax.devices()[: MESHES[mesh][1]]
    callbacks = [PeriodicEvaluation(config)]
    training.train(config, str(workdir), devices=devices, callbacks=callbacks)
    return [r["loss"] for r in metrics.read_metrics(str(workdir))]


@pytest.fixture(scope="module")
def clip_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clip")
    # Two text blocks: a DiT reads it as a scanned tower too (test below), whose relayout of the
    # blocks only shows on more than one.
    run(one_block(tiny("clip", data_dir, steps=3), text_depth=2), workdir)
    return str(workdir)


def dit_config(data_dir, clip_run, **kwargs):
    config = tiny("dit", data_dir, **kwargs)
    config.text_encoder.checkpoint = clip_run
    config.tokenizer.path = os.path.join(clip_run, "tokenizer")
    return config


def test_clip_run_directory_holds_everything_to_resume_or_sample(clip_run):
    names = set(os.listdir(clip_run))
    assert {"config.json", "model.json", "tokenizer", "checkpoints", "params"} <= names
    assert {"metrics.jsonl", "tensorboard"} <= names
    record = metrics.read_metrics(clip_run)[-1]
    for key in ("loss", "grad_norm", "param_norm", "learning_rate", "logit_scale", "mfu"):
        assert np.isfinite(record[key]), key
    assert record["step"] == 3
    # The logit scale starts at 1/0.07 (CLIP paper) and is never above 100.
    assert 1 / 0.07 * 0.9 < record["logit_scale"] <= 100


@pytest.mark.parametrize("family", ["clip", "dit"])
def test_same_losses_on_every_mesh(family, data_dir, clip_run, tmp_path):
    losses = {}
    for mesh in MESHES:
        config = (
            tiny("clip", data_dir, steps=10, mesh=mesh)
            if family == "clip"
            else dit_config(data_dir, clip_run, steps=10, mesh=mesh)
        )
        losses[mesh] = run(config, tmp_path / mesh, mesh)
    reference = np.array(losses["1"])
    assert len(reference) == 10
    for mesh, values in losses.items():
        np.testing.assert_allclose(values, reference, rtol=1e-5, err_msg=mesh)


def test_parameters_are_sharded_as_the_rules_say(data_dir, clip_run, tmp_path):
    config = dit_config(data_dir, clip_run, steps=3, mesh="2x2x2")
    run(config, tmp_path, "2x2x2")
    manager = checkpoints.make_checkpoint_manager(tmp_path / "checkpoints")
    restored = checkpoints.restore_latest(manager, _abstract_state(config, tmp_path))
    manager.close()
    params = restored.train_state["params"]
    query = params["blocks"]["blocks"][0]["attn"]["query_kernel"]
    # ('embed', 'heads', 'kv') -> ('fsdp', 'tensor', None): each device holds a quarter of it
    assert tuple(query.get_value().sharding.spec)[:2] == ("fsdp", "tensor")
    width, heads, head_dim = query.shape
    shard = query.get_value().addressable_shards[0].data
    assert shard.shape == (width // 2, heads // 2, head_dim)


def _abstract_state(config, workdir):
    from diffusion import data as data_lib

    source, builder = inputs.prepare_source(config.data, config.seed)
    tokenizer = data_lib.load_tokenizer(os.path.join(config.tokenizer.path))
    mesh = meshes.mesh_from_config(config.mesh, jax.devices()[:8])
    build, frozen = training.build_model(config, inputs.data_facts(config, tokenizer, 16), mesh)
    tx = optim.make_optimizer(config.optimizer, total_steps=config.training.num_steps)
    t = TrainStep(build.init_model, build.loss_fn, tx, mesh, seed=0, ema_decay=0.9, frozen=frozen)
    return t.abstract_state


def _model_flops(config, clip_run, mesh="1"):
    from diffusion import data as data_lib

    tokenizer = data_lib.load_tokenizer(os.path.join(clip_run, "tokenizer"))
    mesh = meshes.mesh_from_config(MESHES[mesh][0], jax.devices()[: MESHES[mesh][1]])
    facts = inputs.data_facts(config, tokenizer, 16)
    build, frozen = training.build_model(config, facts, mesh)
    tx = optim.make_optimizer(config.optimizer, total_steps=config.training.num_steps)
    t = TrainStep(build.init_model, build.loss_fn, tx, mesh, seed=0, ema_decay=0.9, frozen=frozen)
    batch = families.get(config.family).abstract_batch(config, mesh, build, facts)
    return flops.model_flops(build, t, batch), build.model_config


@pytest.mark.parametrize("family", ["clip", "dit"])
def test_mfu_numerator_counts_the_global_step_with_or_without_scan_and_remat(
    family, data_dir, clip_run
):
    """The logged MFU's FLOPs are the whole step's model work: the same on 1 device and on 8 (a
    compiled SPMD program counts one device's share) and with the blocks scanned and
    rematerialised (XLA counts a scanned block once; recomputation is not model work)."""
    # Two blocks per tower: with one, a scanned block counted once would count them all.
    deeper = {"clip": dict(vision_depth=2, text_depth=2), "dit": dict(depth=2)}[family]
    make = lambda: one_block(
        tiny("clip", data_dir) if family == "clip" else dit_config(data_dir, clip_run), **deeper
    )
    one_device, _ = _model_flops(make(), clip_run, "1")
    assert one_device > 0
    assert _model_flops(make(), clip_run, "2x2x2")[0] == pytest.approx(one_device, rel=1e-3)
    scanned = make()
    scanned.model.update(scan_layers=True, remat="full")
    assert _model_flops(scanned, clip_run, "1")[0] == pytest.approx(one_device, rel=1e-3)


def test_a_dit_on_a_scanned_text_tower_trains_and_counts_like_on_an_unscanned_one(
    data_dir, clip_run, monkeypatch, tmp_path
):
    """The frozen CLIP of a DiT may have been trained with scan_layers. With the same weights,
    the DiT's losses are those on the unscanned tower, and the MFU numerator counts every block
    of the tower's forward (XLA counts a scanned block once)."""
    import dataclasses

    from flax import nnx

    from diffusion import models
    from diffusion.models import layers

    unscanned = rundir.load_text_encoder(clip_run, {})
    assert unscanned.config.text_depth >= 2 and not unscanned.config.scan_layers
    scanned = models.CLIP(dataclasses.replace(unscanned.config, scan_layers=True), rngs=nnx.Rngs(1))
    layers.copy_params_into_scanned(unscanned, scanned)
    losses, flops = {}, {}
    for name, frozen in (("unscanned", unscanned), ("scanned", scanned)):
        monkeypatch.setattr(rundir, "load_text_encoder", lambda *a, frozen=frozen: frozen)
        losses[name] = run(dit_config(data_dir, clip_run, steps=3, mesh="1"), tmp_path / name, "1")
        flops[name] = _model_flops(dit_config(data_dir, clip_run), clip_run)[0]
    np.testing.assert_allclose(losses["scanned"], losses["unscanned"], rtol=1e-5)
    assert flops["scanned"] == pytest.approx(flops["unscanned"], rel=1e-4)


def test_mfu_numerator_of_a_class_conditional_dit_matches_the_closed_form(data_dir, clip_run):
    """3 x forward matmul FLOPs of DiT (Peebles & Xie): per token and block 24 D^2 (qkv, out,
    MLP 4x) + 4 T D (scores, values); per example and block the adaLN's 12 D^2; patch embedding
    and final layer 4 p^2 C D per token; time MLP and final adaLN per example. The rest of the
    step (norms, GELU, AdamW, EMA) is elementwise and small."""
    config = one_block(dit_config(data_dir, clip_run), depth=2)  # L blocks: the closed form's L
    config.model.num_classes = 10
    mesh = meshes.mesh_from_config(MESHES["1"][0], jax.devices()[:1])
    facts = families.DataFacts.from_config(config, 16)
    build = dit_family.build(config, facts, mesh, None)
    c = build.model_config
    tx = optim.make_optimizer(config.optimizer, total_steps=config.training.num_steps)
    t = TrainStep(build.init_model, build.loss_fn, tx, mesh, seed=0, ema_decay=0.9)
    batch = dit_family.abstract_batch(config, mesh, build, facts)
    step_flops = flops.model_flops(build, t, batch)
    D, L, p, C = c.width, c.depth, c.patch_size, c.in_channels
    T = (batch["image"].shape[1] // p) ** 2  # tokens of the 16x16 images
    per_token = L * (24 * D * D + 4 * T * D) + 4 * p * p * C * D
    per_example = L * 12 * D * D + 4 * D * D + 2 * (c.frequency_dim * D + D * D)
    closed_form = 3 * config.training.global_batch_size * (T * per_token + per_example)
    assert 1.0 <= step_flops / closed_form < 1.1


@pytest.mark.parametrize("family", ["clip", "dit"])
def test_resumed_run_equals_uninterrupted_run_bitwise(family, data_dir, clip_run, tmp_path):
    make = lambda steps: (
        tiny("clip", data_dir, steps=steps)
        if family == "clip"
        else dit_config(data_dir, clip_run, steps=steps)
    )
    uninterrupted = run(make(6), tmp_path / "a")
    run(make(3), tmp_path / "b")  # "killed" after step 3: its last checkpoint is step 3
    resumed = run(make(6), tmp_path / "b")
    assert resumed == uninterrupted  # losses of steps 1..6, the data order included
    for name in ("a", "b"):
        assert os.path.isdir(tmp_path / name / "params")
    a, b = (_load_params(tmp_path / n) for n in ("a", "b"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _load_params(workdir):
    family, model_config = rundir.load_model_config(str(workdir))
    from flax import nnx

    from diffusion import models

    cls = models.CLIP if family == "clip" else models.DiT
    return nnx.state(rundir.load_run_params(str(workdir), model_config, cls))


def test_checkpoint_from_8_devices_continues_on_2_with_the_same_losses(data_dir, tmp_path):
    uninterrupted = run(tiny("clip", data_dir, steps=5), tmp_path / "a")
    run(tiny("clip", data_dir, steps=3), tmp_path / "b")
    config = tiny("clip", data_dir, steps=5)
    config.mesh.update(data=2)
    training.train(config, str(tmp_path / "b"), devices=jax.devices()[:2])
    resumed = [r["loss"] for r in metrics.read_metrics(str(tmp_path / "b"))]
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5)


def test_metrics_jsonl_has_one_record_per_logging_step(data_dir, tmp_path):
    run(tiny("clip", data_dir, steps=5, log_every=2), tmp_path)
    steps = [r["step"] for r in metrics.read_metrics(str(tmp_path))]
    assert steps == [2, 4, 5]
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["training"]["num_steps"] == 5


@pytest.mark.slow
def test_two_processes_of_four_devices_train_like_one_process_of_eight(data_dir, tmp_path):
    """The real train.py on 2 jax.distributed processes (gloo over loopback) x 4 CPU devices."""
    import socket
    import subprocess
    import sys

    reference = run(tiny("clip", data_dir, steps=4), tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / "two"
    args = [
        sys.executable, "train.py", "--config=configs/base_clip.py", f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}", "--config.data.builder_config=16",
        "--config.data.num_train_examples=256", "--config.data.num_eval_examples=64",
        "--config.tokenizer.vocab_size=300", "--config.tokenizer.context_length=16",
        "--config.training.global_batch_size=16", "--config.training.num_steps=4",
        "--config.training.log_every=1", "--config.training.checkpoint_every=100",
        "--config.training.ema_decay=0.9", "--config.optimizer.warmup_steps=2",
        "--config.optimizer.learning_rate=1e-3", "--config.mesh.data=8",
        "--config.model.vision_depth=1", "--config.model.text_depth=1",  # tiny()'s one_block
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": xla_flags(4)}
    processes = [
        subprocess.Popen(
            [*args, f"--process_id={i}"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    losses = [r["loss"] for r in metrics.read_metrics(str(workdir))]
    # gloo's cross-process reductions round differently from in-process ones (~1e-7).
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    one, two = _load_params(tmp_path / "one"), _load_params(workdir)
    for (path, x), (_, y) in zip(_flat(one), _flat(two), strict=True):
        if path.endswith("key_bias"):
            # Softmax ignores a shift shared by all keys, so q.b_k has zero gradient: these
            # parameters only ever receive rounding noise, which Adam scales up. Not comparable.
            continue
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=path)


def _flat(state):
    from flax import nnx

    return [("/".join(map(str, p)), np.asarray(v.get_value())) for p, v in nnx.to_flat_state(state)]


def test_periodic_clip_retrieval_is_logged_and_equals_recall_of_the_exported_weights(
    data_dir, tmp_path
):
    from diffusion import evaluation

    config = tiny("clip", data_dir, steps=4, eval_every=2, eval_examples=32)
    run(config, tmp_path)
    records = {r["step"]: r for r in metrics.read_metrics(str(tmp_path))}
    key = "eval/image_to_text_recall@1"
    assert key in records[2] and key in records[4] and key not in records[3]
    # Truth: top-1 of the similarity matrix of the exported (EMA) weights, in NumPy; the top
    # item is a hit when its caption is the partner's.
    examples = evaluation.load_split_examples(config.data, config.seed, "test", 32)
    encoder = evaluation.ClipEncoder.load(str(tmp_path))
    similarity = encoder.encode_images(examples.images) @ encoder.encode_texts(examples.captions).T
    captions = np.array(examples.captions)
    truth_i2t = np.mean(captions[np.argmax(similarity, axis=1)] == captions)
    truth_t2i = np.mean(captions[np.argmax(similarity, axis=0)] == captions)
    assert records[4][key] == pytest.approx(truth_i2t, abs=1e-6)
    assert records[4]["eval/text_to_image_recall@1"] == pytest.approx(truth_t2i, abs=1e-6)


def test_periodic_dit_grid_shows_the_samples_of_the_exported_weights(data_dir, clip_run, tmp_path):
    from PIL import Image

    from diffusion.evaluation import report
    from diffusion.inference import TextToImage

    config = dit_config(data_dir, clip_run, steps=4, eval_every=2)
    config.sampling.steps = 3
    run(config, tmp_path)
    grids = sorted(os.listdir(tmp_path / "samples"))
    assert grids == ["step_2.png", "step_4.png"]
    prompts = list(config.sampling.prompts)
    images = TextToImage.from_run(str(tmp_path)).generate(
        [p for p in prompts for _ in range(4)],
        seeds=[k for _ in prompts for k in range(4)],
        sampler=config.sampling.sampler,
        steps=3,
        guidance_scale=config.sampling.guidance_scale,
    )
    expected = report.save_grid(images, str(tmp_path / "expected.png"), columns=4)
    logged = np.asarray(Image.open(tmp_path / "samples" / "step_4.png"))
    np.testing.assert_array_equal(logged, np.asarray(Image.open(expected)))


def test_sigmoid_loss_trains_a_learnable_siglip_bias(data_dir, tmp_path):
    from diffusion import models

    config = tiny("clip", data_dir, steps=3)
    config.loss.kind = "sigmoid"
    losses = run(config, tmp_path)
    assert np.all(np.isfinite(losses))
    family, model_config = rundir.load_model_config(str(tmp_path))
    assert family == "clip" and model_config.logit_bias_init == -10.0
    model = rundir.load_run_params(str(tmp_path), model_config, models.CLIP)
    bias = float(model.logit_bias[...])
    assert bias != -10.0 and abs(bias + 10.0) < 1.0  # moved by its gradient, a few lr steps


def test_hard_negative_captions_train_the_same_with_the_chunked_loss(data_dir, clip_run, tmp_path):
    losses = {}
    for chunked in (False, True):
        config = one_block(tiny("clip", data_dir, steps=3), text_depth=2)  # clip_run's model
        config.loss.negative_caption_attributes = ("shape", "color")
        config.loss.chunked = chunked
        losses[chunked] = run(config, tmp_path / str(chunked))
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    # Same initial weights and batch as clip_run's first step, plus one wrong caption per
    # image: the first loss can only be higher.
    assert losses[False][0] > metrics.read_metrics(clip_run)[0]["loss"]


def test_a_trained_tokenizer_warns_about_the_captions_its_context_cuts(data_dir, tmp_path, capsys):
    config = tiny("clip", data_dir)
    source, _ = inputs.prepare_source(config.data, config.seed)
    captions = inputs.read_captions(source, "train")
    config.tokenizer.context_length = 8
    tokenizer = inputs.prepare_tokenizer(config.tokenizer, source, "train", str(tmp_path / "a"))
    longest, distinct, cut = data_lib.longest_caption(tokenizer, captions, 8)
    assert cut > 0
    assert (
        f"warning: {cut} of {distinct} distinct captions are longer than "
        f"config.tokenizer.context_length=8 tokens (the longest has {longest})"
    ) in capsys.readouterr().out
    config.tokenizer.context_length = longest  # every caption whole: no warning
    inputs.prepare_tokenizer(config.tokenizer, source, "train", str(tmp_path / "b"))
    assert "warning" not in capsys.readouterr().out


def test_a_dit_reads_its_captions_with_its_text_encoders_tokenizer(data_dir, clip_run, tmp_path):
    config = dit_config(data_dir, clip_run, steps=3)
    config.tokenizer.path = None  # the recipe names no tokenizer ...
    config.tokenizer.vocab_size = 100  # ... and a BPE trained afresh would have 100 tokens
    run(config, tmp_path / "dit")
    own = data_lib.load_tokenizer(rundir.tokenizer_dir(str(tmp_path / "dit")))
    encoders = data_lib.load_tokenizer(rundir.tokenizer_dir(clip_run))
    assert len(encoders) > 100
    assert own.get_vocab() == encoders.get_vocab()

    config.tokenizer.context_length = 64  # the CLIP run reads 16 tokens
    with pytest.raises(UserError) as refused:
        run(config, tmp_path / "longer")
    assert "config.tokenizer.context_length=64 is longer than the 16 tokens" in str(refused.value)
    assert "--config.tokenizer.context_length=16" in str(refused.value)
    assert os.listdir(tmp_path / "longer") == []  # refused before anything is written
