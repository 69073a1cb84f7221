"""Ahead-of-time compilation for TPU (diffusion/aot/): the tiny DiT and CLIP train steps
compiled for a v5e:2x2 slice on this CPU machine, checked against independent truths.

Needs the TPU compiler (`pip install 'jax[tpu]'`, the project's tpu extra); skipped without it.
"""

import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from conftest import one_block
from flax import nnx

from configs import base_clip, base_dit
from diffusion import aot, inference, meshes, metrics, models, optim, sharding
from diffusion.data.classes import ClassSpace
from diffusion.data.latents import LatentEncoding
from diffusion.inference.dit_pipeline import LatentDecoder
from diffusion.models import layers
from diffusion.models.autoencoder import Autoencoder

pytestmark = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed: pip install 'jax[tpu]' (the tpu extra) to run the AOT tests",
)

TOPOLOGY = "v5e:2x2"  # 4 chips of 16 GiB
MESH = {"data": 2, "fsdp": 2, "tensor": 1}


def tiny_config(kind: str, batch: int = 8):
    """kind: "clip", "dit_class", "dit_text", or "dit_latent" (a class-conditional DiT on 8x8x4
    latents of a tiny autoencoder whose decoder makes 16x16 images)."""
    if kind == "clip":
        config = base_clip.get_config()
        config.loss.chunked = True  # the 32k recipes' ring loss, under shard_map
    else:
        config = base_dit.get_config()
        if kind in ("dit_class", "dit_latent"):
            config.model.num_classes = 10
        if kind == "dit_latent":
            config.model.in_channels = 4
            config.data.image_size = 8  # the latent side
            config.autoencoder = ml_collections.ConfigDict(
                dict(
                    variant="tiny",
                    block_out_channels=(8, 16),  # 2x: 16x16 images
                    norm_num_groups=4,
                    latent_channels=4,
                    scaling_factor=0.5,
                    shift_factor=0.25,
                )
            )
        elif kind == "dit_text":
            config.text_encoder.variant = "tiny"  # frozen CLIP tower from shapes alone
            config.model.word_conditioning = True  # the shapes default's extra inputs too
    config.training.global_batch_size = batch
    if kind != "clip":
        config.sampling.steps = 4
    return one_block(config)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays, from their shardings (the exact truth)."""
    total = 0
    for leaf in jax.tree.leaves(sharding.unbox(tree)):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


@pytest.fixture(scope="module")
def reports():
    return {
        kind: aot.compile_for_topology(tiny_config(kind), TOPOLOGY, mesh_shape=MESH)
        for kind in ("dit_class", "dit_text", "clip")
    }


@pytest.mark.parametrize("kind", ["dit_class", "dit_text", "clip"])
def test_tiny_train_step_fits_a_v5e_2x2_with_a_consistent_memory_report(reports, kind):
    report = reports[kind]
    assert report["num_devices"] == 4 and report["devices_per_chip"] == 1
    assert report["mesh"] == MESH
    train = report["train_step"]
    m = train["memory"]
    assert train["fits"] and m["fits"]
    assert m["hbm_bytes"] == 16 * 1024**3
    for field in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes"):
        assert m[field] > 0, field
    assert m["total_bytes"] == (
        m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
        + m["generated_code_bytes"]
    )  # fmt: skip
    assert m["total_bytes"] < m["hbm_bytes"]


def test_arguments_hold_at_least_the_sharded_state_and_outputs_are_donated(reports):
    """argument bytes >= the exact per-device bytes of (state, batch, frozen tower) computed
    from the shardings (TPU layouts only pad), and the donated state is aliased, not copied."""
    devices = aot.topology_devices(TOPOLOGY)
    mesh = meshes.make_mesh(MESH, devices=devices)
    programs = aot.build_programs(tiny_config("dit_text"), mesh)  # shapes only, no compile
    m = reports["dit_text"]["train_step"]["memory"]
    state, batch, frozen = programs.train_args
    exact = per_device_bytes(state) + per_device_bytes(batch) + per_device_bytes(frozen)
    assert exact <= m["argument_bytes"] <= 3 * exact
    assert m["alias_bytes"] >= per_device_bytes(state["params"])  # params at least are reused


def muon_matrix_bytes(params) -> int:
    """Per-device bytes of the parameters Muon orthogonalises (optim.muon_dimension_numbers)."""
    dims = optim.muon_dimension_numbers(params)
    dims = jax.tree.leaves(dims, is_leaf=optim._is_dimension_numbers)  # None kept as a leaf
    leaves = jax.tree.leaves(sharding.unbox(params))
    pairs = zip(dims, leaves, strict=True)
    return sum(per_device_bytes(leaf) for d, leaf in pairs if d is not None)


def test_a_muon_step_fits_with_one_moment_fewer_and_pays_flops_for_newton_schulz(reports):
    """Muon keeps one moment for each hidden matrix where AdamW keeps two: the sharded state
    shrinks by exactly those matrices' bytes (up to the optimizers' step counters), the
    compiled arguments shrink, and the Newton-Schulz matmuls add FLOPs."""
    mesh = meshes.make_mesh(MESH, devices=aot.topology_devices(TOPOLOGY))
    config = tiny_config("dit_text")
    config.optimizer.name = "muon"
    muon_state = aot.build_programs(config, mesh).train_args[0]
    adamw_state = aot.build_programs(tiny_config("dit_text"), mesh).train_args[0]
    saved = per_device_bytes(adamw_state) - per_device_bytes(muon_state)
    matrices = muon_matrix_bytes(muon_state["params"])
    assert matrices > 0 and 0 <= matrices - saved <= 64

    muon = aot.compile_for_topology(config, TOPOLOGY, mesh_shape=MESH, sampler=False)
    adamw = reports["dit_text"]["train_step"]
    assert muon["train_step"]["fits"]
    assert muon["train_step"]["memory"]["argument_bytes"] < adamw["memory"]["argument_bytes"]
    assert muon["train_step"]["cost"]["flops"] > adamw["cost"]["flops"]


def test_hard_negative_captions_add_their_tokens_and_a_text_tower_pass(reports):
    """NegCLIP's swapped captions (config.loss.negative_caption_attributes) are two more
    (batch, context) int32 inputs, sharded like the batch, and one more text-tower forward and
    backward: the arguments grow by at least their exact bytes and the FLOPs grow."""
    config = tiny_config("clip")
    config.loss.negative_caption_attributes = ("shape",)
    mesh = meshes.make_mesh(MESH, devices=aot.topology_devices(TOPOLOGY))
    batch = aot.build_programs(config, mesh).train_args[1]
    extra = {k: v for k, v in batch.items() if k.startswith("negative_caption")}
    assert set(extra) == {"negative_caption_tokens", "negative_caption_mask"}
    assert all(v.shape == batch["tokens"].shape for v in extra.values())
    report = aot.compile_for_topology(config, TOPOLOGY, mesh_shape=MESH, sampler=False)
    plain = reports["clip"]["train_step"]
    step = report["train_step"]
    assert step["fits"]
    grown = step["memory"]["argument_bytes"] - plain["memory"]["argument_bytes"]
    assert grown >= per_device_bytes(extra) > 0
    assert step["cost"]["flops"] > plain["cost"]["flops"]


def test_compiler_flops_match_the_cpu_cost_analysis_of_the_same_step(reports):
    """The TPU compiler's per-device FLOPs of the CLIP step agree with XLA:CPU's count of the
    same program on a CPU mesh of the same shape (independent compiler, same math)."""
    config = tiny_config("clip")
    mesh = meshes.make_mesh(MESH, devices=jax.devices()[:4])
    programs = aot.build_programs(config, mesh)
    with sharding.activate(mesh, programs.train_step.rules):
        compiled = programs.train_step.step_fn.lower(*programs.train_args).compile()
    cpu_flops = metrics.cost_analysis_flops(compiled)
    tpu_flops = reports["clip"]["train_step"]["cost"]["flops"]
    assert 0.5 < tpu_flops / cpu_flops < 2.0


@pytest.mark.parametrize("kind", ["dit_class", "clip"])
def test_cost_report_gives_a_time_no_faster_than_the_compute_bound(reports, kind):
    cost = reports[kind]["train_step"]["cost"]
    assert cost["flops"] > 0 and cost["bytes_accessed"] > 0
    assert cost["peak_flops"] == 197e12  # v5e's data-sheet bf16 peak
    assert cost["ideal_compute_time_s"] == pytest.approx(cost["flops"] / 197e12)
    # Whatever its source, an estimated time can never beat the compute-bound ideal.
    assert cost["step_time_s"] >= cost["ideal_compute_time_s"]
    assert 0 < cost["mfu"] <= 1
    batch = reports[kind]["global_batch_size"]
    examples = reports[kind]["train_step"]["examples_per_second"]
    assert examples == pytest.approx(batch / cost["step_time_s"])


def test_sampler_of_the_dit_compiles_and_fits(reports):
    for kind in ("dit_class", "dit_text"):
        sample = reports[kind]["sampler"]
        assert sample["compiled"] and sample["fits"] and sample["steps"] == 4
        noise_bytes = 4 * 32 * 32 * 3 * 4 // 4  # batch 4 over 4 devices (1 each), float32
        assert sample["memory"]["argument_bytes"] > noise_bytes


def test_the_sampling_program_of_a_latent_dit_decodes_as_sample_py_does():
    """A latent DiT's AOT sampling program is the one ClassToImage (sample.py) runs with its
    autoencoder: the same spec (decoder graph and latent normalisation included), abstract
    arguments of the real ones' shapes and shardings, the same images on real weights; and it
    compiles for TPU with the decoder's weights among its arguments."""
    config = tiny_config("dit_latent")
    config.sampling.update(sampler="ddim", steps=3)
    mesh = inference.dit_pipeline.default_mesh()  # sample.py's: 8 CPU devices on 'data'
    programs = aot.build_programs(config, mesh)  # one micro-batch on every device
    program, (params, text_state, inputs, spec, decoder_state) = (
        programs.sample_fn,
        programs.sample_args,
    )
    assert program is inference.program.sampling_program and text_state is None
    count = inputs["seeds"].shape[0]
    dit = models.DiT(programs.model_config, rngs=nnx.Rngs(0))
    autoencoder = Autoencoder(aot.autoencoder_config(config), rngs=nnx.Rngs(1))
    encoding = LatentEncoding("tiny", 0.5, 0.25, (8, 8, 4), 2)
    pipeline = inference.ClassToImage(
        dit=dit,
        classes=ClassSpace(("label",), (tuple(f"class {k}" for k in range(10)),)),
        diffusion_config=config.diffusion,
        resolution=8,
        mesh=mesh,
        latent_decoder=LatentDecoder(autoencoder, encoding),
    )
    settings = pipeline.settings(sampler="ddim", steps=3)
    assert spec == pipeline.spec_for(settings)
    assert spec.decoder_graphdef is not None and (spec.latent_scale, spec.latent_shift) == (
        0.5,
        0.25,
    )
    assert count == pipeline.program_batch_size(count)
    classes, seeds = [k % 10 for k in range(count)], list(range(count))
    host = pipeline.program_inputs(classes, seeds, [2.0] * count)
    concrete = inference.program.host_to_global(host, pipeline.mesh)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)
    for abstract, real in (
        (params, pipeline._dit_state),
        (decoder_state, pipeline._decoder_state),
        (inputs, concrete),
    ):
        assert shapes(abstract) == shapes(real)
    images = np.asarray(program(pipeline._dit_state, None, concrete, spec, pipeline._decoder_state))
    expected = pipeline.generate(classes, seeds=seeds, guidance_scale=2.0, settings=settings)
    assert images.shape == (count, 16, 16, 3) and images.std() > 0
    np.testing.assert_array_equal(images, expected)

    report = aot.compile_for_topology(config, TOPOLOGY, mesh_shape=MESH, train_step=False)
    assert "train_step" not in report and "decoded to 16x16" in aot.format_report(report)
    sample = report["sampler"]
    decoder_bytes = per_device_bytes(decoder_state)  # replicated: all of it on every device
    assert sample["compiled"] and sample["memory"]["argument_bytes"] > decoder_bytes
    assert sample["decoder_parameters"] == sum(x.size for x in jax.tree.leaves(decoder_state))


def test_a_latent_dit_without_its_autoencoder_is_refused_naming_the_field():
    config = tiny_config("dit_latent")
    del config.autoencoder
    with pytest.raises(aot.AOTError, match=r"config\.autoencoder\.variant.*'SD'"):
        aot.compile_for_topology(config, TOPOLOGY, mesh_shape=MESH)


@pytest.mark.parametrize("recipe", ["dit_xl2_imagenet", "dit_xl2_text"])
def test_the_xl_recipes_name_a_valid_sampler_and_the_sd_vae_of_their_latents(recipe):
    from diffusion import config as config_lib

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load_config(os.path.join(repo, "configs", f"{recipe}.py"))
    assert aot.sampler_settings(config).steps == config.sampling.steps
    vae = aot.autoencoder_config(config)
    assert vae.latent_channels == config.model.in_channels == 4
    assert config.data.image_size * vae.downsampling_factor == 256


def test_a_batch_too_large_for_hbm_raises_naming_memory_and_hbm():
    config = tiny_config("dit_class", batch=4 * 32768)
    with pytest.raises(aot.AOTError, match=r"does not fit.*16\.0 GiB|does not fit.*memory"):
        aot.compile_for_topology(config, TOPOLOGY, mesh_shape=MESH, sampler=False)


def test_run_writes_the_report_to_workdir(reports, tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setattr(aot, "compile_for_topology", lambda *a, **k: reports["dit_text"])
    report = aot.run(tiny_config("dit_text"), TOPOLOGY, str(tmp_path))
    written = json.loads((tmp_path / "aot.json").read_text())
    assert written["train_step"]["memory"] == report["train_step"]["memory"]
    printed = capsys.readouterr().out
    assert "train_step" in printed and "sampler" in printed and "GiB" in printed


def test_v4_exposes_two_devices_per_chip_each_with_half_the_hbm_and_meshes_over_them():
    devices = aot.topology_devices("v4:2x2x1")
    assert len(devices) == 8 and aot.devices_per_chip(devices) == 2
    for shape in ({"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = meshes.make_mesh(shape, devices=devices)
        assert dict(mesh.shape) == shape
        assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
        # The last axis pairs a chip's two TensorCores (on-chip, the fastest link).
        pairs = mesh.devices.reshape(-1, 2)
        assert all(a.coords == b.coords for a, b in pairs)


def test_tpu_programs_contract_without_flattening_the_rows():
    # layers.matmul flattens rows for XLA:CPU only; a TPU mesh, even on this CPU host, must not.
    mesh = meshes.make_mesh(MESH, devices=aot.topology_devices(TOPOLOGY))
    x = jax.ShapeDtypeStruct((2, 5, 8), np.float32)
    kernel = jax.ShapeDtypeStruct((8, 6), np.float32)
    with sharding.activate(mesh):
        assert not layers.flatten_rows_here()
        assert "reshape" not in str(jax.make_jaxpr(layers.matmul)(x, kernel))


@pytest.mark.parametrize("topology", ["v9:2x2", "v5e", "tpu:4x4"])
def test_unknown_topologies_are_rejected_with_the_valid_chips(topology):
    with pytest.raises(aot.AOTError, match="v5e"):
        aot.chip_name(topology)


def test_scanned_step_cost_is_extrapolated_from_shallow_twins_to_the_unrolled_cost():
    """XLA counts a scanned block once; the 1- and 2-block extrapolation must reproduce the
    FLOPs and compiler time of the same 4-block step compiled unrolled."""
    scanned = one_block(tiny_config("dit_class"), depth=4, scan_layers=True)
    unrolled = one_block(tiny_config("dit_class"), depth=4)
    kw = dict(mesh_shape=MESH, sampler=False)
    cost = aot.compile_for_topology(scanned, TOPOLOGY, **kw)["train_step"]["cost"]
    truth = aot.compile_for_topology(unrolled, TOPOLOGY, **kw)["train_step"]["cost"]
    assert "extrapolated" in cost["step_time_source"]
    assert cost["flops"] == pytest.approx(truth["flops"], rel=0.02)
    assert cost["bytes_accessed"] == pytest.approx(truth["bytes_accessed"], rel=0.1)
