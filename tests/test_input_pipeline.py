"""The grain input pipeline over TFDS data sources (diffusion/data/input_pipeline.py)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import AxisType, PartitionSpec

import diffusion.data  # noqa: F401  (registers "shapes")
from diffusion.data import input_pipeline, shapes, sources, tokenizer

NUM_TRAIN = 100
CONTEXT_LENGTH = 24


@pytest.fixture(scope="module")
def shapes_source(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = sources.build_dataset(
        data_dir=data_dir, resolution=16, num_train=NUM_TRAIN, num_test=20, num_test_unseen=12
    )
    return sources.SourceConfig(name=sources.tfds_name(builder), data_dir=data_dir)


@pytest.fixture(scope="module")
def caption_tokenizer(tmp_path_factory):
    captions = [ex["caption"] for _, ex in shapes.generate_examples("train", 1000, 16, seed=0)]
    return tokenizer.train_caption_tokenizer(captions, tmp_path_factory.mktemp("tok"), 600)


def _pipeline(source, tok, **overrides):
    arguments = dict(
        split="train",
        global_batch_size=8,
        seed=0,
        context_length=CONTEXT_LENGTH,
        process_index=0,
        process_count=1,
    )
    arguments.update(overrides)
    return input_pipeline.make_input_pipeline(source, tok, **arguments)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _image_keys(batches):
    """One hashable identity per example: its image bytes (jittered, so unique)."""
    return [image.tobytes() for batch in batches for image in batch["image"]]


def _tfds_records(source, split="train"):
    builder = tfds.builder(source.name, data_dir=source.data_dir)
    data_source = builder.as_data_source(split=split)
    return builder, [data_source[i] for i in range(len(data_source))]


def test_batches_match_tfds_decoding(shapes_source, caption_tokenizer):
    builder, records = _tfds_records(shapes_source)
    batches = _take(_pipeline(shapes_source, caption_tokenizer, shuffle=False), 2)
    batch = batches[1]  # records 8..15 in order when not shuffled
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 16, 16, 3)
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (8, CONTEXT_LENGTH)
    assert set(batch) == {"image", "tokens", "mask", *shapes_labels()}
    for row, record in enumerate(records[8:16]):
        expected_image = record["image"].astype(np.float64) / 127.5 - 1.0  # [-1, 1]
        np.testing.assert_allclose(batch["image"][row], expected_image, atol=1e-6)
        for key in shapes_labels():
            assert batch[key][row] == record[key]
        tokens, mask = tokenizer.tokenize(caption_tokenizer, [record["caption"].decode()], 24)
        np.testing.assert_array_equal(batch["tokens"][row], tokens[0])
        np.testing.assert_array_equal(batch["mask"][row], mask[0])
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def shapes_labels():
    return ("shape", "color", "size", "position", "background")


def test_two_processes_read_disjoint_shards_that_cover_the_split(shapes_source, caption_tokenizer):
    _, records = _tfds_records(shapes_source)
    everything = {(r["image"].astype(np.float32) / 127.5 - 1.0).tobytes() for r in records}
    shards = []
    for process_index in range(2):
        # 50 records per process, local batches of 5 (global 10): one epoch, nothing dropped.
        iterator = _pipeline(
            shapes_source,
            caption_tokenizer,
            global_batch_size=10,
            num_epochs=1,
            process_index=process_index,
            process_count=2,
        )
        batches = list(iterator)
        assert len(batches) == 10 and batches[0]["image"].shape[0] == 5
        shards.append(_image_keys(batches))
    assert len(set(shards[0])) == len(shards[0]) == 50
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == everything


def test_global_batches_do_not_depend_on_the_number_of_processes(shapes_source, caption_tokenizer):
    single = _pipeline(shapes_source, caption_tokenizer, global_batch_size=12)
    pair = [
        _pipeline(
            shapes_source,
            caption_tokenizer,
            global_batch_size=12,
            process_index=index,
            process_count=2,
        )
        for index in range(2)
    ]
    for _ in range(12):  # past the end of the first epoch of 100 records
        whole = next(single)
        halves = [next(iterator) for iterator in pair]
        for key in whole:
            np.testing.assert_array_equal(
                np.concatenate([h[key] for h in halves]), whole[key], err_msg=key
            )


def test_same_seed_same_batches_other_seed_other_order(shapes_source, caption_tokenizer):
    first = _take(_pipeline(shapes_source, caption_tokenizer, seed=3), 4)
    again = _take(_pipeline(shapes_source, caption_tokenizer, seed=3), 4)
    other = _take(_pipeline(shapes_source, caption_tokenizer, seed=4), 4)
    _assert_same_batches(first, again)
    assert _image_keys(first) != _image_keys(other)


def test_each_epoch_is_a_new_permutation_of_the_split(shapes_source, caption_tokenizer):
    batches = list(_pipeline(shapes_source, caption_tokenizer, global_batch_size=10, num_epochs=2))
    keys = _image_keys(batches)
    first_epoch, second_epoch = keys[:NUM_TRAIN], keys[NUM_TRAIN:]
    assert len(set(first_epoch)) == NUM_TRAIN and set(first_epoch) == set(second_epoch)
    assert first_epoch != second_epoch  # reshuffled with seed + epoch


def test_restored_state_continues_exactly_like_an_uninterrupted_run(
    shapes_source, caption_tokenizer
):
    # 100 records / 16 per batch: the 7th batch runs across the epoch boundary.
    uninterrupted = _take(_pipeline(shapes_source, caption_tokenizer, global_batch_size=16), 9)
    interrupted = _pipeline(shapes_source, caption_tokenizer, global_batch_size=16)
    _assert_same_batches(_take(interrupted, 4), uninterrupted[:4])
    saved = json.dumps(interrupted.get_state())  # what a checkpoint would store
    _take(interrupted, 2)  # progress after the save is lost in the "crash"
    resumed = _pipeline(shapes_source, caption_tokenizer, global_batch_size=16)
    resumed.set_state(json.loads(saved))
    _assert_same_batches(_take(resumed, 5), uninterrupted[4:])


def test_caption_template_over_label_names_and_other_fields(shapes_source, caption_tokenizer):
    source = sources.SourceConfig(
        name=shapes_source.name,
        data_dir=shapes_source.data_dir,
        label_key="shape",
        caption_template="a {color} {label} on {background}",
    )
    batch = next(_pipeline(source, caption_tokenizer, shuffle=False, split="test_unseen"))
    builder, records = _tfds_records(shapes_source, "test_unseen")
    features = builder.info.features
    for row, record in enumerate(records[:8]):
        names = {k: features[k].int2str(int(record[k])) for k in ("color", "shape", "background")}
        expected = f"a {names['color']} {names['shape']} on {names['background']}"
        tokens = batch["tokens"][row][batch["mask"][row] == 1]
        assert caption_tokenizer.decode(tokens, skip_special_tokens=True) == expected


def test_mock_cifar10_with_label_template(caption_tokenizer):
    source = sources.SourceConfig(name="cifar10", label_key="label")  # "a photo of a {label}"
    with tfds.testing.mock_data(num_examples=12):
        builder = tfds.builder("cifar10")
        records = builder.as_data_source(split="train")
        batch = next(_pipeline(source, caption_tokenizer, shuffle=False, global_batch_size=4))
        expected = [records[i] for i in range(4)]
    assert set(batch) == {"image", "tokens", "mask", "label"}
    names = builder.info.features["label"]
    for row, record in enumerate(expected):
        np.testing.assert_allclose(
            batch["image"][row], record["image"].astype(np.float64) / 127.5 - 1.0, atol=1e-6
        )
        assert batch["label"][row] == record["label"]
        tokens = batch["tokens"][row][batch["mask"][row] == 1]
        caption = f"a photo of a {names.int2str(int(record['label']))}"
        assert caption_tokenizer.decode(tokens, skip_special_tokens=True) == caption


def test_mock_shapes_with_caption_key(caption_tokenizer):
    with tfds.testing.mock_data(num_examples=6):
        batch = next(
            _pipeline(sources.SourceConfig(name="shapes"), caption_tokenizer, global_batch_size=6)
        )
    assert batch["image"].shape == (6, 32, 32, 3)
    assert batch["tokens"].shape == (6, CONTEXT_LENGTH)
    assert (batch["tokens"][:, 0] == caption_tokenizer.bos_token_id).all()
    assert set(shapes_labels()) <= set(batch)


def test_bad_inputs_raise_clear_errors(shapes_source, caption_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown TFDS dataset 'cifar1O'.*cifar10"):
        _pipeline(sources.SourceConfig(name="cifar1O"), caption_tokenizer)
    with pytest.raises(ValueError, match=r"Split 'validation'.*\['train', 'test', 'test_unseen'\]"):
        _pipeline(shapes_source, caption_tokenizer, split="validation")
    templated = sources.SourceConfig(
        name=shapes_source.name, data_dir=shapes_source.data_dir, caption_template="a {colour}"
    )
    with pytest.raises(ValueError, match=r"field 'colour'.*'background', 'caption', 'color'"):
        _pipeline(templated, caption_tokenizer)
    with pytest.raises(ValueError, match="image_key 'img'"):
        _pipeline(
            sources.SourceConfig(
                name=shapes_source.name, data_dir=shapes_source.data_dir, image_key="img"
            ),
            caption_tokenizer,
        )
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        _pipeline(shapes_source, caption_tokenizer, global_batch_size=8, process_count=3)
    with pytest.raises(ValueError, match="not prepared"):
        _pipeline(sources.SourceConfig(name="shapes/16", data_dir=str(tmp_path)), caption_tokenizer)


@pytest.fixture(scope="module")
def twins_source(tmp_path_factory):
    # 1500 records over 432 (color, size, position, background) groups: most have shape twins.
    data_dir = str(tmp_path_factory.mktemp("tfds_twins"))
    builder = sources.build_dataset(
        data_dir=data_dir, resolution=16, num_train=1500, num_test=8, num_test_unseen=8
    )
    return sources.SourceConfig(name=sources.tfds_name(builder), data_dir=data_dir)


LABELS = ("background", "color", "position", "shape", "size")


def _label_rows(batch):
    return np.stack([batch[k] for k in LABELS], axis=1)  # (b, 5)


def test_hard_negative_rows_are_shuffled_anchors_each_followed_by_a_twin(
    twins_source, caption_tokenizer
):
    all_labels = np.concatenate(
        [
            _label_rows(b)
            for b in _pipeline(twins_source, caption_tokenizer, num_epochs=1, shuffle=False)
        ]
    )
    shape = LABELS.index("shape")
    others = np.delete(all_labels, shape, axis=1)

    def has_twin(row):  # brute force over the split: the independent truth
        same_others = (others == np.delete(row, shape)).all(axis=1)
        return bool((same_others & (all_labels[:, shape] != row[shape])).any())

    plain = _take(_pipeline(twins_source, caption_tokenizer, global_batch_size=4, seed=5), 15)
    paired = _take(
        _pipeline(
            twins_source,
            caption_tokenizer,
            seed=5,
            hard_negative_attributes=("shape",),
        ),
        15,
    )
    anchors = np.concatenate([_label_rows(b)[0::2] for b in paired])
    twins = np.concatenate([_label_rows(b)[1::2] for b in paired])
    # The even rows are exactly the plain shuffled order (an epoch covers each record once).
    np.testing.assert_array_equal(anchors, np.concatenate([_label_rows(b) for b in plain]))
    found = 0
    for anchor, twin in zip(anchors, twins, strict=True):
        if has_twin(anchor):
            found += 1
            assert twin[shape] != anchor[shape]
            np.testing.assert_array_equal(np.delete(twin, shape), np.delete(anchor, shape))
    assert found >= len(anchors) // 2  # the property was exercised, not vacuous
    # The captions say so: the pair's captions differ in the shape word.
    first = paired[0]
    assert not np.array_equal(first["tokens"][0], first["tokens"][1])
    # Resuming mid-run draws the same twins.
    interrupted = _pipeline(
        twins_source, caption_tokenizer, seed=5, hard_negative_attributes=("shape",)
    )
    _take(interrupted, 3)
    resumed = _pipeline(
        twins_source, caption_tokenizer, seed=5, hard_negative_attributes=("shape",)
    )
    resumed.set_state(json.loads(json.dumps(interrupted.get_state())))
    _assert_same_batches(_take(resumed, 4), paired[3:7])


def test_a_record_without_a_twin_gets_another_record_never_itself():
    # Columns (color, shape). Record 0 is the only red one: no record differs from it in shape
    # alone. Records 1 and 2 are shape twins of each other.
    labels = np.array([[0, 0], [1, 0], [1, 1]])
    for seed in range(50):  # many draws of the fallback
        finder = input_pipeline.TwinFinder(labels, ("color", "shape"), ("shape",), seed=seed)
        pairs = finder(np.array([0, 1, 2])).reshape(-1, 2)
        assert pairs[0, 1] != 0
        assert pairs[1, 1] == 2 and pairs[2, 1] == 1


def test_hard_negative_bad_inputs(twins_source, caption_tokenizer):
    with pytest.raises(ValueError, match=r"\['hue'\] are not ClassLabel.*'shape'"):
        _pipeline(twins_source, caption_tokenizer, hard_negative_attributes=("hue",))
    with pytest.raises(ValueError, match="multiple of 2 x process_count = 4"):
        _pipeline(
            twins_source,
            caption_tokenizer,
            global_batch_size=6,
            process_count=2,
            hard_negative_attributes=("shape",),
        )


def _decoded(tok, tokens):
    return [tok.decode(row, skip_special_tokens=True) for row in tokens]


def test_hard_negative_captions_swap_one_attribute_word(twins_source, caption_tokenizer):
    attributes = ("shape", "position")
    batches = _take(
        _pipeline(twins_source, caption_tokenizer, negative_caption_attributes=attributes), 6
    )
    plain = _take(_pipeline(twins_source, caption_tokenizer), 6)
    for key in ("image", "tokens", "mask", "shape"):  # the batch itself is unchanged
        np.testing.assert_array_equal(batches[0][key], plain[0][key])
    names = {"shape": shapes.SHAPES, "position": shapes.POSITIONS}
    swapped = {"shape": 0, "position": 0}
    for batch in batches:
        positives = _decoded(caption_tokenizer, batch["tokens"])
        negatives = _decoded(caption_tokenizer, batch["negative_caption_tokens"])
        for row, (positive, negative) in enumerate(zip(positives, negatives, strict=True)):
            assert positive != negative
            kind = []
            for attribute, vocabulary in names.items():
                own = vocabulary[batch[attribute][row]]
                others = [v for v in vocabulary if v != own]
                if negative in [positive.replace(own, v, 1) for v in others]:
                    kind.append(attribute)
            assert len(kind) == 1, (positive, negative)  # exactly one attribute swapped
            swapped[kind[0]] += 1
    assert min(swapped.values()) > 0, swapped  # both attributes are drawn
    # Resuming mid-run gives the same negatives.
    interrupted = _pipeline(twins_source, caption_tokenizer, negative_caption_attributes=attributes)
    _take(interrupted, 2)
    resumed = _pipeline(twins_source, caption_tokenizer, negative_caption_attributes=attributes)
    resumed.set_state(json.loads(json.dumps(interrupted.get_state())))
    _assert_same_batches(_take(resumed, 3), batches[2:5])


def test_swap_attribute_word_takes_the_first_whole_word():
    caption = "a white star on a white background"
    assert (
        input_pipeline.swap_attribute_word(caption, "white", "red")
        == "a red star on a white background"
    )
    assert input_pipeline.swap_attribute_word("at the top", "top", "left") == "at the left"
    with pytest.raises(ValueError, match="'star' is not a word of the caption 'a starry sky'"):
        input_pipeline.swap_attribute_word("a starry sky", "star", "heart")


def test_hard_negative_caption_bad_inputs(twins_source, caption_tokenizer):
    with pytest.raises(ValueError, match=r"\['hue'\] are not ClassLabel.*'shape'"):
        _pipeline(twins_source, caption_tokenizer, negative_caption_attributes=("hue",))
    shape_only = dataclasses.replace(twins_source, caption_template="a photo of a {shape}")
    with pytest.raises(ValueError, match="is not a word of the caption 'a photo of a "):
        _pipeline(shape_only, caption_tokenizer, negative_caption_attributes=("color",))


def test_to_global_batch_shards_the_batch_over_data_axes():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    local = {
        "image": np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3),
        "tokens": np.arange(16 * 5, dtype=np.int32).reshape(16, 5),
    }
    global_batch = input_pipeline.to_global_batch(local, mesh)
    for key, value in global_batch.items():
        assert value.sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(value), local[key])
        # 8 devices, 2 rows each, in order along the batch.
        rows = sorted((s.index[0].start, s.data.shape[0]) for s in value.addressable_shards)
        assert rows == [(2 * i, 2) for i in range(8)]
    only_data = input_pipeline.to_global_batch(local, mesh, PartitionSpec("data"))
    assert only_data["image"].addressable_shards[0].data.shape == (4, 2, 2, 3)
    model_mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match="contain none of"):
        input_pipeline.to_global_batch(local, model_mesh)
