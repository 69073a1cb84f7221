"""Our video DiT against diffusers' PyTorch WanTransformer3DModel: the same config, the same
weights (imported with `hf.wan_transformer.video_dit_from_state_dict`), the same batch.

    PYTHONPATH=. python benchmarks/video_dit_vs_diffusers.py [--batch=8] [--repeats=3]
        [--frames=8 --size=32 --patch=2,4,4] [--width=128 --depth=4 --heads=4 --ffn=512]

1. Sampling step: one classifier-free-guided model evaluation (cond and uncond batched: 2B
   clips), ours jitted, diffusers' eagerly under torch.no_grad (its pipelines' way).
2. Train step: flow-matching MSE on the model's output, backward and AdamW (lr 1e-4), ours one
   jitted value_and_grad + optax update, PyTorch's forward / backward / optimizer.step().
Ratio = our clips/s / PyTorch's; MFU from the closed-form `flops_per_example` (train = 3x the
forward) over `--peak_tflops` (default: `metrics.peak_flops_per_device`, the data sheet's, or a
measured matmul rate on CPU). Each time is the best of `repeats` after a warm-up; PyTorch uses this
machine's cores. On a GPU JAX runs there and PyTorch on CUDA (TF32 allowed on both).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from diffusion import metrics
from diffusion.hf.wan_transformer import video_dit_from_state_dict
from diffusion.models.video_dit import video_dit_config
from diffusion.models.video_dit_costs import flops_per_example


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def diffusers_model(args, device):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=args.patch,
        num_attention_heads=args.heads,
        attention_head_dim=args.width // args.heads,
        in_channels=3,
        out_channels=3,
        text_dim=args.text_dim,
        freq_dim=256,
        ffn_dim=args.ffn,
        num_layers=args.depth,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    ).to(device)


def inputs(args, batch):
    rng = np.random.default_rng(0)
    clips = rng.normal(size=(batch, args.frames, args.size, args.size, 3)).astype(np.float32)
    t = rng.uniform(size=(batch,)).astype(np.float32)
    text = rng.normal(size=(batch, args.text_length, args.text_dim)).astype(np.float32)
    return clips, t, text


def torch_inputs(clips, t, text, device):
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous().to(device)  # (B, C, T, H, W)
    return x, torch.from_numpy(t * 1000).to(device), torch.from_numpy(text).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--patch", default="2,4,4")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--text_dim", type=int, default=128)
    parser.add_argument("--text_length", type=int, default=24)
    parser.add_argument("--peak_tflops", type=float, default=None)
    args = parser.parse_args()
    args.patch = tuple(int(p) for p in args.patch.split(","))
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_num_threads(os.cpu_count() or 1)

    reference = diffusers_model(args, device)
    config = video_dit_config(
        "tiny", patch_size=args.patch, width=args.width, depth=args.depth,
        num_heads=args.heads, ffn_dim=args.ffn, text_dim=args.text_dim,
    )  # fmt: skip
    ours = video_dit_from_state_dict(
        {k: v.detach().cpu() for k, v in reference.state_dict().items()}, config
    )
    forward_flops = flops_per_example(config, args.frames, args.size, args.size, args.text_length)
    if args.peak_tflops is None:  # the data sheet's, or a measured matmul rate on CPU
        args.peak_tflops = metrics.peak_flops_per_device() / 1e12
    print(
        f"device {jax.devices()[0].device_kind} / torch {device}; config width {args.width}, "
        f"depth {args.depth}, patch {args.patch}, clips {args.frames}x{args.size}x{args.size}, "
        f"batch {args.batch}; forward {forward_flops / 1e9:.2f} GFLOP a clip; peak "
        f"{args.peak_tflops:.2f} TFLOP/s",
        flush=True,
    )

    # -- sampling step: a guided evaluation, 2B clips --------------------------------------------
    clips, t, text = inputs(args, 2 * args.batch)
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    ours_args = (state, jnp.asarray(clips), jnp.asarray(t), jnp.asarray(text))
    ours_time = best_of(lambda: forward(*ours_args).block_until_ready(), args.repeats)
    x, timestep, states = torch_inputs(clips, t, text, device)
    reference.eval()

    def torch_forward():
        with torch.no_grad():
            reference(x, timestep, states, return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()

    torch_time = best_of(torch_forward, args.repeats)
    report("sampling step (guided, 2B)", 2 * args.batch, ours_time, torch_time,
           forward_flops, args.peak_tflops)  # fmt: skip

    # -- train step --------------------------------------------------------------------------------
    clips, t, text = inputs(args, args.batch)
    target = np.random.default_rng(1).normal(size=clips.shape).astype(np.float32)
    tx = optax.adamw(1e-4, weight_decay=0.0)
    params = nnx.state(ours, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, t, c, y):
        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p)(x, t, c) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    batch = (jnp.asarray(clips), jnp.asarray(t), jnp.asarray(text), jnp.asarray(target))
    carry = [params, opt_state]

    def ours_train():
        carry[0], carry[1], value = train_step(carry[0], carry[1], *batch)
        value.block_until_ready()

    ours_time = best_of(ours_train, args.repeats)
    x, timestep, states = torch_inputs(clips, t, text, device)
    y = torch.from_numpy(target).permute(0, 4, 1, 2, 3).contiguous().to(device)
    reference.train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4, weight_decay=0.0)

    def torch_train():
        optimizer.zero_grad(set_to_none=True)
        out = reference(x, timestep, states, return_dict=False)[0]
        torch.mean((out - y) ** 2).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    torch_time = best_of(torch_train, args.repeats)
    report("train step (AdamW)", args.batch, ours_time, torch_time, 3 * forward_flops,
           args.peak_tflops)  # fmt: skip


def report(name, clips, ours_time, torch_time, flops_per_clip, peak_tflops):
    ours_rate, torch_rate = clips / ours_time, clips / torch_time
    mfu = ours_rate * flops_per_clip / (peak_tflops * 1e12)
    print(
        f"{name}: ours {ours_rate:.1f} clips/s, diffusers {torch_rate:.1f} clips/s, ratio "
        f"{ours_rate / torch_rate:.2f}x; our MFU {100 * mfu:.1f} %",
        flush=True,
    )


if __name__ == "__main__":
    main()
