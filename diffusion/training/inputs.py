"""A training run's inputs: the dataset (built when it is the embedded shapes), the tokenizer
(trained on the captions when the recipe names none) and what they tell the model builder."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from diffusion import data as data_lib
from diffusion import distributed, rundir
from diffusion.data import input_pipeline, latents, selection, sources
from diffusion.data.classes import ClassSpace
from diffusion.errors import UserError
from diffusion.families import DataFacts
from diffusion.families import dit as dit_family


def _prepared_once(build, what: str):
    """`build()` on process 0 first, the others after it: one writer, the others open what it
    wrote."""
    if jax.process_index() == 0:
        builder = build()
    distributed.barrier(f"{what} dataset prepared")
    if jax.process_index() != 0:
        builder = build()
    return builder


def prepare_source(data_config, seed: int) -> tuple[data_lib.SourceConfig, Any]:
    """Builds the embedded shapes or moving_shapes dataset if missing (other datasets must be
    prepared) -> source, builder. A record filter (data_config.where) is checked against the
    dataset's ClassLabels here, before any run starts."""
    sizes = dict(
        num_train=data_config.num_train_examples,
        num_test=data_config.num_eval_examples,
        num_test_unseen=data_config.num_eval_examples,
        seed=seed,
    )
    if data_config.name == "shapes":
        resolution = rundir.builder_resolution(data_config) or 32
        build = lambda: data_lib.build_dataset("shapes", data_config.data_dir, resolution, **sizes)
        builder = _prepared_once(build, "shapes")
        name = data_lib.tfds_name(builder)
    elif data_config.name == "moving_shapes":
        sources.moving_shapes_size(data_config.builder_config)  # a bad name fails on every process
        build = lambda: sources.build_moving_shapes(
            data_config.data_dir, data_config.builder_config, **sizes
        )
        builder = _prepared_once(build, "moving_shapes")
        name = data_lib.tfds_name(builder)
    else:
        name = data_config.name
        if data_config.builder_config:
            name = f"{name}/{data_config.builder_config}"
        builder = data_lib.build_dataset(name, data_config.data_dir)
    encoding = latents.encoding_of(builder.data_dir, list(builder.info.features))
    source = data_lib.SourceConfig(
        name=name,
        data_dir=data_config.data_dir,
        image_key=latents.MEAN_KEY if encoding is not None else data_config.image_key,
        latents=encoding,
        caption_key=data_config.caption_key,
        label_key=data_config.label_key,
        caption_template=data_config.caption_template,
        where=data_config.get("where") or "",  # absent from the configs of older runs
    )
    selection.label_conditions(source.where, builder.info.features, name)
    return source, builder


def read_captions(source, split: str) -> list[str]:
    """Every caption of a split (as the input pipeline makes them), for training a tokenizer."""
    reader = sources.open_source(source, split)
    decode = input_pipeline.BatchDecoder(reader, source, tokenizer=None, context_length=2)
    captions = []
    for start in range(0, len(reader), 4096):
        records = reader.read(list(range(start, min(start + 4096, len(reader)))))
        captions.extend(decode.caption(record) for record in records)
    return captions


def prepare_tokenizer(tokenizer_config, source, split: str, directory: str):
    """The configured tokenizer, or a BPE trained on the split's captions and saved once."""
    if tokenizer_config.path:
        return data_lib.load_tokenizer(tokenizer_config.path)
    saved = os.path.isfile(os.path.join(directory, "tokenizer_config.json"))
    if jax.process_index() == 0 and not saved:  # the run directory is shared by all processes
        captions = read_captions(source, split)
        tokenizer = data_lib.train_caption_tokenizer(
            captions, directory, tokenizer_config.vocab_size
        )
        print(f"trained a {len(tokenizer)}-token BPE on {len(captions)} captions -> {directory}")
        context = tokenizer_config.context_length
        longest, distinct, cut = data_lib.longest_caption(tokenizer, captions, context)
        if cut:  # a context sized to the data (configs/shapes.py) must not silently cut captions
            print(
                f"warning: {cut} of {distinct} distinct captions are longer than "
                f"config.tokenizer.context_length={context} tokens (the longest has {longest}) "
                f"and are cut; --config.tokenizer.context_length={longest} keeps them whole.",
                flush=True,
            )
    distributed.barrier("tokenizer ready")
    return data_lib.load_tokenizer(directory)


def frames_of(source, builder) -> int:
    """Frames per clip of a dataset of clips (its input feature is (T, H, W, C)); 0 for images."""
    feature = builder.info.features[source.image_key]
    return int(feature.shape[0]) if input_pipeline.input_key_of(feature) == "video" else 0


def image_shape_of(config, source, builder) -> tuple[int, int]:
    """(side, channels) of the model's inputs: the dataset's images or the frames of its clips
    (3 channels for uint8 ones, as the input pipeline makes them), or its latents (as stored),
    checked against config.model.in_channels where the recipe sets that."""
    features = builder.info.features
    key = source.image_key
    if key not in features:
        raise UserError(
            f"config.data.image_key={key!r} is not a feature of {source.name!r};"
            f" set it to one of {sorted(features)}."
        )
    feature = features[key]
    is_float = np.issubdtype(np.dtype(getattr(feature, "np_dtype", np.uint8)), np.floating)
    channels = feature.shape[-1] if is_float else 3
    wanted = config.model.get("in_channels")
    if wanted is not None and int(wanted) != channels:
        raise UserError(
            f"config.model.in_channels={wanted}, but {key!r} of {source.name!r} gives "
            f"{channels}-channel inputs (feature shape {feature.shape}); pass "
            f"--config.model.in_channels={channels}."
        )
    return int(feature.shape[-3]), int(channels)  # (H, W, C) or (T, H, W, C)


def class_space(config, builder, source_name: str, class_features) -> ClassSpace:
    """The classes of a class-conditional recipe, checked against config.model.num_classes."""
    classes = ClassSpace.from_features(builder.info.features, class_features, source_name)
    wanted = int(config.model.num_classes)
    if wanted != classes.num_classes:
        sizes = " x ".join(f"{n} {f}" for f, n in zip(classes.features, classes.sizes, strict=True))
        raise UserError(
            f"config.model.num_classes={wanted}, but the class features {classes.features} of "
            f"{source_name!r} give {sizes} = {classes.num_classes} classes. Pass "
            f"--config.model.num_classes={classes.num_classes}, or choose other features "
            "(config.data.class_features, or config.data.label_key)."
        )
    return classes


def cached_text(config, source, builder, tokenizer) -> dict[str, np.ndarray] | None:
    """The empty caption's cached text features where a text-conditional DiT trains on a dataset
    that holds them (encode.py --text_encoder), checked to come from the DiT's own text encoder,
    tokenizer (which sampling will use) and context length; None where the text tower runs in
    the train step."""
    encoding = source.latents
    if config.family != "dit" or encoding is None or encoding.text_encoder is None:
        return None
    if int(config.model.num_classes) != 0:  # class-conditional: reads no text
        return None
    dataset, made_with = builder.data_dir, encoding.text_encoder
    wanted = config.text_encoder.checkpoint
    if not wanted or os.path.realpath(wanted) != os.path.realpath(made_with):
        raise UserError(
            f"config.text_encoder.checkpoint={wanted!r}, but the text features cached in "
            f"{dataset} were made with the text encoder {made_with!r}. Pass "
            f"--config.text_encoder.checkpoint={made_with}, or encode the dataset again with "
            f"encode.py --text_encoder={wanted}."
        )
    made_at, now = encoding.text_encoder_step, rundir.latest_step(wanted)
    if made_at is not None and now != made_at:
        raise UserError(
            f"the text features cached in {dataset} were made by step {made_at} of the text "
            f"encoder {made_with!r}, which has since trained to step {now}: the DiT would learn "
            "features its sampling tower no longer computes. Encode the dataset again (encode.py "
            f"--text_encoder={made_with} --output_dir=NEW_DIR), or train on a dataset encoded "
            "without --text_encoder (the tower then runs in the step)."
        )
    length = int(config.tokenizer.context_length)
    if encoding.text_context_length != length:
        raise UserError(
            f"config.tokenizer.context_length={length}, but the text features cached in "
            f"{dataset} hold {encoding.text_context_length} tokens a caption. Pass "
            f"--config.tokenizer.context_length={encoding.text_context_length}."
        )
    if data_lib.vocabulary_digest(tokenizer) != encoding.text_vocabulary:
        raise UserError(
            f"the text features cached in {dataset} were made with the tokenizer "
            f"{encoding.text_tokenizer!r}, but this DiT's tokenizer (config.tokenizer.path="
            f"{config.tokenizer.path!r}) has another vocabulary, so its samples would read "
            f"other token ids. Pass --config.tokenizer.path={encoding.text_tokenizer}."
        )
    if config.model.get("word_conditioning", False) and not encoding.text_words:
        raise UserError(
            f"config.model.word_conditioning=True reads the text tower's word embeddings, but "
            f"the text features cached in {dataset} hold none. Encode the dataset again with "
            "encode.py --text_encoder --text_words, or pass --config.model.word_conditioning=False."
        )
    return latents.read_empty_text(dataset, encoding.text_keys)


def check_stated_cached_text(config, dataset: str, empty_text) -> None:
    """A DiT recipe that states whether its data carries cached text features
    (config.data.cached_text, what --aot_topology compiles for) must be right about the dataset
    it trains on: else the step that trains is not the one its AOT report measured.
    `empty_text`: what `cached_text` found (None: no cached features)."""
    if config.family != "dit":
        return
    stated = dit_family.stated_cached_text(config)
    if stated is None or not dit_family.is_text_conditional(config):
        return
    if stated and empty_text is None:
        raise UserError(
            f"config.data.cached_text=True states that the records of {dataset} carry cached "
            "text features, but they hold none, so the train step would run the text tower. "
            "Encode the dataset with encode.py --text_encoder=CHECKPOINT (the CLIP of "
            "config.text_encoder.checkpoint), or pass --config.data.cached_text=false."
        )
    if not stated and empty_text is not None:
        raise UserError(
            f"config.data.cached_text=False states that the records of {dataset} carry no cached "
            "text features, but they do, and the train step reads them instead of running the "
            "text tower. Pass --config.data.cached_text=true."
        )


def data_facts(
    config,
    tokenizer,
    image_size: int,
    channels: int = 3,
    empty_text: dict[str, np.ndarray] | None = None,
    frames: int = 0,
) -> DataFacts:
    """What the model builder needs of the data and tokenizer (None: a model without text);
    `empty_text`: the empty caption's cached text features (`cached_text`), if any; `frames`:
    frames per clip of a dataset of clips (0: images)."""
    if tokenizer is None:
        return dataclasses.replace(
            DataFacts.without_text(image_size), image_channels=channels, frames=frames
        )
    length = config.tokenizer.context_length
    empty_tokens, empty_mask = data_lib.tokenize(tokenizer, [""], length)
    return DataFacts(
        image_size=int(image_size),
        vocab_size=len(tokenizer),
        context_length=int(length),
        empty_tokens=empty_tokens,
        empty_mask=empty_mask,
        image_channels=int(channels),
        empty_text=empty_text,
        frames=int(frames),
    )
