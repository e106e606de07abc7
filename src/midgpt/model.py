"""GPT decoder: rotary positions, RMSNorm, QK-LayerNorm, tied embeddings, scanned layers.

Initialisation: the tied embedding is N(0, 1/D), so that the logits of a fresh
model have unit scale after the final RMSNorm; projections into the residual
stream's readers (q, k, v, MLP in) are N(0, 1/fan_in) truncated at 2 sigma (so
their std is 0.88/sqrt(fan_in)); projections that write back to the residual
stream (attention out, MLP out) are scaled down further by 1/sqrt(2 L), as in
GPT-2, so the stream does not grow with depth. Norm gains start at one.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from midgpt.config import Config, ModelConfig
from midgpt.errors import MidgptError
from midgpt.precision import lookup, matmul


class Norm(eqx.Module):
    """RMSNorm with a gain; centre=True subtracts the mean first: LayerNorm without bias."""

    weight_D: jax.Array
    centre: bool = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, centre: bool = False, eps: float = 1e-6):
        self.weight_D, self.centre, self.eps = jnp.ones((dim,)), centre, eps

    def __call__(self, x_xD):
        # In float32, rounded once: bf16's 8-bit mantissa makes the mean square
        # noisy, and XLA's CPU loops round (and run slower) after each bf16 op.
        x32_xD = x_xD.astype(jnp.float32)
        if self.centre:
            x32_xD = x32_xD - jnp.mean(x32_xD, axis=-1, keepdims=True)
        ms_x1 = jnp.mean(jnp.square(x32_xD), axis=-1, keepdims=True)
        return (x32_xD * jax.lax.rsqrt(ms_x1 + self.eps) * self.weight_D.astype(jnp.float32)).astype(x_xD.dtype)


def _truncated_normal(key, shape, scale):
    """N(0, scale²) cut at ±2 scale: its standard deviation is 0.88 scale."""
    return scale * jax.random.truncated_normal(key, -2.0, 2.0, shape)


def rotary_tables(positions_T, head_dim: int, base: float):
    """sin and cos of each (non-negative, int32) position's rotation angles, each (T, C), in float32: numpy
    constants for numpy positions."""
    inv_freq_R = base ** (-np.arange(0, head_dim, 2) / head_dim)  # R = C/2 rotated pairs; numpy float64, a constant
    if isinstance(positions_T, np.ndarray):
        # Positions known at trace time (training, evaluation): numpy constants, made in float64. Left to XLA, a
        # K-step call and a lone step built different tables (it folded them into constants in one only), and
        # the two programs' float32 parameters drifted 2e-7 apart.
        angle_TxR = positions_T[:, None] * inv_freq_R
        angle_TxC = np.concatenate([angle_TxR, angle_TxR], axis=-1)
        return np.sin(angle_TxC).astype(np.float32), np.cos(angle_TxC).astype(np.float32)
    # Traced positions (decoding). position * inv_freq in float32 loses the angle's low bits as positions grow:
    # a sample's ten-millionth token was 0.35 rad off, its log-probabilities 0.2. So the angle is summed over the
    # position's 4 bytes, each byte's step reduced mod 2 pi in float64 first: at most 4e-4 rad off over int32's
    # range (800,000 positions drawn; 2e-5 in the first thousand).
    positions_T = positions_T.astype(jnp.int32)
    angle_TxR = sum(
        ((positions_T >> 8 * i) & 255).astype(jnp.float32)[:, None]
        * np.mod(256.0**i * inv_freq_R, 2 * np.pi).astype(np.float32)
        for i in range(4)
    )
    angle_TxC = jnp.concatenate([angle_TxR, angle_TxR], axis=-1)
    return jnp.sin(angle_TxC), jnp.cos(angle_TxC)


def apply_rotary(x_BxTxHxC, sin_TxC, cos_TxC):
    """Rotate each (i, i + C/2) pair of features by its position's angle."""
    x1_BxTxHxR, x2_BxTxHxR = jnp.split(x_BxTxHxC, 2, axis=-1)
    rotated_BxTxHxC = jnp.concatenate([-x2_BxTxHxR, x1_BxTxHxR], axis=-1)
    sin_Tx1xC, cos_Tx1xC = sin_TxC[:, None, :], cos_TxC[:, None, :]
    out_BxTxHxC = x_BxTxHxC * cos_Tx1xC + rotated_BxTxHxC * sin_Tx1xC
    return out_BxTxHxC.astype(x_BxTxHxC.dtype)


def project(spec: str, x, w, out_dtype=None):
    """matmul(spec, x, w) of activations and weights, returned in out_dtype (x's).

    The output is named for remat="dots", which keeps it.
    """
    return checkpoint_name(matmul(spec, x, w).astype(out_dtype or x.dtype), "projection")


def dropout(x, rate: float, key):
    """Zero each element with probability rate (rounded to 1/256), scaling the rest to keep the mean.

    The identity without a key.
    """
    if key is None or rate == 0:
        return x
    threshold = round(rate * 256)
    # Four elements share one 32-bit random draw, 8 bits each: a draw per element
    # was a third of a CPU step with attention dropout.
    words = jax.random.bits(key, (-(-x.size // 4),), jnp.uint32)
    bytes_ = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[: x.size].reshape(x.shape)
    keep = checkpoint_name(bytes_ >= threshold, "dropout_mask")  # named: remat keeps it, not redraws it
    return jnp.where(keep, x / (1 - threshold / 256), 0).astype(x.dtype)


def softmax_attention(q_BxTxHxC, k_BxSxHxC, v_BxSxHxC, mask_TxS, rate: float, key):
    """Each query's average of the values, weighted by the softmax of its scores against the keys it may see."""
    # Scores and softmax in float32: bf16 loses the small probabilities.
    att_BxHxTxS = matmul("bthc,bshc->bhts", q_BxTxHxC, k_BxSxHxC)
    att_BxHxTxS = jnp.where(mask_TxS, att_BxHxTxS / math.sqrt(q_BxTxHxC.shape[-1]), -jnp.inf)
    prob_BxHxTxS = jax.nn.softmax(att_BxHxTxS, axis=-1).astype(q_BxTxHxC.dtype)
    prob_BxHxTxS = dropout(prob_BxHxTxS, rate, key)
    return matmul("bhts,bshc->bthc", prob_BxHxTxS, v_BxSxHxC).astype(q_BxTxHxC.dtype)


def einsum_attention(q_BxTxHxC, k_BxSxHxC, v_BxSxHxC, mask_TxS, causal: bool, rate: float, key):
    """softmax_attention, in two halves of the queries where the mask is causal (S = T), else whole."""
    # Positions before heads, as projected: XLA:CPU's bf16 matmul kernels do not take
    # the layout that a transpose to heads first gives, and would run in float32.
    T, S = q_BxTxHxC.shape[1], k_BxSxHxC.shape[1]
    # Causal: the first half of the queries sees only the first half of the keys, and scoring them against
    # those alone skips a quarter of the work (shakespeare_char on a CPU: 5.0 s -> 4.4 s a step).
    parts = [(0, T // 2, T // 2), (T // 2, T, S)] if causal else [(0, T, S)]  # (query from, to, keys to)
    keys = jax.random.split(key, len(parts)) if key is not None else [None] * len(parts)
    return jnp.concatenate([
        softmax_attention(q_BxTxHxC[:, t0:t1], k_BxSxHxC[:, :s1], v_BxSxHxC[:, :s1], mask_TxS[t0:t1, :s1], rate,
                          part_key)
        for (t0, t1, s1), part_key in zip(parts, keys)
    ], axis=1)


def attention_implementation(attention: str, dtype, with_dropout: bool, head_dim: int) -> str:
    """What ModelConfig.attention runs as: "einsum", or jax.nn.dot_product_attention's "xla" or "cudnn" (no dropout)."""
    if attention != "auto":
        if with_dropout and attention != "einsum":  # check_config refuses this for runs: here for a GPT made in code
            raise ValueError(f"attention={attention} (jax.nn.dot_product_attention) has no dropout: its probabilities "
                             "would be kept whole; use attention='einsum' or dropout=0")
        return attention
    # cuDNN's fused (flash) attention where it takes the shape; on CPUs the einsum path measured faster.
    return "cudnn" if not with_dropout and cudnn_flash_fits(dtype, head_dim, jax.devices()[0]) else "einsum"


def cudnn_flash_fits(dtype, head_dim: int, device) -> bool:
    """Whether cuDNN's flash attention runs this dtype and head width on the device (jax checks it only when called)."""
    if device.platform != "gpu" or "cuda" not in device.client.platform_version:
        return False  # a CPU, a TPU or an AMD GPU
    major = int(device.compute_capability.split(".")[0])  # flash attention needs Ampere (8) or later
    widest = 256 if major >= 9 else 128
    return jnp.dtype(dtype) == jnp.bfloat16 and major >= 8 and head_dim % 8 == 0 and head_dim <= widest


def check_cudnn(cfg: ModelConfig, dtype, device) -> None:
    """Refuse attention="cudnn" where cuDNN cannot run it: jax would fail only in the compile, with a traceback."""
    if cfg.attention == "cudnn" and not cudnn_flash_fits(dtype, cfg.head_dim, device):
        raise MidgptError(f"model.attention=cudnn does not run on {device.device_kind} with {jnp.dtype(dtype).name} "
                          f"and heads {cfg.head_dim} wide: it needs an NVIDIA GPU from Ampere on, "
                          "compute_dtype=bfloat16 and a head width that is a multiple of 8, up to 128 (256 from "
                          "Hopper); use --model.attention=auto")


class KVCache(eqx.Module):
    """Every layer's keys and values, a ring buffer: position p lives in slot p % block_size."""

    k_LxBxSxHxC: jax.Array
    v_LxBxSxHxC: jax.Array
    positions_S: jax.Array  # the position held by each slot; EMPTY where none is yet


EMPTY = -(2**30)  # a position that no query may attend to


class Attention(eqx.Module):
    wq_DxHxC: jax.Array
    wk_DxHxC: jax.Array
    wv_DxHxC: jax.Array
    wo_HxCxD: jax.Array
    q_norm: Norm
    k_norm: Norm
    dropout_rate: float = eqx.field(static=True)
    attention: str = eqx.field(static=True)  # ModelConfig.attention
    block_size: int = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key):
        D, H, C = cfg.n_embd, cfg.n_head, cfg.head_dim
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.wq_DxHxC = _truncated_normal(kq, (D, H, C), 1 / math.sqrt(D))
        self.wk_DxHxC = _truncated_normal(kk, (D, H, C), 1 / math.sqrt(D))
        self.wv_DxHxC = _truncated_normal(kv, (D, H, C), 1 / math.sqrt(D))
        self.wo_HxCxD = _truncated_normal(ko, (H, C, D), 1 / math.sqrt(D * 2 * cfg.n_layer))
        self.q_norm, self.k_norm = Norm(C, centre=True), Norm(C, centre=True)
        self.dropout_rate = cfg.dropout
        self.attention, self.block_size = cfg.attention, cfg.block_size

    @jax.named_scope("attention")
    def __call__(self, x_BxTxD, sin_TxC, cos_TxC, mask_TxS, *, key=None, cache=None, layer_index=None,
                 slots_T=None):
        """Attention of the T tokens to S keys: themselves, or with a cache its layer `layer_index`.

        With a cache, the new keys and values go to slots_T first. Returns (out, the updated cache or None).
        """
        attn_key, out_key = jax.random.split(key) if key is not None else (None, None)
        q_BxTxHxC = project("btd,dhc->bthc", x_BxTxD, self.wq_DxHxC)
        k_BxTxHxC = project("btd,dhc->bthc", x_BxTxD, self.wk_DxHxC)
        v_BxTxHxC = project("btd,dhc->bthc", x_BxTxD, self.wv_DxHxC)
        # QK-LayerNorm bounds the attention logits, which otherwise grow and
        # destabilise training (Wortsman et al. 2023).
        q_BxTxHxC = apply_rotary(self.q_norm(q_BxTxHxC), sin_TxC, cos_TxC)
        k_BxTxHxC = apply_rotary(self.k_norm(k_BxTxHxC), sin_TxC, cos_TxC)
        k_BxSxHxC, v_BxSxHxC = k_BxTxHxC, v_BxTxHxC
        if cache is not None:
            # Written in place into the cache of every layer: returned as a scan's stacked output, it was held
            # twice and copied whole at each token. The T slots are consecutive (GPT.hidden), so one slice.
            write = lambda c_LxBxSxHxC, c_BxTxHxC: jax.lax.dynamic_update_slice(
                c_LxBxSxHxC, c_BxTxHxC[None], (layer_index, 0, slots_T[0], 0, 0))
            cache = KVCache(write(cache.k_LxBxSxHxC, k_BxTxHxC), write(cache.v_LxBxSxHxC, v_BxTxHxC), cache.positions_S)
            k_BxSxHxC, v_BxSxHxC = cache.k_LxBxSxHxC[layer_index], cache.v_LxBxSxHxC[layer_index]
        with_dropout = key is not None and self.dropout_rate > 0
        implementation = attention_implementation(self.attention, x_BxTxD.dtype, with_dropout, q_BxTxHxC.shape[-1])
        if cache is None and implementation != "einsum":
            # Without a cache, S = T and mask_TxS is causal within a window of block_size.
            T = q_BxTxHxC.shape[1]
            window = (self.block_size - 1, 0) if T > self.block_size else None
            out_BxTxHxC = jax.nn.dot_product_attention(
                q_BxTxHxC, k_BxSxHxC, v_BxSxHxC, is_causal=True, local_window_size=window,
                implementation=implementation,
            )
        else:
            out_BxTxHxC = einsum_attention(q_BxTxHxC, k_BxSxHxC, v_BxSxHxC, mask_TxS, causal=cache is None,
                                           rate=self.dropout_rate, key=attn_key)
        out_BxTxD = project("bthc,hcd->btd", out_BxTxHxC, self.wo_HxCxD)
        out_BxTxD = dropout(out_BxTxD, self.dropout_rate, out_key)
        return out_BxTxD, cache


class MLP(eqx.Module):
    w_in_DxF: jax.Array
    w_out_DxF: jax.Array  # D x F like w_in: its gradient then transposes the D-wide cotangent, not the F-wide hidden
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key):
        D, F = cfg.n_embd, 4 * cfg.n_embd
        k_in, k_out = jax.random.split(key)
        self.w_in_DxF = _truncated_normal(k_in, (D, F), 1 / math.sqrt(D))
        self.w_out_DxF = _truncated_normal(k_out, (D, F), 1 / math.sqrt(F * 2 * cfg.n_layer))
        self.dropout_rate = cfg.dropout

    @jax.named_scope("mlp")
    def __call__(self, x_BxTxD, *, key=None):
        h_BxTxF = project("btd,df->btf", x_BxTxD, self.w_in_DxF)
        # GELU in float32, rounded once: in bf16, XLA rounds after each of its ten elementwise ops.
        h_BxTxF = jax.nn.gelu(h_BxTxF.astype(jnp.float32)).astype(x_BxTxD.dtype)
        out_BxTxD = project("btf,df->btd", h_BxTxF, self.w_out_DxF)
        return dropout(out_BxTxD, self.dropout_rate, key)


class Block(eqx.Module):
    attn_norm: Norm
    attn: Attention
    mlp_norm: Norm
    mlp: MLP

    def __init__(self, cfg: ModelConfig, *, key):
        k_attn, k_mlp = jax.random.split(key)
        self.attn_norm, self.mlp_norm = Norm(cfg.n_embd), Norm(cfg.n_embd)
        self.attn = Attention(cfg, key=k_attn)
        self.mlp = MLP(cfg, key=k_mlp)

    def __call__(self, x_BxTxD, sin_TxC, cos_TxC, mask_TxS, *, key=None, cache=None, layer_index=None,
                 slots_T=None):
        """(x after the layer, the updated cache or None), as Attention's."""
        attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
        attn_BxTxD, cache = self.attn(self.attn_norm(x_BxTxD), sin_TxC, cos_TxC, mask_TxS,
                                      key=attn_key, cache=cache, layer_index=layer_index, slots_T=slots_T)
        x_BxTxD = x_BxTxD + attn_BxTxD
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD), key=mlp_key)
        return x_BxTxD, cache


REMAT_POLICIES = {  # what each layer keeps for the backward pass besides its input, by checkpoint_name
    "full": jax.checkpoint_policies.save_only_these_names("dropout_mask"),
    "dots": jax.checkpoint_policies.save_only_these_names("dropout_mask", "projection"),  # the weight matmuls' outputs
}


class GPT(eqx.Module):
    # One array serves as token embedding and output projection, so an update
    # to one is an update to the other.
    embed_VxD: jax.Array
    blocks: Block  # every array has a leading L axis: layers stacked for lax.scan
    final_norm: Norm
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key):
        k_embed, k_blocks = jax.random.split(key)
        self.embed_VxD = jax.random.normal(k_embed, (cfg.vocab_size, cfg.n_embd)) / math.sqrt(cfg.n_embd)
        make_block = lambda k: Block(cfg, key=k)
        self.blocks = eqx.filter_vmap(make_block)(jax.random.split(k_blocks, cfg.n_layer))
        self.final_norm = Norm(cfg.n_embd)
        self.config = cfg

    def __call__(self, tokens_BxT, *, key=None, positions_T=None):
        """Next-token logits (float32) for every position. See `hidden`, which also decodes with a KV cache."""
        x_BxTxD, embed_VxD, _ = self.hidden(tokens_BxT, key=key, positions_T=positions_T)
        return project("btd,vd->btv", x_BxTxD, embed_VxD, out_dtype=jnp.float32)

    def hidden(self, tokens_BxT, *, key=None, positions_T=None, cache: KVCache | None = None, gather=None):
        """(final hidden states, the output layer's table, the updated cache or None); dropout only with a key.

        gather, if given, takes parameters just before their use: FSDP's all-gather (sharding.gather_params).
        """
        cfg = self.config
        embed_key, block_keys_L = None, None
        if key is not None:
            embed_key, blocks_key = jax.random.split(key)
            block_keys_L = jax.random.split(blocks_key, cfg.n_layer)
        gather = gather or (lambda params: params)
        embed_VxD = gather(self.embed_VxD)  # for the lookup and the output layer
        x_BxTxD = lookup(embed_VxD, tokens_BxT)
        x_BxTxD = dropout(x_BxTxD, cfg.dropout, embed_key)
        if positions_T is None:
            positions_T = np.arange(tokens_BxT.shape[1])
        sin_TxC, cos_TxC = rotary_tables(positions_T, cfg.head_dim, cfg.rope_base)
        slots_T, key_positions_S, layers_L = None, positions_T, None
        if cache is not None:
            # Keys are written before the tokens attend: several tokens at once reaching block_size would
            # overwrite keys that the earlier ones still see. Past it, decode one at a time (as sample.generate
            # does). Checked at trace time: eqx.error_if is a host callback, and JAX's persistent cache keeps no
            # program that has one.
            if tokens_BxT.shape[1] > 1 and (isinstance(positions_T, jax.core.Tracer)
                                            or int(positions_T[-1]) >= cfg.block_size):
                raise ValueError("several tokens at once with a cache take positions known as the call is traced "
                                 "(numpy), all below block_size; past it, pass them one at a time")
            slots_T = positions_T % cfg.block_size  # consecutive: Attention writes them as one slice
            key_positions_S = cache.positions_S.at[slots_T].set(positions_T)
            cache = KVCache(cache.k_LxBxSxHxC, cache.v_LxBxSxHxC, key_positions_S)
            layers_L = jnp.arange(cfg.n_layer)  # scanned with the layers: each one's index into the whole cache
        # Each token sees itself and the block_size - 1 before it: causal within block_size, a sliding window beyond.
        distance_TxS = positions_T[:, None] - key_positions_S[None, :]
        mask_TxS = (distance_TxS >= 0) & (distance_TxS < cfg.block_size)

        block_params, block_static = eqx.partition(self.blocks, eqx.is_array)

        def run_layer(carry, inputs):
            x_BxTxD, cache = carry
            params, layer_key, layer_index = inputs
            block = eqx.combine(gather(params), block_static)
            return block(x_BxTxD, sin_TxC, cos_TxC, mask_TxS, key=layer_key, cache=cache,
                         layer_index=layer_index, slots_T=slots_T), None

        # Rematerialise in the backward pass: activation memory then holds what the policy saves
        # of each layer, and the internals of one scan iteration's scan_unroll layers at a time.
        if cfg.remat != "none":
            run_layer = jax.checkpoint(run_layer, policy=REMAT_POLICIES[cfg.remat])

        (x_BxTxD, cache), _ = jax.lax.scan(run_layer, (x_BxTxD, cache), (block_params, block_keys_L, layers_L),
                                           unroll=cfg.scan_unroll)
        x_BxTxD = gather(self.final_norm)(x_BxTxD)
        return x_BxTxD, embed_VxD, cache

    def empty_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for batch_size sequences, in the activations' dtype (the embedding's)."""
        cfg = self.config
        H, S = cfg.n_head, cfg.block_size
        shape = (cfg.n_layer, batch_size, S, H, cfg.head_dim)
        dtype = self.embed_VxD.dtype
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((S,), EMPTY, jnp.int32))


def fresh_model(config: Config) -> GPT:
    """The run's initial model, in param_dtype: its shapes are those of every checkpoint's model."""
    return cast_floats(GPT(config.model, key=jax.random.key(config.seed)), jnp.dtype(config.param_dtype))


def cast_floats(tree, dtype):
    """Cast the floating-point arrays of a pytree; leave the rest alone."""
    is_float = lambda x: eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)
    return jax.tree.map(lambda x: x.astype(dtype) if is_float(x) else x, tree)


def count_params(model: GPT) -> int:
    """Number of parameters (the tied embedding counted once)."""
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
