"""Import of Hugging Face CLIP checkpoints: parity with transformers' PyTorch CLIPModel and
clear errors on bad directories. Tiny random models are saved with save_pretrained into tmp_path
(no downloads)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from diffusion.hf import CheckpointError, load_hf_clip

SENTENCES = [
    "a red circle on a blue background",
    "a small green triangle",
    "two yellow squares",
    "a photo of a cat",
]

HF_CONFIGS = {
    # quick_gelu (OpenAI), one width/depth/heads/projection combination
    "quick_gelu": dict(
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        vision=dict(
            hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=16, patch_size=4,
        ),
        projection_dim=24,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    # gelu, different sizes everywhere, another layer-norm eps
    "gelu": dict(
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6),
        vision=dict(
            hidden_size=40, intermediate_size=80, num_hidden_layers=1, num_attention_heads=2,
            image_size=24, patch_size=8,
        ),
        projection_dim=16,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    ),
    # One activation per tower, as transformers allows: gelu text tower, quick_gelu image tower
    "mixed": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8,
        ),
        projection_dim=16,
        hidden_act="quick_gelu",
        text_hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
}  # fmt: skip


def make_tokenizer(sentences=SENTENCES):
    """A word-level tokenizer trained offline on `sentences`: <bos> words <eos>, padded."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        sentences, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def save_hf_clip(directory, spec, vocab_size, seed=0, context_length=16):
    torch.manual_seed(seed)
    text = dict(
        spec["text"], vocab_size=vocab_size, max_position_embeddings=context_length,
        hidden_act=spec.get("text_hidden_act", spec["hidden_act"]),
        layer_norm_eps=spec["layer_norm_eps"], bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        spec["vision"], hidden_act=spec["hidden_act"], layer_norm_eps=spec["layer_norm_eps"]
    )
    config = transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=spec["projection_dim"]
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # a non-default logit scale, so the import of it is tested
        model.logit_scale.fill_(3.1)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
@pytest.mark.parametrize("scan_layers", [False, True])
def test_import_matches_transformers(tmp_path, tokenizer, name, scan_layers):
    spec = HF_CONFIGS[name]
    hf_model = save_hf_clip(tmp_path, spec, vocab_size=len(tokenizer))
    ours = load_hf_clip(str(tmp_path), scan_layers=scan_layers)
    assert ours.config.activation == spec["hidden_act"]
    assert (ours.config.text_activation or ours.config.activation) == spec.get(
        "text_hidden_act", spec["hidden_act"]
    )

    size = spec["vision"]["image_size"]
    images = np.random.default_rng(0).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    batch = tokenizer(SENTENCES[:3], padding="max_length", max_length=12, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    assert (mask == 0).any(), "the test needs padded sentences"

    # transformers expects processor-normalised pixels (NCHW); we take [-1, 1] NHWC images.
    mean, std = np.array(ours.config.pixel_mean), np.array(ours.config.pixel_std)
    pixels = ((images + 1) / 2 - mean) / std
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2), dtype=torch.float32),
        )
    hf_image = out.image_embeds.numpy()  # L2-normalised
    hf_text = out.text_embeds.numpy()
    image_emb, text_emb, scale = ours(jnp.asarray(images), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(image_emb), hf_image, atol=1e-4)
    np.testing.assert_allclose(np.asarray(text_emb), hf_text, atol=1e-4)
    logits_per_text = float(scale) * np.asarray(text_emb) @ np.asarray(image_emb).T
    np.testing.assert_allclose(logits_per_text, out.logits_per_text.numpy(), atol=1e-4 * 25)
    np.testing.assert_allclose(float(scale), np.exp(3.1), rtol=1e-6)
    # token states for the DiT: HF's last_hidden_state (after the final LayerNorm)
    states, _ = ours.text_states(jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(states)[valid], out.text_model_output.last_hidden_state.numpy()[valid], atol=1e-4
    )


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("clip")
    save_hf_clip(directory, HF_CONFIGS["quick_gelu"], vocab_size=len(tokenizer))
    return directory


def test_missing_config_or_weights(tmp_path, saved_clip):
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_clip(str(tmp_path))
    (tmp_path / "config.json").write_text((saved_clip / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_clip(str(tmp_path))


def test_pickled_weights_refused(tmp_path, saved_clip):
    (tmp_path / "config.json").write_text((saved_clip / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even unpickled")
    with pytest.raises(CheckpointError, match="pickled.*refused.*safe_serialization=True"):
        load_hf_clip(str(tmp_path))


def test_non_clip_config(tmp_path, saved_clip):
    config = json.loads((saved_clip / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(saved_clip / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'bert'.*not a CLIP"):
        load_hf_clip(str(tmp_path))


def test_mismatched_tensor_is_named_with_both_shapes(tmp_path, saved_clip):
    config = json.loads((saved_clip / "config.json").read_text())
    config["projection_dim"] = 20  # the weights were saved with 24
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(saved_clip / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"'visual_projection.weight' has shape \(24, 48\).*\(20, 48\)"
    ):
        load_hf_clip(str(tmp_path))


def test_extra_layer_in_weights_is_named(tmp_path, saved_clip):
    config = json.loads((saved_clip / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 1  # the weights have 2 text layers
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(saved_clip / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="text_model.encoder.layers.1"):
        load_hf_clip(str(tmp_path))


def test_bad_images_and_tokens(saved_clip):
    model = load_hf_clip(str(saved_clip))
    with pytest.raises(ValueError, match="cannot be cut into 4x4 patches"):
        model.encode_image(jnp.zeros((1, 18, 18, 3)))
    with pytest.raises(ValueError, match="does not match the variant's 16x16"):
        model.encode_image(jnp.zeros((1, 32, 32, 3)))
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        model.encode_text(jnp.array([[2, vocab, 3]]), jnp.ones((1, 3)))
