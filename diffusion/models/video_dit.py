"""Video DiT shaped exactly like Wan 2.1's transformer (Wan Team 2025, "Wan: Open and Advanced
Large-Scale Video Generative Models"; diffusers' `WanTransformer3DModel`), so that Wan
weights import one to one (diffusion/hf/wan_transformer.py) and a tiny size trains on a CPU.

clip (B, T, H, W, C) -> 3-D patches (pt, ph, pw) -> linear tokens (B, N, D), N = T'H'W'
time t -> sinusoidal -> MLP -> temb (B, D) -> SiLU -> Dense -> 6 modulation vectors (B, 6, D),
  computed once and shared: each block adds its own learned `scale_shift_table` (6, D)
text states (B, L, text_dim) -> Dense -> GELU(tanh) -> Dense -> (B, L, D)
blocks:  x = x + gate_msa * self_attn(modulate(norm1(x), shift_msa, scale_msa), 3-D RoPE on q, k)
         x = x + cross_attn(norm2(x), text)          (norm2 affine: Wan's cross_attn_norm)
         x = x + gate_ffn * ffn(modulate(norm3(x), shift_ffn, scale_ffn))
final:   modulate(norm(x), (temb + table)) -> Dense -> unpatchify -> (B, T, H, W, C_out)

Queries and keys are RMS-normalised over the whole projection, all heads together (Wan's
"rms_norm_across_heads"). A still image is a one-frame clip: (B, 1, H, W, C), or (B, H, W, C)
which returns the same rank.

Time: continuous t in [0, 1], t = 1 pure noise, embedded as t * time_scale (1000): diffusers' Wan
takes timesteps in [0, 1000], so the two agree on t * 1000.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion import sharding
from diffusion.errors import UserError
from diffusion.models import attention, blocks, embeddings, layers, lora, patches, rope
from diffusion.models.dit import modulate

# ============================================================================================
# Config and variants
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class VideoDiTConfig:
    """Every size and numeric choice of a video DiT (field names follow diffusers' Wan config)."""

    in_channels: int = 3  # channels of the (latent) clip
    out_channels: int = 3  # channels the model predicts
    patch_size: tuple[int, int, int] = (1, 4, 4)  # (frames, rows, columns) of a 3-D patch
    width: int = 128  # hidden size D (Wan's num_attention_heads * attention_head_dim)
    depth: int = 4  # number of blocks (Wan's num_layers)
    num_heads: int = 4  # attention heads
    ffn_dim: int = 512  # hidden units of each block's feed-forward network
    text_dim: int = 128  # width of the text token states (umT5: 4096)
    # Beyond Wan: the blocks also cross-attend to the text tower's input-layer word embeddings
    # (B, L, text_dim), through their own projection. A contrastive tower's final states keep
    # only what told its batches apart; its word embeddings name every word (configs/shapes.py).
    word_conditioning: bool = False
    # Beyond Wan: "patch" is Wan's linear 3-D patch embedding; "conv" runs stride-2 3x3
    # convolutions on each frame first (patches.ConvStem, as the image DiT's option), so a
    # token sees the edges of its neighbours across patch borders: a moving shape sits at
    # every offset inside a patch, not on a grid (docs/experiments/).
    input_stem: str = "patch"
    freq_dim: int = 256  # sinusoidal frequencies of the timestep embedding
    eps: float = 1e-6  # epsilon of every LayerNorm and RMS norm
    qk_norm: bool = True  # RMS norm on queries and keys over all heads together (Wan)
    cross_attn_norm: bool = True  # affine LayerNorm before the cross-attention (Wan: True)
    rope_max_seq_len: int = 1024  # longest (frames, rows, columns) grid axis the RoPE covers
    rope_theta: float = 10000.0  # base of the rotary frequencies
    time_scale: float = 1000.0  # t in [0, 1] is embedded as t * time_scale
    dtype: str = "float32"  # compute dtype ('bfloat16' on TPU); params stay param_dtype
    param_dtype: str = "float32"  # parameter storage dtype
    attention_impl: str = "xla"  # self-attention core, one of attention.ATTENTION_IMPLEMENTATIONS
    remat_policy: str = "none"  # per-block rematerialisation, see blocks.REMAT_POLICIES
    scan_layers: bool = False  # nnx.scan over blocks (params get a leading 'layers' axis)
    lora_rank: int = 0  # rank r of low-rank adapters on the block projections (0: none)
    lora_alpha: float | None = None  # adapters scale their update by alpha / r (None: alpha = r)
    lora_targets: tuple[str, ...] = tuple(lora.TARGETS)  # projections adapted (lora.TARGETS)

    def __post_init__(self):
        patch = tuple(self.patch_size)
        if len(patch) != 3 or not all(isinstance(p, numbers.Integral) and p >= 1 for p in patch):
            raise UserError(
                f"patch_size must be three positive integers (frames, rows, columns), got "
                f"{self.patch_size!r}; Wan 2.1 uses (1, 2, 2)"
            )
        # A config.json round trip gives a list: keep the frozen field a hashable tuple of ints.
        object.__setattr__(self, "patch_size", tuple(int(p) for p in patch))
        for name in ("in_channels", "out_channels", "width", "depth", "num_heads", "ffn_dim",
                     "text_dim", "freq_dim", "rope_max_seq_len"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.width % self.num_heads:
            raise UserError(
                f"width {self.width} is not divisible by num_heads {self.num_heads}; choose a "
                "width that is a multiple of num_heads"
            )
        head_dim = self.width // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise UserError(
                f"the head dimension width / num_heads = {head_dim} must be even and at least 6 "
                "for the 3-D rotary positions (Wan splits it over frames, rows and columns)"
            )
        if self.freq_dim % 2:
            raise UserError(f"freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        for name in ("eps", "rope_theta", "time_scale"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in layers.DTYPES:
                raise UserError(
                    f"unknown {name} {getattr(self, name)!r}; valid: {sorted(layers.DTYPES)}"
                )
        if self.remat_policy not in blocks.REMAT_POLICIES:
            raise UserError(
                f"unknown remat_policy {self.remat_policy!r}; "
                f"valid: {sorted(blocks.REMAT_POLICIES)}"
            )
        self._check_lora()
        self._check_input_stem()
        if self.attention_impl not in attention.ATTENTION_IMPLEMENTATIONS:
            raise UserError(
                f"unknown attention_impl {self.attention_impl!r}; "
                f"valid: {attention.ATTENTION_IMPLEMENTATIONS}"
            )

    def _check_lora(self):
        if not isinstance(self.lora_rank, numbers.Integral) or self.lora_rank < 0:
            raise UserError(f"lora_rank must be an integer >= 0 (0: no adapters), got "
                            f"{self.lora_rank!r}")  # fmt: skip
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UserError(f"lora_alpha must be positive (or None: alpha = rank), got "
                            f"{self.lora_alpha!r}")  # fmt: skip
        try:  # a config.json round trip gives a list
            object.__setattr__(self, "lora_targets", lora.check_targets(self.lora_targets))
        except ValueError as error:
            raise UserError(f"lora_targets: {error}") from error

    def _check_input_stem(self):
        if self.input_stem not in INPUT_STEMS:
            raise UserError(f"unknown input_stem {self.input_stem!r}; valid: {INPUT_STEMS}")
        if self.input_stem == "patch":
            return
        _, rows, columns = self.patch_size
        if rows != columns:
            raise UserError(
                f"input_stem='conv' needs square patches (rows = columns), got patch_size "
                f"{self.patch_size}; use equal rows and columns or input_stem='patch'"
            )
        try:
            patches.conv_stem_depth(rows, self.width)
        except ValueError as error:
            raise UserError(f"input_stem='conv': {error}") from error

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)


INPUT_STEMS = ("patch", "conv")  # VideoDiTConfig.input_stem

_WAN = dict(in_channels=16, out_channels=16, patch_size=(1, 2, 2), text_dim=4096)

# One table of variants; `video_dit_config(name, **overrides)` builds the config.
VIDEO_DIT_VARIANTS: dict[str, dict] = {
    # The CPU default: 8 frames of 32 x 32 RGB in (1, 4, 4) patches are 512 tokens; text states
    # of the tiny CLIP text tower (width 128).
    "tiny": dict(),
    # Wan 2.1 T2V sizes (diffusers' Wan-AI/Wan2.1-T2V-*-Diffusers transformer/config.json).
    "wan2.1-1.3b": dict(**_WAN, width=1536, depth=30, num_heads=12, ffn_dim=8960),
    "wan2.1-14b": dict(**_WAN, width=5120, depth=40, num_heads=40, ffn_dim=13824),
}


def video_dit_config(variant: str = "tiny", **overrides) -> VideoDiTConfig:
    """The VideoDiTConfig of a VIDEO_DIT_VARIANTS entry, with field overrides."""
    if variant not in VIDEO_DIT_VARIANTS:
        raise UserError(
            f"unknown video DiT variant {variant!r}; valid: {sorted(VIDEO_DIT_VARIANTS)}"
        )
    fields = {f.name for f in dataclasses.fields(VideoDiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown VideoDiTConfig field(s) {unknown}; valid: {sorted(fields)}")
    return VideoDiTConfig(**{**VIDEO_DIT_VARIANTS[variant], **overrides})


# ============================================================================================
# Initialisation (Wan's `init_weights`): every Linear Xavier-uniform with zero bias; the text and
# time embedders' Linears N(0, 0.02); the modulation tables N(0, 1 / D); the output projection
# zero, so that a model trained from scratch starts by predicting 0 for every input: no random
# readout of random features adds its noise to the first predictions, and the readout grows from
# features that training has already shaped (adaLN-Zero's reason, DiT sec. 3.2). Unlike DiT, Wan
# does not zero the block gates: the tables give them a small random start (std 1 / sqrt(D)).
# ============================================================================================

EMBEDDER_INIT = layers.normal(0.02)


def table_init(width: int):
    return layers.normal(1.0 / math.sqrt(width))


def _dtypes(config: VideoDiTConfig) -> dict:
    return dict(
        dtype=layers.resolve_dtype(config.dtype),
        param_dtype=layers.resolve_dtype(config.param_dtype),
    )


# ============================================================================================
# Embedders
# ============================================================================================


class TimeEmbedding(nnx.Module):
    """t -> temb (B, D) and the six shared modulation vectors (B, 6, D) (Wan's time_embedding
    and time_projection). Kept in float32 whatever the compute dtype, as Wan keeps them: these
    vectors scale every block's residual stream."""

    def __init__(self, config: VideoDiTConfig, *, rngs: nnx.Rngs):
        self.freq_dim = config.freq_dim
        self.time_scale = config.time_scale
        self.width = config.width
        kw = dict(dtype=jnp.float32, param_dtype=_dtypes(config)["param_dtype"], rngs=rngs)
        d = config.width
        self.fc1 = layers.Dense(
            config.freq_dim, d, ("mlp", "embed"), kernel_init=EMBEDDER_INIT, **kw
        )
        self.fc2 = layers.Dense(d, d, ("mlp", "embed"), kernel_init=EMBEDDER_INIT, **kw)
        self.projection = layers.Dense(d, 6 * d, ("embed", "mlp"), **kw)

    def __call__(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        # float32 before scaling: in bfloat16, t = 0.999 would already round to 1.
        scaled = t.astype(jnp.float32) * self.time_scale  # (B,)
        freqs = embeddings.timestep_embedding(scaled, self.freq_dim)  # (B, F)
        temb = self.fc2(jax.nn.silu(self.fc1(freqs)))  # (B, D)
        modulation = self.projection(jax.nn.silu(temb))  # (B, 6D)
        return temb, modulation.reshape(t.shape[0], 6, self.width)  # (B, D), (B, 6, D)


class TextEmbedding(nnx.Module):
    """Text states (B, L, text_dim) -> Dense -> GELU(tanh) -> Dense -> (B, L, D) (Wan's
    text_embedding, diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, config: VideoDiTConfig, *, rngs: nnx.Rngs):
        kw = dict(kernel_init=EMBEDDER_INIT, rngs=rngs, **_dtypes(config))
        self.fc1 = layers.Dense(config.text_dim, config.width, ("mlp", "embed"), **kw)
        self.fc2 = layers.Dense(config.width, config.width, ("mlp", "embed"), **kw)

    def __call__(self, context: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(context), approximate=True)  # (B, L, D)
        return self.fc2(h)  # (B, L, D)


# ============================================================================================
# Attention with queries and keys RMS-normalised across heads
# ============================================================================================


class HeadsRMSNorm(nnx.Module):
    """RMS norm (Zhang & Sennrich 2019) over all heads of a (B, S, H, K) projection together,
    x / sqrt(mean(x^2) + eps) * g with g (H, K): Wan's "rms_norm_across_heads", torch's
    RMSNorm over the flat H * K features. Statistics in float32."""

    def __init__(self, heads: int, head_dim: int, eps: float, *, param_dtype, rngs):
        self.eps = eps
        self.scale = layers.make_param(
            rngs, layers.ones, (heads, head_dim), ("heads", "kv"), param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True)  # (B, S, 1, 1)
        y = x32 * jax.lax.rsqrt(mean_square + self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


class QKNormAttention(nnx.Module):
    """Wan's attention projections: query/key/value/output with biases, kernels (embed, heads, kv)
    so tensor parallelism splits heads; queries and keys RMS-normalised across heads.

    The attention itself is left to the caller (`project` then a core, then `output`), so that
    self-attention can rotate q and k and use the configured core, and cross-attention a mask.
    `name` ("self_attn" or "cross_attn") picks its projections' adapters in config.lora_targets.
    """

    def __init__(self, config: VideoDiTConfig, name: str, *, rngs: nnx.Rngs):
        dtypes = _dtypes(config)
        self.dtype = dtypes["dtype"]
        d, heads, head_dim = config.width, config.num_heads, config.head_dim
        # Xavier-uniform over the whole (in, heads * head_dim) matrix, as Wan's nn.Linear init.
        in_init = nnx.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2)
        )
        out_init = nnx.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2
        )
        p = lambda init, shape, axes: layers.make_param(
            rngs, init, shape, axes, dtypes["param_dtype"]
        )
        in_axes, bias_axes = ("embed", "heads", "kv"), ("heads", "kv")
        self.query_kernel = p(in_init, (d, heads, head_dim), in_axes)
        self.key_kernel = p(in_init, (d, heads, head_dim), in_axes)
        self.value_kernel = p(in_init, (d, heads, head_dim), in_axes)
        self.query_bias = p(layers.zeros, (heads, head_dim), bias_axes)
        self.key_bias = p(layers.zeros, (heads, head_dim), bias_axes)
        self.value_bias = p(layers.zeros, (heads, head_dim), bias_axes)
        self.out_kernel = p(out_init, (heads, head_dim, d), ("heads", "kv", "embed"))
        self.out_bias = p(layers.zeros, (d,), ("embed",))
        norm = lambda: HeadsRMSNorm(
            heads, head_dim, config.eps, param_dtype=dtypes["param_dtype"], rngs=rngs
        )
        self.query_norm = nnx.data(norm() if config.qk_norm else None)
        self.key_norm = nnx.data(norm() if config.qk_norm else None)
        # The adapters draw from the same key stream as the base: a model with adapters is
        # initialised unlike one without, which is moot, as a fine-tune loads its base weights.
        adapter = lambda target, *shapes_and_axes: nnx.data(
            lora.adapter(f"{name}.{target}", config, *shapes_and_axes, rngs=rngs)
        )
        in_args = ((d,), (heads, head_dim), ("embed",), ("heads", "kv"))
        self.query_adapter = adapter("query", *in_args)
        self.key_adapter = adapter("key", *in_args)
        self.value_adapter = adapter("value", *in_args)
        self.out_adapter = adapter("out", (heads, head_dim), (d,), ("heads", "kv"), ("embed",))

    def _linear(self, x, kernel, bias, adapter):
        y = layers.matmul(x.astype(self.dtype), kernel[...].astype(self.dtype))  # (B, S, H, K)
        y = y + bias[...].astype(self.dtype)
        return y if adapter is None else y + adapter(x)

    def project(self, x: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: (B, T, D) queries' source, context: (B, S, D) keys' source -> q (B, T, H, K),
        k and v (B, S, H, K)."""
        q = self._linear(x, self.query_kernel, self.query_bias, self.query_adapter)  # (B, T, H, K)
        k = self._linear(context, self.key_kernel, self.key_bias, self.key_adapter)  # (B, S, H, K)
        v = self._linear(context, self.value_kernel, self.value_bias, self.value_adapter)
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        return q, k, v

    def output(self, y: jax.Array) -> jax.Array:
        """(B, T, H, K) attention result -> (B, T, D)."""
        out = layers.matmul(y.astype(self.dtype), self.out_kernel[...].astype(self.dtype), 2)
        out = out + self.out_bias[...].astype(self.dtype)  # (B, T, D)
        return out if self.out_adapter is None else out + self.out_adapter(y)


def self_attention_core(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """The one self-attention call of the video DiT: (B, N, H, K) x 3 -> (B, N, H, K), no mask
    (every spatio-temporal token sees every other). `implementation` (config.attention_impl)
    picks the core, so a sequence-parallel one is swapped in here and nowhere else."""
    return attention.dot_product_attention(q, k, v, None, implementation)


def cross_attention_core(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, implementation: str
) -> jax.Array:
    """Queries (B, N, H, K) to text keys (B, L, H, K). A sequence-parallel core splits the keys'
    token axis like the queries'; the text is not split that way (and split queries need no
    communication here), so the einsum core runs it, or the kernel the configuration chose: the
    fused one, or splash (which splits only the queries) for either splash implementation."""
    kernels = {"fused": "fused", "splash": "splash", "ulysses_splash": "splash"}
    return attention.dot_product_attention(q, k, v, mask, kernels.get(implementation, "xla"))


# ============================================================================================
# Blocks
# ============================================================================================


def modulation_chunks(table: jax.Array, modulation: jax.Array) -> list[jax.Array]:
    """(n, D) learned offsets + (B, n, D) time modulation -> n arrays (B, D), in float32.

    Each chunk shifts, scales or gates the residual stream, so it takes the stream's layout:
    batch split, width whole (see dit.AdaLNModulation for the XLA partitioning this avoids).
    """
    summed = table[...].astype(jnp.float32)[None] + modulation.astype(jnp.float32)  # (B, n, D)
    return [
        sharding.with_logical_constraint(summed[:, i], ("activation_batch", "activation_embed"))
        for i in range(summed.shape[1])
    ]


class VideoDiTBlock(nnx.Module):
    """Wan's transformer block (module docstring), conditioned by the shared (B, 6, D) time
    modulation plus its own scale_shift_table (6, D)."""

    def __init__(self, config: VideoDiTConfig, *, rngs: nnx.Rngs):
        dtypes = _dtypes(config)
        d = config.width
        self.dtype = dtypes["dtype"]
        self.attention_impl = config.attention_impl
        self.norm1 = layers.LayerNorm(d, eps=config.eps, affine=False, **dtypes)
        self.self_attn = QKNormAttention(config, "self_attn", rngs=rngs)
        self.norm2 = nnx.data(
            layers.LayerNorm(d, eps=config.eps, rngs=rngs, **dtypes)
            if config.cross_attn_norm
            else None
        )
        self.cross_attn = QKNormAttention(config, "cross_attn", rngs=rngs)
        self.norm3 = layers.LayerNorm(d, eps=config.eps, affine=False, **dtypes)
        self.ffn = layers.MLP(d, config.ffn_dim, "gelu_tanh", rngs=rngs, **dtypes)
        self.scale_shift_table = layers.make_param(
            rngs, table_init(d), (6, d), ("norm", "embed"), dtypes["param_dtype"]
        )
        f = config.ffn_dim
        self.ffn.fc1.adapter = nnx.data(
            lora.adapter("ffn.fc1", config, (d,), (f,), ("embed",), ("mlp",), rngs=rngs)
        )
        self.ffn.fc2.adapter = nnx.data(
            lora.adapter("ffn.fc2", config, (f,), (d,), ("mlp",), ("embed",), rngs=rngs)
        )

    def __call__(
        self,
        x: jax.Array,
        modulation: jax.Array,
        context: jax.Array,
        context_mask: jax.Array | None,
        rope_cos: jax.Array,
        rope_sin: jax.Array,
    ) -> jax.Array:
        """x: (B, N, D) tokens; modulation: (B, 6, D) float32; context: (B, L, D) embedded text;
        context_mask: (B, L) or None; rope_cos, rope_sin: (N, K / 2)."""
        x = sharding.with_logical_constraint(x, layers.TOKEN_AXES)
        chunks = modulation_chunks(self.scale_shift_table, modulation)  # 6 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = chunks

        h = modulate(self.norm1(x), shift_msa, scale_msa).astype(self.dtype)  # (B, N, D)
        q, k, v = self.self_attn.project(h, h)  # (B, N, H, K) each
        q = rope.apply_rotary(q, rope_cos, rope_sin)
        k = rope.apply_rotary(k, rope_cos, rope_sin)
        y = self.self_attn.output(self_attention_core(q, k, v, self.attention_impl))  # (B, N, D)
        x = x + (gate_msa[:, None] * y).astype(x.dtype)

        h = x if self.norm2 is None else self.norm2(x)  # (B, N, D)
        q, k, v = self.cross_attn.project(h, context)  # (B, N, H, K), (B, L, H, K) x 2
        mask = attention.make_attention_mask(x.shape[1], context_mask, key_length=k.shape[1])
        x = x + self.cross_attn.output(cross_attention_core(q, k, v, mask, self.attention_impl))

        h = modulate(self.norm3(x), shift_ffn, scale_ffn).astype(self.dtype)  # (B, N, D)
        x = x + (gate_ffn[:, None] * self.ffn(h)).astype(x.dtype)  # (B, N, D)
        return sharding.with_logical_constraint(x, layers.TOKEN_AXES)


class FinalLayer(nnx.Module):
    """(shift, scale) = temb + table (2, D) on a parameter-free LayerNorm, then Dense
    (D -> pt*ph*pw*C_out), zero-initialised (see the initialisation banner)."""

    def __init__(self, config: VideoDiTConfig, *, rngs: nnx.Rngs):
        dtypes = _dtypes(config)
        d = config.width
        self.dtype = dtypes["dtype"]
        self.norm = layers.LayerNorm(d, eps=config.eps, affine=False, **dtypes)
        self.scale_shift_table = layers.make_param(
            rngs, table_init(d), (2, d), ("norm", "embed"), dtypes["param_dtype"]
        )
        self.linear = layers.Dense(
            d,
            config.patch_volume * config.out_channels,
            ("embed", "patch"),
            kernel_init=layers.zeros,
            rngs=rngs,
            **dtypes,
        )

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """x: (B, N, D), temb: (B, D) -> (B, N, pt*ph*pw*C_out)."""
        shift, scale = modulation_chunks(self.scale_shift_table, temb[:, None])  # 2 x (B, D)
        h = modulate(self.norm(x), shift, scale).astype(self.dtype)  # (B, N, D)
        return self.linear(h)


# ============================================================================================
# Video DiT
# ============================================================================================


class VideoDiT(nnx.Module):
    """(x (B, T, H, W, C) or (B, H, W, C), t (B,), context (B, L, text_dim), context_mask (B, L))
    -> (B, T, H, W, C_out) (or (B, H, W, C_out)) float32."""

    def __init__(self, config: VideoDiTConfig, *, rngs: nnx.Rngs):
        dtypes = _dtypes(config)
        self.config = config
        self.dtype = dtypes["dtype"]
        pt, rows, _ = config.patch_size
        if config.input_stem == "conv":
            self.patch_embed = patches.ConvStem(
                rows, config.in_channels, config.width, frames_per_token=pt, rngs=rngs, **dtypes
            )
        else:  # Xavier over the flattened Conv3d kernel, as Wan initialises it
            self.patch_embed = layers.Dense(
                config.patch_volume * config.in_channels,
                config.width,
                ("patch", "embed"),
                rngs=rngs,
                **dtypes,
            )
        self.time_embed = TimeEmbedding(config, rngs=rngs)
        self.text_embed = TextEmbedding(config, rngs=rngs)
        self.words_embed = nnx.data(
            TextEmbedding(config, rngs=rngs) if config.word_conditioning else None
        )
        self.blocks = blocks.BlockStack(
            lambda r: VideoDiTBlock(config, rngs=r),
            config.depth,
            scan_layers=config.scan_layers,
            remat_policy=config.remat_policy,
            rngs=rngs,
        )
        self.final_layer = FinalLayer(config, rngs=rngs)

    def _check_inputs(self, x, t, context, context_mask, words) -> None:
        config = self.config
        b, frames, height, width, channels = x.shape
        if channels != config.in_channels:
            raise UserError(
                f"x has {channels} channels (last axis of {x.shape}), the model expects "
                f"in_channels={config.in_channels}; clips are channels-last (B, T, H, W, C)"
            )
        pt, ph, pw = config.patch_size
        if frames % pt or height % ph or width % pw:
            raise UserError(
                f"clip size {frames}x{height}x{width} (frames x height x width) is not divisible "
                f"by patch_size {config.patch_size}; use multiples of it"
            )
        grid = (frames // pt, height // ph, width // pw)
        if max(grid) > config.rope_max_seq_len:
            raise UserError(
                f"the token grid {grid} exceeds rope_max_seq_len={config.rope_max_seq_len} along "
                "an axis; use a shorter clip or smaller frames, or raise rope_max_seq_len"
            )
        if t.shape != (b,):
            raise UserError(f"t must have shape (batch,) = ({b},), got {t.shape}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != config.text_dim:
            raise UserError(
                f"context must be (batch={b}, length, text_dim={config.text_dim}), "
                f"got {context.shape}"
            )
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise UserError(
                f"context_mask {context_mask.shape} must be (batch, length) = {context.shape[:2]}"
            )
        if config.word_conditioning and (words is None or words.shape != context.shape):
            got = None if words is None else words.shape
            raise UserError(
                f"word_conditioning=True needs words of the context's shape {context.shape} "
                f"(the text tower's word embeddings), got {got}"
            )
        if not config.word_conditioning and words is not None:
            raise UserError("words were given to a video DiT with word_conditioning=False")

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array,
        context_mask: jax.Array | None = None,
        words: jax.Array | None = None,
    ) -> jax.Array:
        """context_mask: truthy for real text tokens; None (Wan's and diffusers' way) lets every
        token, padding included, be attended. words (B, L, text_dim): the text tower's word
        embeddings of the same tokens, for a model with word_conditioning (else None)."""
        config = self.config
        still = x.ndim == 4
        if still:
            x = x[:, None]  # (B, 1, H, W, C): an image is a one-frame clip
        if x.ndim != 5:
            raise UserError(
                f"x must be a clip (B, T, H, W, C) or an image (B, H, W, C), got shape {x.shape}"
            )
        self._check_inputs(x, t, context, context_mask, words)
        _, frames, height, width, _ = x.shape
        pt, ph, pw = config.patch_size
        grid = (frames // pt, height // ph, width // pw)

        x = x.astype(self.dtype)
        if config.input_stem == "patch":
            x = patches.patchify_3d(x, config.patch_size)
        tokens = self.patch_embed(x)
        tokens = sharding.with_logical_constraint(tokens, layers.TOKEN_AXES)  # (B, N, D)
        temb, modulation = self.time_embed(t)  # (B, D), (B, 6, D)
        text = self.text_embed(context)  # (B, L, D)
        if config.word_conditioning:  # the words after the states: (B, 2L, D), mask (B, 2L)
            text = jnp.concatenate([text, self.words_embed(words)], axis=1)
            if context_mask is not None:
                context_mask = jnp.concatenate([context_mask, context_mask], axis=1)
        rope_cos, rope_sin = rope.grid_cos_sin(grid, config.head_dim, config.rope_theta)
        tokens = self.blocks(tokens, modulation, text, context_mask, rope_cos, rope_sin)
        out = self.final_layer(tokens, temb)  # (B, N, pt*ph*pw*C_out)
        clips = patches.unpatchify_3d(out, config.patch_size, frames, height, width)
        clips = clips.astype(jnp.float32)  # (B, T, H, W, C_out)
        return clips[:, 0] if still else clips
