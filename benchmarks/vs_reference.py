"""Our DiT train step and sampler side by side with plain references, on this CPU or a GPU.

    PYTHONPATH=. python benchmarks/vs_reference.py [--steps=3] [--only=train|sampler]
        [--sampler_batches=1,8] [--train_cases=dit_s2:256,dit_xl2:64] [--dtypes=float32,bfloat16]

1. Train step: the same class-conditional DiT (the tiny DiT and DiT-S/2 on 32x32x3 by default;
   DiT-XL/2 on 32x32x4 with --train_cases), the same batch, flow-matching loss, AdamW (lr 1e-4,
   no weight decay), global-norm clipping 1.0 and EMA, written plainly in PyTorch after
   facebookresearch/DiT `models.py` (PatchEmbed conv, adaLN-Zero blocks, FinalLayer; eager mode,
   torch threads = this machine's cores) against ours (`training.Trainer.step`, jitted, donated
   state, no scan, no remat). Ratio = our examples/s / PyTorch's. Where JAX runs on a GPU, PyTorch
   runs on CUDA too, with TF32 matmuls allowed as in DiT's train.py (JAX's default float32
   precision there is TF32 as well); --dtypes=bfloat16 runs ours with bf16 compute and PyTorch
   under bf16 autocast, parameters float32 on both sides.
2. Sampler: our flow-Euler sampler (one jitted `lax.scan` over steps) against a diffusers-style
   Python loop that calls the jitted model once per step and applies the Euler update eagerly,
   at 20 and 50 steps, with classifier-free guidance (scale 4, one batched 2B forward) and without,
   for each batch size of --sampler_batches.
Every time is best-of-`steps` after a warm-up call; ratios are within this run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

from benchmarks.train_step import build, case_config, parse_cases
from diffusion import guidance, meshes, samplers, sharding
from diffusion.schedules import flow_levels

# ---------------------------------------------------------------------------------------------
# PyTorch DiT after facebookresearch/DiT models.py (class-conditional, learn_sigma=False)
# ---------------------------------------------------------------------------------------------


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, frequency_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.frequency_dim = frequency_dim

    def forward(self, t):
        half = self.frequency_dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000) * steps / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh)
        x = nn.functional.scaled_dot_product_attention(q, k, v)  # timm's fused_attn path
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class TorchDiT(nn.Module):
    def __init__(self, size, patch, channels, hidden, depth, heads, num_classes):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.x_embedder = nn.Conv2d(channels, hidden, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)  # + null class
        self.pos_embed = nn.Parameter(torch.zeros(1, (size // patch) ** 2, hidden), False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads) for _ in range(depth)])
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final_linear = nn.Linear(hidden, patch * patch * channels)

    def forward(self, x, t, y):  # x: (N, C, H, W)
        n, _, h, w = x.shape
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t * 1000) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.final_linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)
        p, gh, gw = self.patch, h // self.patch, w // self.patch
        x = x.reshape(n, gh, gw, p, p, self.channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, self.channels, h, w)


def torch_train_step(model, ema, opt, x0, labels, null_label, autocast_dtype=None):
    """Flow matching (x_t = (1 - t) x0 + t eps, target eps - x0), logit-normal t, as ours."""
    t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))
    eps = torch.randn_like(x0)
    tb = t[:, None, None, None]
    drop = torch.rand(labels.shape, device=x0.device) < 0.1
    labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    with torch.autocast(x0.device.type, autocast_dtype, enabled=autocast_dtype is not None):
        prediction = model((1 - tb) * x0 + tb * eps, t, labels)
    loss = ((prediction.float() - (eps - x0)) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():  # DiT train.py update_ema
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.mul_(0.999).add_(p, alpha=0.001)
    if x0.is_cuda:  # CUDA runs asynchronously: the step is done when its kernels are
        torch.cuda.synchronize()
    return loss


def our_train_step(trainer, holder, batch):
    holder["state"], out = trainer.step(holder["state"], batch)  # the state is donated
    jax.block_until_ready(out)


def best_of(fn, steps: int) -> float:
    fn()  # warm-up (compile / allocator)
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------------------------------------
# 1. Train step
# ---------------------------------------------------------------------------------------------

TRAIN_CASES = "dit_tiny:32,dit_s2:8"  # case:batch, the CPU default


def torch_device() -> torch.device:
    """CUDA when JAX itself runs on a GPU (a like-for-like pair), else the CPU."""
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # as DiT's train.py; JAX's default on GPU
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def plain_flow_config(case: str, batch_size: int, dtype: str):
    """The case's DiT with the loss and optimizer that the PyTorch step implements."""
    config = case_config(case, batch_size)
    config.model.dtype, config.model.remat, config.model.scan_layers = dtype, "none", False
    config.diffusion.objective, config.diffusion.time_sampling = "flow", "logit_normal"
    config.diffusion.logit_normal_mean, config.diffusion.logit_normal_std = 0.0, 1.0
    config.diffusion.shift, config.diffusion.cond_dropout = 1.0, 0.1
    config.optimizer.learning_rate, config.optimizer.weight_decay = 1e-4, 0.0
    config.optimizer.grad_clip_norm = 1.0
    return config


def compare_train(steps: int, mesh, cases: dict[str, int], dtypes: list[str]) -> list[str]:
    rows, device = [], torch_device()
    for (case, batch_size), dtype in itertools.product(cases.items(), dtypes):
        config = plain_flow_config(case, batch_size, dtype)
        trainer, state, batch = build(config, mesh)
        c = trainer.model(state["params"]).config
        ours_s = best_of(functools.partial(our_train_step, trainer, {"state": state}, batch), steps)
        ours_params = sum(x.size for x in jax.tree.leaves(sharding.unbox(state["params"])))
        x0 = torch.from_numpy(np.array(batch["image"])).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(np.array(batch["label"])).long()
        del trainer, state, batch  # free device memory for PyTorch
        torch.manual_seed(0)
        size, num_classes = x0.shape[-1], c.num_classes
        dims = (size, c.patch_size, c.in_channels, c.width, c.depth, c.num_heads, num_classes)
        model, ema = TorchDiT(*dims).to(device), TorchDiT(*dims).to(device)
        ema.load_state_dict(model.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
        step = functools.partial(
            torch_train_step,
            model,
            ema,
            opt,
            x0.to(device),
            labels.to(device),
            num_classes,
            autocast,
        )
        torch_s = best_of(step, steps)
        torch_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        del model, ema, opt
        rows.append(
            f"| {case} ({ours_params / 1e6:.1f}M / {torch_params / 1e6:.1f}M params) | {dtype} | "
            f"{batch_size} | {batch_size / ours_s:.1f} | {batch_size / torch_s:.1f} | "
            f"{torch_s / ours_s:.2f}x |"
        )
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# 2. Sampler: one lax.scan vs a Python loop over a jitted model call
# ---------------------------------------------------------------------------------------------


def compare_sampler(steps: int, mesh, batch_size: int = 8) -> list[str]:
    config = case_config("dit_tiny", batch_size)
    trainer, state, _ = build(config, mesh)
    graphdef, params = trainer.graphdef, state["ema"]
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.standard_normal((batch_size, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    null = jnp.full((1,), 10, jnp.int32)

    def model_fn_of(params):
        # Merged once per traced program, outside the sampler's scan, as TextToImage does: the
        # loop body then reads the parameters as loop invariants instead of copying them per step.
        model = nnx.merge(graphdef, params)
        return lambda x, t, c: model(x, t, labels=c)

    def scan_sampler(num_steps):
        levels = flow_levels(num_steps)

        @jax.jit
        def sample(params, noise, labels, scale):
            fn = model_fn_of(params)
            if scale is None:
                return samplers.sample_flow_euler(fn, noise, levels, cond=labels)
            condition = guidance.GuidanceCondition(labels, null, scale)
            guided = guidance.guided_model_fn(fn)
            return samplers.sample_flow_euler(guided, noise, levels, cond=condition)

        return lambda scale: sample(params, noise, labels, scale).block_until_ready()

    @jax.jit
    def velocity(params, x, t, labels, scale):
        fn = model_fn_of(params)
        t = jnp.full((x.shape[0],), t)
        if scale is None:
            return fn(x, t, labels)
        return guidance.guided_model_fn(fn)(x, t, guidance.GuidanceCondition(labels, null, scale))

    def python_loop(num_steps, scale):
        times = flow_levels(num_steps).t
        x = noise
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            x = x + (t_next - t) * velocity(params, x, jnp.float32(t), labels, scale)
        return x.block_until_ready()

    rows = []
    for num_steps in (20, 50):
        scan = scan_sampler(num_steps)
        for scale in (None, jnp.float32(4.0)):
            scan_s = best_of(functools.partial(scan, scale), steps)
            loop_s = best_of(functools.partial(python_loop, num_steps, scale), steps)
            same = np.allclose(scan(scale), python_loop(num_steps, scale), atol=1e-4)
            rows.append(
                f"| {batch_size} | {num_steps} | {'4.0' if scale is not None else 'off'} | "
                f"{batch_size / scan_s:.1f} | {batch_size / loop_s:.1f} | "
                f"{loop_s / scan_s:.2f}x | {same} |"
            )
            print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", choices=["", "train", "sampler"])
    parser.add_argument(
        "--sampler_batches", default="1,8", help="comma-separated batch sizes of the sampler runs"
    )
    parser.add_argument("--train_cases", default=TRAIN_CASES, help="CASE:BATCH,... to train")
    parser.add_argument("--dtypes", default="float32", help="compute dtypes of the train step")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    mesh = meshes.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    print(f"JAX on {jax.devices()[0].device_kind}; PyTorch on {torch_device()}\n")
    if args.only in ("", "train"):
        print(
            "| model | dtype | batch | ours ex/s | PyTorch ex/s | ours / PyTorch |\n"
            "|---|---|---|---|---|---|"
        )
        compare_train(args.steps, mesh, parse_cases(args.train_cases), args.dtypes.split(","))
    if args.only in ("", "sampler"):
        print(
            "\n| batch | steps | guidance | scan images/s | Python-loop images/s | scan / loop | "
            "same images |\n|---|---|---|---|---|---|---|"
        )
        for batch_size in (int(b) for b in args.sampler_batches.split(",")):
            compare_sampler(args.steps, mesh, batch_size)


if __name__ == "__main__":
    main()
