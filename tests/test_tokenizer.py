"""The caption tokenizer (diffusion/data/tokenizer.py), checked against transformers/tokenizers."""

import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import transformers

from diffusion.data import shapes, tokenizer

LONG_CAPTION = " ".join(["a large red circle in the top left corner on a gray background"] * 4)
UNUSUAL_TEXTS = ["a red 🙂 star", "红色的圆 circle", "naïve ÉCLAIR ✨\t\n  tabs", "\x00\x7f"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    captions = [ex["caption"] for _, ex in shapes.generate_examples("train", 2000, 16, seed=0)]
    out_dir = tmp_path_factory.mktemp("tokenizer")
    tokenizer.train_caption_tokenizer(captions, out_dir, vocab_size=600)
    return out_dir


@pytest.fixture(scope="module")
def caption_tokenizer(tokenizer_dir):
    return tokenizer.load_tokenizer(tokenizer_dir)


def test_round_trip_through_autotokenizer(tokenizer_dir, caption_tokenizer):
    loaded = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    raw = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = "a photo of a small cyan heart on a black background, in the center"
    ids = loaded(text)["input_ids"]
    assert ids == raw.encode(text).ids == caption_tokenizer(text)["input_ids"]
    assert ids[0] == loaded.convert_tokens_to_ids(tokenizer.START_TOKEN)
    assert ids[-1] == loaded.eos_token_id == loaded.convert_tokens_to_ids(tokenizer.END_TOKEN)
    assert loaded.pad_token == tokenizer.END_TOKEN  # like CLIP
    assert loaded.decode(ids, skip_special_tokens=True) == text
    # The trained merges make every caption word a single token.
    assert len(ids) == len(text.replace(",", " ,").split()) + 2


def test_direct_load_equals_autotokenizer_and_does_not_import_torch(tokenizer_dir):
    """load_tokenizer skips AutoTokenizer for a plain tokenizer.json directory (AutoTokenizer
    imports torch, where installed: seconds per process); the result must be what it gives."""
    direct = tokenizer.load_tokenizer(tokenizer_dir)
    auto = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert type(direct) is type(auto)
    assert direct.special_tokens_map == auto.special_tokens_map
    assert direct.model_max_length == auto.model_max_length
    for text in [LONG_CAPTION, *UNUSUAL_TEXTS]:
        assert direct(text)["input_ids"] == auto(text)["input_ids"]
        want = tokenizer.tokenize(auto, [text], context_length=16)
        got = tokenizer.tokenize(direct, [text], context_length=16)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    probe = (
        "import sys; from diffusion.data import tokenizer; "
        f"tokenizer.load_tokenizer({str(tokenizer_dir)!r}); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_tokenize_matches_the_transformers_call(caption_tokenizer):
    texts = ["a large red circle in the top left corner", "small blue star, bottom right", ""]
    ids, mask = tokenizer.tokenize(caption_tokenizer, texts, context_length=16)
    expected = caption_tokenizer(texts, padding="max_length", max_length=16, truncation=True)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 16)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])


def test_truncation_keeps_the_end_token(caption_tokenizer):
    full = caption_tokenizer(LONG_CAPTION)["input_ids"]
    context_length = 12
    assert len(full) > context_length
    ids, mask = tokenizer.tokenize(caption_tokenizer, [LONG_CAPTION], context_length)
    assert ids[0, -1] == caption_tokenizer.eos_token_id
    np.testing.assert_array_equal(ids[0, :-1], full[: context_length - 1])
    assert mask.all()


def test_longest_caption_counts_the_captions_a_context_would_cut(caption_tokenizer):
    captions = ["a red circle", "a small blue star on the left", LONG_CAPTION, "a red circle"]
    lengths = {text: len(caption_tokenizer(text)["input_ids"]) for text in set(captions)}
    longest = max(lengths.values())
    assert tokenizer.longest_caption(caption_tokenizer, captions, longest) == (longest, 3, 0)
    short = lengths["a small blue star on the left"]  # cuts only the long caption
    assert tokenizer.longest_caption(caption_tokenizer, captions, short) == (longest, 3, 1)
    assert tokenizer.longest_caption(caption_tokenizer, captions, 2) == (longest, 3, 3)


def test_unknown_characters_do_not_crash_and_round_trip(caption_tokenizer):
    ids, mask = tokenizer.tokenize(caption_tokenizer, UNUSUAL_TEXTS, context_length=64)
    assert ids.max() < len(caption_tokenizer)
    for row, text in enumerate(UNUSUAL_TEXTS):
        tokens = ids[row][mask[row] == 1]
        assert tokens[-1] == caption_tokenizer.eos_token_id  # not truncated at 64
        # Byte-level BPE: the normalised text (lowercase, collapsed whitespace) comes back.
        normalised = " ".join(text.lower().split())
        assert caption_tokenizer.decode(tokens, skip_special_tokens=True) == normalised


def test_tokenize_without_an_end_token_truncates_plainly():
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    ids, mask = tokenizer.tokenize(plain, ["a b c a b", "c"], context_length=3)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [3, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])


def test_bad_inputs_raise_clear_errors(tmp_path, caption_tokenizer):
    with pytest.raises(ValueError, match="Cannot load a tokenizer from"):
        tokenizer.load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        tokenizer.tokenize(caption_tokenizer, ["a"], context_length=1)
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        tokenizer.train_caption_tokenizer(["a"], tmp_path / "tiny", vocab_size=100)
