"""Wan 2.1 text-to-video from a diffusers-format directory (diffusion.inference.wan_pipeline).

Truth: diffusers' own WanPipeline on a tiny seeded random pipeline (WanTransformer3DModel,
AutoencoderKLWan, UMT5EncoderModel, a word-level tokenizer, UniPC with flow sigmas) saved with
save_pretrained, run on the same prompts, negative prompts and initial latents; its
output_type="np" frames against ours before uint8 quantisation (float32). Then: a clip is the
same bytes whatever the batch size or its position in the batch; sample.py's batch job writes
MP4s, GIFs and a manifest from the directory; bad directories and sizes are refused by name.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from diffusion import config as config_lib
from diffusion import meshes
from diffusion.inference import batch_io, sample_to_directory, wan_program
from diffusion.inference.settings import SamplingError
from diffusion.inference.wan_directory import wan_levels
from diffusion.inference.wan_pipeline import WanTextToVideo, from_recipe

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

FRAMES, HEIGHT, WIDTH = 5, 16, 32  # latents (2, 2, 4, 4): two causal chunks, a 1 x 2 token grid
STEPS, SHIFT = 4, 3.0
TOLERANCE = 1e-4  # max abs difference of [0, 1] pixels with diffusers (measured: see the test)
WORDS = "a red blue green circle square moves left right slowly fast bright static blurred".split()
PROMPTS = ["a red circle moves left", "a blue  square moves   right slowly"]
NEGATIVES = ["blurred static", ""]
# Two layers, two heads of 16; text_dim = the umT5 width; 4 channels = the VAE's z_dim.
TINY_DIT = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=4, text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2,
)  # fmt: skip
TINY_VAE = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.3, -0.2, 0.1, -0.5], latents_std=[1.5, 0.5, 2.0, 0.8],
)  # fmt: skip
TINY_UMT5 = dict(d_model=16, d_kv=8, num_heads=2, d_ff=24, num_layers=2,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16)  # fmt: skip


def word_tokenizer():
    """A T5-like tokenizer built offline: words -> ids, pad 0, "</s>" appended to every text."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def randomise(module, scale: float, ones=("norm_q.weight", "norm_k.weight", "norm2.weight")):
    """Every parameter drawn anew (norm gains near 1), so a mis-mapped one would show."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith(ones) or name.endswith("gamma"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(scale * torch.randn_like(parameter))


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(directory, diffusers WanPipeline) of a tiny random Wan 2.1 saved with save_pretrained."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    transformer = diffusers.WanTransformer3DModel(**TINY_DIT).eval()
    randomise(transformer, 0.2)
    vae = diffusers.AutoencoderKLWan(**TINY_VAE).eval()
    randomise(vae, 0.1)
    config = transformers.UMT5Config(vocab_size=len(tokenizer), is_decoder=False, **TINY_UMT5)
    text_encoder = transformers.UMT5EncoderModel(config).eval()
    randomise(text_encoder, 0.5)
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT
    )
    pipe = diffusers.WanPipeline(tokenizer, text_encoder, vae, scheduler, transformer)
    directory = str(tmp_path_factory.mktemp("wan21"))
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory, pipe


@pytest.fixture(scope="module")
def ours(wan):
    return WanTextToVideo.from_diffusers(wan[0], num_frames=FRAMES, height=HEIGHT, width=WIDTH)


def test_levels_are_diffusers_unipc_flow_sigmas_and_timesteps():
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT
    )
    scheduler.set_timesteps(STEPS)
    levels = wan_levels(STEPS, SHIFT)
    np.testing.assert_array_equal(levels.sigma, scheduler.sigmas.numpy().astype(np.float64))
    np.testing.assert_array_equal(levels.t[:-1] * 1000, scheduler.timesteps.numpy())


def test_clips_equal_diffusers_wan_pipeline(wan, ours):
    """Same prompts, negative prompts (one of them empty), latents and steps as diffusers'
    WanPipeline: UniPC, guidance 5, umT5 states padded to 512 with zeros, VAE decode."""
    _, pipe = wan
    latent_shape = ours.latent_shape(FRAMES, HEIGHT, WIDTH)
    latents = np.random.default_rng(1).standard_normal((2, *latent_shape)).astype(np.float32)
    with torch.no_grad():
        theirs = pipe(
            prompt=PROMPTS,
            negative_prompt=NEGATIVES,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            latents=torch.from_numpy(latents.transpose(0, 4, 1, 2, 3).copy()),
            output_type="np",
        ).frames  # (B, T, H, W, 3) in [0, 1]
    mine = ours.generate(
        PROMPTS, NEGATIVES, latents=latents, steps=STEPS, guidance_scale=5.0, output="float"
    )
    assert mine.shape == theirs.shape == (2, FRAMES, HEIGHT, WIDTH, 3)
    difference = float(np.max(np.abs(mine - theirs)))
    print(f"max abs difference with diffusers' WanPipeline: {difference:.2e}")
    assert difference <= TOLERANCE
    assert float(np.std(theirs)) > 0.05  # the frames are not a constant that would agree anyway


def test_clip_is_the_same_for_any_batch_size_or_position(ours):
    both = ours.generate(PROMPTS, NEGATIVES, seeds=[7, 8], steps=STEPS)
    assert both.dtype == np.uint8 and both.shape == (2, FRAMES, HEIGHT, WIDTH, 3)
    second = ours.generate(PROMPTS[1:], NEGATIVES[1:], seeds=[8], steps=STEPS)
    swapped = ours.generate(PROMPTS[::-1], NEGATIVES[::-1], seeds=[8, 7], steps=STEPS)
    np.testing.assert_array_equal(second[0], both[1])
    np.testing.assert_array_equal(swapped[0], both[1])
    np.testing.assert_array_equal(swapped[1], both[0])
    assert not np.array_equal(both[0], both[1])


def test_text_encoder_sharded_over_fsdp_and_tensor_gives_the_same_states(wan, ours):
    """umT5 weights split over a (data 2, fsdp 2, tensor 2) mesh as they are read; the states
    equal the replicated encoder's up to the reduction order (measured 8e-7). Clips sampled from
    them may differ by one uint8 level: byte-identical clips need the same mesh."""
    mesh = meshes.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = WanTextToVideo.from_diffusers(
        wan[0], mesh, num_frames=FRAMES, height=HEIGHT, width=WIDTH
    )
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded._text_state)]
    assert any("tensor" in str(spec) for spec in specs) and any(
        "fsdp" in str(spec) for spec in specs
    )
    states = sharded.encode_texts(PROMPTS + NEGATIVES)
    np.testing.assert_allclose(states, ours.encode_texts(PROMPTS + NEGATIVES), atol=1e-5)
    # "a blue square moves right slowly </s>": 7 tokens with states, then zeros up to 512.
    assert np.all(np.any(states[1, :7] != 0, axis=-1)) and np.all(states[1, 7:] == 0)


def test_sample_py_batch_job_writes_clips_from_the_directory(wan, ours, tmp_path):
    """What sample.py --checkpoint=WAN_DIR does: load_pipeline, then sample_to_directory."""
    loaded = batch_io.load_pipeline(wan[0])
    assert isinstance(loaded, WanTextToVideo) and loaded.frames == 81  # WanPipeline's default
    pipe = loaded.with_size(num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    items = batch_io.read_prompt_file(str(prompts), negative_prompt=NEGATIVES[0], seed=7)
    out = tmp_path / "out"
    result = sample_to_directory(pipe, items, str(out), steps=STEPS, progress=False)
    assert result == {"generated": 1, "skipped": 0}
    assert {"00001_000.mp4", "00001_000.gif", "manifest.jsonl", "grid.png"} <= set(os.listdir(out))
    record = json.loads((out / "manifest.jsonl").read_text())
    assert record["sampler"] == "unipc" and record["shift"] == SHIFT and record["frames"] == FRAMES
    assert (record["height"], record["width"]) == (HEIGHT, WIDTH) and record["checkpoint"] == wan[0]
    # The clip written is the one generate() makes (same prompt, negative prompt and seed).
    expected = ours.generate(PROMPTS[:1], NEGATIVES[:1], seeds=[7], steps=STEPS)[0]
    written = batch_io.video_files.read_mp4(str(out / "00001_000.mp4"), HEIGHT, WIDTH)
    assert written.shape == expected.shape
    assert np.mean(np.abs(written.astype(int) - expected.astype(int))) < 12  # MP4 is lossy


def test_recipes_load_the_directory_at_their_size_and_need_weights(wan):
    """sample.py --config=configs/wan21_t2v_1_3b.py --config.weights=DIR builds this pipeline."""
    small = config_lib.load_config("configs/wan21_t2v_1_3b.py")
    large = config_lib.load_config("configs/wan21_t2v_14b.py")
    assert (small.sampling.height, small.sampling.width, small.sampling.shift) == (480, 832, 5.0)
    assert (large.sampling.height, large.sampling.width, large.sampling.shift) == (720, 1280, 5.0)
    with pytest.raises(SamplingError, match=r"config.weights is not set: pass --config.weights"):
        from_recipe(small)
    sizes = [("num_frames", FRAMES), ("height", HEIGHT), ("width", WIDTH)]
    overrides = [("weights", wan[0]), ("dtype", "float32"), ("param_dtype", "float32")]
    overrides += [(f"sampling.{name}", str(value)) for name, value in sizes]
    pipe = from_recipe(config_lib.load_config("configs/wan21_t2v_1_3b.py", overrides))
    assert (pipe.frames, pipe.frame_shape, pipe.flow_shift) == (FRAMES, (HEIGHT, WIDTH), SHIFT)
    assert pipe.run_dir == wan[0] and dict(pipe.mesh.shape)["data"] == 8
    assert dict(pipe.mesh.shape)["sequence"] == 1 and pipe.dit_config.attention_impl == "ulysses"
    overrides += [("mesh.data", "2"), ("mesh.sequence", "4"), ("attention_impl", "ring")]
    split = from_recipe(config_lib.load_config("configs/wan21_t2v_1_3b.py", overrides))
    assert dict(split.mesh.shape)["sequence"] == 4 and split.dit_config.attention_impl == "ring"


def test_bad_directories_and_sizes_are_refused(wan, ours, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(wan[0], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(SamplingError, match=r"lacks the subfolders \['vae'\]"):
        WanTextToVideo.from_diffusers(str(broken))
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(SamplingError, match="names the pipeline 'FluxPipeline'"):
        WanTextToVideo.from_diffusers(str(broken))
    with pytest.raises(SamplingError, match="no model_index.json"):
        WanTextToVideo.from_diffusers(str(tmp_path))
    with pytest.raises(SamplingError, match=r"num_frames=6.*use 5 or 9"):
        ours.generate(PROMPTS[:1], num_frames=6)
    with pytest.raises(SamplingError, match=r"width=40 is not a multiple of 16.*use 32 or 48"):
        ours.with_size(width=40)
    with pytest.raises(SamplingError, match=r"latents of shape \(1, 2, 2, 2, 4\)"):
        ours.generate(PROMPTS[:1], latents=np.zeros((1, 2, 2, 2, 4), np.float32))


# Model-parallel sampling: the DiT's weights split over fsdp / tensor, each clip's tokens over
# sequence (Ulysses where the heads allow, else the ring), the clips over data; two clips per
# batch device at a time on one of them, so micro-batching is exercised too.
SHARDED_MESHES = {  # name: (mesh, attention_impl, micro_batch)
    "data2 x fsdp2 x sequence2, ulysses": ({"data": 2, "fsdp": 2, "sequence": 2}, "ulysses", 2),
    "data2 x tensor2 x sequence2, ring": ({"data": 2, "tensor": 2, "sequence": 2}, "ring", 1),
}
# Float32 [0, 1] pixels; only reduction orders differ between meshes, and they depend on the CPU's
# vector width: with Ulysses on fsdp and micro_batch 2, 5.7e-6 on an AVX-512 Xeon and 6.8e-5 on an
# AVX2 EPYC (the ring on tensor: 5.1e-6 and 9.0e-6). A wrong split errs by whole pixel levels
# (1/255 = 3.9e-3).
SHARDED_TOLERANCE = 2e-4


def sharded_pipeline(directory, mesh_shape, attention_impl, micro_batch=1):
    return WanTextToVideo.from_diffusers(
        directory,
        meshes.make_mesh(mesh_shape),
        attention_impl=attention_impl,
        micro_batch=micro_batch,
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
    )


@pytest.fixture(scope="module")
def sharded(wan):
    """name of SHARDED_MESHES -> its pipeline, loaded once for the tests below."""
    pipelines = {}

    def get(name):
        if name not in pipelines:
            pipelines[name] = sharded_pipeline(wan[0], *SHARDED_MESHES[name])
        return pipelines[name]

    return get


def float_clips(pipe):
    """The clips of test_clips_equal_diffusers_wan_pipeline (same compiled program on `ours`)."""
    latent_shape = pipe.latent_shape(FRAMES, HEIGHT, WIDTH)
    latents = np.random.default_rng(1).standard_normal((2, *latent_shape)).astype(np.float32)
    return pipe.generate(
        PROMPTS, NEGATIVES, latents=latents, steps=STEPS, guidance_scale=5.0, output="float"
    )


def test_micro_batches_hold_the_rows_each_batch_device_computes_at_once():
    rows = np.arange(12)  # 3 devices x 4 rows each, 2 at a time
    chunks = np.asarray(wan_program.to_micro_batches(rows, devices=3, micro_batch=2))
    np.testing.assert_array_equal(chunks, [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]])
    np.testing.assert_array_equal(wan_program.from_micro_batches(chunks, devices=3), rows)


@pytest.mark.parametrize("name", list(SHARDED_MESHES))
def test_model_parallel_clips_equal_the_data_parallel_ones(ours, sharded, name):
    """The DiT's weights really split (a shard holds a fraction of a kernel), its tokens split
    over sequence, and the float clips equal those of the data=8 mesh with replicated weights."""
    pipe = sharded(name)
    kernels = [leaf for leaf in jax.tree.leaves(pipe._dit_state) if leaf.ndim >= 2]
    assert any(k.addressable_shards[0].data.size * 2 <= k.size for k in kernels)
    mine, expected = float_clips(pipe), float_clips(ours)
    difference = float(np.max(np.abs(mine - expected)))
    print(f"{name}: max abs difference with data=8: {difference:.2e}")
    assert difference <= SHARDED_TOLERANCE, f"max abs difference {difference:.2e}"
    assert float(np.std(expected)) > 0.05


def test_ulysses_sampling_program_moves_tokens_with_all_to_alls(sharded):
    pipe = sharded("data2 x fsdp2 x sequence2, ulysses")
    assert "all_to_all" in pipe.lower_program(2, steps=2).as_text()


def test_meshes_the_dit_cannot_split_are_refused_by_name(wan):
    # 2 heads split over tensor 2 leave 1 per device: Ulysses over sequence 2 needs 2.
    with pytest.raises(SamplingError, match=r"ulysses attention.*2 heads \(1 per device.*ring"):
        sharded_pipeline(wan[0], {"data": 2, "tensor": 2, "sequence": 2}, "ulysses")
    with pytest.raises(SamplingError, match=r"attention_impl is 'xla'.*'ulysses'.*'ring'"):
        sharded_pipeline(wan[0], {"data": 4, "sequence": 2}, "xla")
    # 5 x 16 x 32 makes 4 tokens; 8 sequence devices cannot split them.
    with pytest.raises(SamplingError, match=r"make 4 DiT tokens.*8 devices.*divides 4"):
        sharded_pipeline(wan[0], {"sequence": 8}, "ring")
