"""encode.py --text_encoder (diffusion.encoding.text_features): each caption's features under a
frozen CLIP text tower, cached beside its latents, and the DiT that trains on them.

Truths: a record's cached features are the tower's features of its caption computed directly (one
compiled program, as the train step runs it); a DiT on the cached features gives the per-step
losses of the same DiT running the tower in its step on the same latents; a stopped job resumes
to the bytes of an uninterrupted one.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import test_encode
from conftest import one_block, single_device_env
from flax import nnx
from test_encode import NUM, REPO, _files, _shards, sigterm_after_the_first_shard

from diffusion import config as config_lib
from diffusion import data as data_lib
from diffusion import encoding, inference, rundir, training
from diffusion.data import latents as latents_lib
from diffusion.data.tokenizer import tokenize
from diffusion.errors import UserError

diffusers_autoencoder = test_encode.diffusers_autoencoder  # the fixtures of test_encode.py
encoded = test_encode.encoded


@pytest.fixture(scope="module")
def clip_run(encoded, tmp_path_factory):
    """A tiny CLIP trained one step on the encoded images' source (its BPE on their captions)."""
    _, config, _ = encoded
    clip = config_lib.load_config(os.path.join(REPO, "configs", "base_clip.py"))
    clip.data.update(data_dir=config.data_dir, builder_config="16", **NUM)
    clip.tokenizer.update(vocab_size=300, context_length=16)
    one_block(clip).model.update(variant="tiny", dtype="float32")
    clip.training.update(global_batch_size=8, num_steps=1, eval_every=0)
    clip.optimizer.warmup_steps = 0
    workdir = str(tmp_path_factory.mktemp("clip"))
    training.train(clip, workdir)
    return workdir


@pytest.fixture(scope="module")
def encoded_text(encoded, diffusers_autoencoder, clip_run, tmp_path_factory):
    """The `encoded` job with the CLIP's text features (and word embeddings) of each caption."""
    _, config, options = encoded
    options = dataclasses.replace(
        options,
        output_dir=str(tmp_path_factory.mktemp("encode_text")),
        text_encoder=clip_run,
        text_words=True,
    )
    dataset_dir = encoding.encode_dataset(diffusers_autoencoder[0], config, 0, options)
    return dataset_dir, config, options


def test_cached_text_features_are_the_text_towers_of_each_caption(encoded, encoded_text, clip_run):
    from diffusion.families import dit

    dataset_dir, _, options = encoded_text
    info = encoding.read_encoding(dataset_dir)
    assert info["text_encoder"] == os.path.abspath(clip_run)
    assert info["text_tokenizer"] == rundir.tokenizer_dir(clip_run)
    assert info["text_context_length"] == 16 and info["text_words"]
    tokenizer = rundir.load_tokenizer(clip_run, rundir.load_run_config(clip_run))
    assert info["text_vocabulary"] == data_lib.vocabulary_digest(tokenizer)
    with open(os.path.join(dataset_dir, "plan.json")) as f:
        assert json.load(f)["text_encoder"] == os.path.abspath(clip_run)
    graphdef, state = nnx.split(rundir.load_text_encoder(clip_run, {"dtype": "float32"}))
    # One compiled program, as the train step runs the tower (eager op-by-op rounds otherwise).
    features = jax.jit(
        lambda tokens, mask: dit.text_condition(
            nnx.merge(graphdef, state), tokens, mask, words=True
        )
    )
    builder = tfds.builder_from_directory(dataset_dir)
    plain = tfds.builder_from_directory(encoded[0])
    keys = latents_lib.text_keys(True)
    for split, index in (("train", 0), ("train", 39), ("test", 5)):
        record = builder.as_data_source(split=split)[index]
        without = plain.as_data_source(split=split)[index]
        for key, value in without.items():  # the latents and every other feature are the same
            np.testing.assert_array_equal(record[key], value, err_msg=key)
        tokens, mask = tokenize(tokenizer, [record["caption"].decode("utf-8")], 16)
        want = features(tokens, mask)
        names = ("context", "context_mask", "pooled", "words")
        for key, name in zip(keys, names, strict=True):
            np.testing.assert_allclose(record[key], np.asarray(want[name])[0], atol=1e-6)
    tokens, mask = tokenize(tokenizer, [""], 16)
    want = features(tokens, mask)
    empty = latents_lib.read_empty_text(dataset_dir, keys)
    for key, name in zip(keys, ("context", "context_mask", "pooled", "words"), strict=True):
        np.testing.assert_allclose(empty[key], np.asarray(want[name])[0], atol=1e-6)


def text_dit_config(options, clip_run, steps=3):
    config = config_lib.load_config(os.path.join(REPO, "configs", "base_dit.py"))
    config.data.update(name="shapes_latents", data_dir=options.output_dir, builder_config=None)
    config.tokenizer.update(path=rundir.tokenizer_dir(clip_run), context_length=16)
    config.text_encoder.checkpoint = clip_run
    config.model.update(patch_size=2, depth=1, word_conditioning=True)
    config.diffusion.cond_dropout = 0.5  # both kinds of example in every batch
    config.training.update(global_batch_size=8, num_steps=steps, log_every=1, eval_every=0)
    config.optimizer.warmup_steps = 1
    return config


def test_a_dit_on_cached_text_features_trains_as_one_running_the_text_tower(
    encoded, encoded_text, clip_run, tmp_path, monkeypatch
):
    """The same per-step losses from the cached features (the tower absent from the step) as
    from the tower run in the step on the same latents."""
    from diffusion import metrics
    from diffusion.families import dit

    losses = {}
    for name, (_, _, options) in (("tower", encoded), ("cached", encoded_text)):
        if name == "cached":  # the text tower must not run

            def no_tower(*args, **kwargs):
                raise AssertionError("the text tower ran on cached features")

            monkeypatch.setattr(dit, "text_condition", no_tower)
        workdir = str(tmp_path / name)
        training.train(text_dit_config(options, clip_run), workdir)
        losses[name] = [r["loss"] for r in metrics.read_metrics(workdir)]
    assert len(losses["cached"]) == 3
    np.testing.assert_allclose(losses["cached"], losses["tower"], rtol=1e-5)
    # The run still names its text encoder, which sampling runs.
    monkeypatch.undo()
    cached = str(tmp_path / "cached")
    assert rundir.load_run_config(cached).text_encoder.checkpoint == os.path.abspath(clip_run)
    images = inference.TextToImage.from_run(cached).generate(
        ["a red circle"], seeds=[0], sampler="euler", steps=1
    )
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8


def test_a_dit_whose_text_encoder_did_not_make_the_cached_features_is_refused(
    encoded_text, clip_run, tmp_path
):
    _, _, options = encoded_text
    other = str(tmp_path / "other_clip")
    shutil.copytree(clip_run, other)
    config = text_dit_config(options, other)
    with pytest.raises(UserError) as refused:
        training.train(config, str(tmp_path / "dit"))
    message = str(refused.value)
    assert other in message and os.path.abspath(clip_run) in message
    assert f"--config.text_encoder.checkpoint={os.path.abspath(clip_run)}" in message
    config = text_dit_config(options, clip_run)
    config.tokenizer.context_length = 12
    with pytest.raises(UserError, match="context_length=12, but the text features .* hold 16"):
        training.train(config, str(tmp_path / "dit2"))
    config = text_dit_config(options, clip_run)
    config.tokenizer.path = str(tmp_path / "other_tokenizer")  # ids the features never saw
    data_lib.train_caption_tokenizer(["a red circle", "a blue square"], config.tokenizer.path)
    tokenizer = rundir.tokenizer_dir(clip_run)
    with pytest.raises(UserError, match=f"another vocabulary.*--config.tokenizer.path={tokenizer}"):
        training.train(config, str(tmp_path / "dit4"))
    # A cache without word embeddings, for a DiT that reads them.
    dataset_dir = encoded_text[0]
    copy = tmp_path / "data" / "shapes_latents" / "1.0.0"
    shutil.copytree(dataset_dir, copy)
    info = encoding.read_encoding(dataset_dir)
    (copy / "encoding.json").write_text(json.dumps(dict(info, text_words=False)))
    config = text_dit_config(
        dataclasses.replace(options, output_dir=str(tmp_path / "data")), clip_run
    )
    with pytest.raises(
        UserError, match="word_conditioning=True .* encode.py --text_encoder --text_words"
    ):
        training.train(config, str(tmp_path / "dit3"))


def test_a_finished_text_job_is_refused_once_its_clip_run_trained_further(
    encoded_text, diffusers_autoencoder, clip_run, tmp_path
):
    """The CLIP run's newest checkpoint is in the plan: trained further (the same path, other
    weights), its run makes other features, so the dataset of the earlier ones is refused on
    rerun (as the pipeline's encode stage reruns it), not kept as complete, and a DiT is not
    trained on them (train.py outside the pipeline)."""
    dataset_dir, config, options = encoded_text
    assert encoding.read_encoding(dataset_dir)["text_encoder_step"] == rundir.latest_step(clip_run)
    before = _files(dataset_dir)
    later = os.path.join(clip_run, rundir.CHECKPOINTS_DIR, "1000")  # what more training adds
    os.makedirs(later)
    try:
        with pytest.raises(encoding.PlanChanged, match=r"differs in \['text_encoder_step'\]"):
            encoding.encode_dataset(diffusers_autoencoder[0], config, 0, options)
        with pytest.raises(UserError, match="made by step .* which has since trained to step 1000"):
            training.train(text_dit_config(options, clip_run), str(tmp_path / "dit"))
        assert not os.path.exists(tmp_path / "dit" / "checkpoints")
    finally:
        os.rmdir(later)
    assert _files(dataset_dir) == before


def test_a_stopped_text_job_resumes_to_the_bytes_of_an_uninterrupted_one(
    encoded_text, diffusers_autoencoder, tmp_path, monkeypatch
):
    """The SIGTERM test of test_encode.py with text features: stopped after its 1st shard, the
    same call finishes it with the bytes of the uninterrupted job (empty_caption.npz included)."""
    dataset_dir, config, options = encoded_text
    options = dataclasses.replace(options, output_dir=str(tmp_path))
    sigterm_after_the_first_shard(monkeypatch)
    with training.PreemptionGuard() as preemption:
        with pytest.raises(encoding.EncodingStopped):
            encoding.encode_dataset(
                diffusers_autoencoder[0], config, 0, options, lambda: preemption.requested
            )
    root = tmp_path / "shapes_latents" / "1.0.0"
    assert len(_shards(root)) == 1 and not (root / "encoding.json").exists()
    monkeypatch.undo()
    assert encoding.encode_dataset(diffusers_autoencoder[0], config, 0, options) == str(root)
    assert _files(root) == _files(dataset_dir)


def test_a_hugging_face_clip_directory_as_text_encoder_stores_transformers_features(
    encoded, diffusers_autoencoder, tmp_path
):
    """encode.py --text_encoder=DIR --text_words with DIR a transformers CLIPModel saved with its
    tokenizer (the layout of the hub's openai/clip-*): each record's features are transformers'
    own of its caption, run in PyTorch float32 on the ids and mask of the directory's tokenizer."""
    import torch
    from test_hf import HF_CONFIGS, make_tokenizer, save_hf_clip

    _, config, options = encoded
    plain = tfds.builder_from_directory(encoded[0])  # its records keep the source's captions
    captions = {
        split: [r["caption"].decode("utf-8") for r in plain.as_data_source(split=split)]
        for split in ("train", "test")
    }
    tokenizer = make_tokenizer(captions["train"] + captions["test"])  # their words: no <unk>
    clip = str(tmp_path / "hf_clip")
    # A context longer than any caption: the job's ids are then the tokenizer's own, untruncated.
    model = save_hf_clip(
        clip, HF_CONFIGS["quick_gelu"], vocab_size=len(tokenizer), context_length=24
    )
    tokenizer.save_pretrained(clip)
    options = dataclasses.replace(
        options, output_dir=str(tmp_path / "latents"), text_encoder=clip, text_words=True
    )
    dataset_dir = encoding.encode_dataset(diffusers_autoencoder[0], config, 0, options)
    info = encoding.read_encoding(dataset_dir)
    assert (info["text_encoder"], info["text_tokenizer"]) == (clip, clip)
    assert info["text_context_length"] == 24 and info["text_words"]
    assert info["text_encoder_step"] is None  # a directory's weights, not a run's checkpoint
    builder = tfds.builder_from_directory(dataset_dir)
    for split, texts in captions.items():
        records = builder.as_data_source(split=split)
        batch = tokenizer(texts, padding="max_length", max_length=24, return_tensors="pt")
        assert batch["input_ids"].shape[1] == 24 and (batch["attention_mask"] == 0).any()
        with torch.no_grad():
            out = model.text_model(**batch)
            want = {
                "text_context": out.last_hidden_state,
                "text_pooled": model.text_projection(out.pooler_output),
                "text_words": model.text_model.embeddings(input_ids=batch["input_ids"]),
            }
        for row, text in enumerate(texts):
            record = records[row]
            assert record["caption"].decode("utf-8") == text
            np.testing.assert_array_equal(record["text_mask"], batch["attention_mask"][row])
            for key, value in want.items():
                assert record[key].dtype == np.float32
                np.testing.assert_allclose(record[key], value[row].numpy(), atol=1e-5, err_msg=key)


def test_encode_py_refuses_text_words_without_a_text_encoder(tmp_path):
    command = [
        sys.executable, "encode.py", "--config=configs/base_clip.py", "--autoencoder=ae",
        f"--output_dir={tmp_path}", "--text_words",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env=single_device_env(), capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--text_words needs --text_encoder=DIR" in result.stderr
    assert "Traceback" not in result.stderr
