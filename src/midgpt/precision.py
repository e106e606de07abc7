"""Mixed precision with gradients written out: compute-dtype inputs, float32 sums.

The matmul, the embedding lookup and the loss, each a custom_vjp whose backward
pass rounds where it must and sums in float32, which autodiff would not do.
"""

import functools

import jax
import jax.numpy as jnp

from midgpt import cpu


def compute_dtype(name: str) -> str:
    """What Config.compute_dtype runs as: "auto" is bfloat16, but float32 on a CPU not known to multiply bf16 faster."""
    if name != "auto":
        return name
    on_cpu = jax.devices()[0].platform == "cpu"
    return "float32" if on_cpu and not multiplies_bf16_faster(cpu.info()) else "bfloat16"


def multiplies_bf16_faster(cpuinfo_text: str) -> bool:
    """Whether XLA's bf16 matmuls outrun its float32 ones on this x86 CPU, by /proc/cpuinfo (others: not measured)."""
    # Measured in XLA (benchmarks/RESULTS.md): Intel's AMX tiles, 3.3x float32's rate; AMD's avx512_bf16, 2.0-2.6x
    # on Zen 4 (whose 512-bit float32 multiply-adds run in two halves) and 1.7-2.4x on Zen 5 (whose run whole).
    # Intel's avx512_bf16 alone (an Emerald Rapids whose VM hides AMX) multiplies bf16 pairs no faster than float32
    # ones and converts too: 0.3-1.0x. With neither, XLA widens bf16 to float32 before multiplying: 0.6x (an AVX2
    # AMD EPYC).
    flags = cpu.flags(cpuinfo_text)
    return "amx_bf16" in flags or ("avx512_bf16" in flags and cpu.field(cpuinfo_text, "vendor_id") == "AuthenticAMD")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def matmul(spec: str, x, y):
    """einsum(spec, x, y) accumulated in float32, and its gradients computed alike.

    spec names its output ("btd,df->btf"), each letter in at least two of the three terms (a batch letter, as
    "bthc,bshc->bhts"'s b and h, in all three): the backward pass reads it.
    """
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def _matmul_fwd(spec, x, y):
    return matmul(spec, x, y), (x, y)


def _matmul_bwd(spec, residuals, g):
    x, y = residuals
    inputs, out = spec.split("->")
    x_spec, y_spec = inputs.split(",")
    # Autodiff would multiply the float32 cotangent with a bf16 operand, which XLA runs at the f32
    # rate; cast to bf16 first, bf16 x bf16 -> f32 runs about twice as fast (on GPUs, and on the CPUs
    # multiplies_bf16_faster picks: AMX, or AMD's AVX512-BF16).
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{y_spec}->{x_spec}", g, y, preferred_element_type=jnp.float32)
    dy = _leading_contraction(g, out, x, x_spec, y_spec)  # sums the leading axes: batch, positions
    return dx.astype(x.dtype), dy.astype(y.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _leading_contraction(a, a_spec: str, b, b_spec: str, spec: str):
    """einsum of a and b into spec, in float32, summing over axes that lead them: transposes the smaller."""
    # A matmul kernel wants its left operand's summed axes last, so XLA transposes the operand
    # whose axes lead the output. Lead with the smaller one, then transpose the (weight-sized) result.
    def layout(first: str, second: str) -> str:
        shared = [c for c in spec if c in first and c in second]
        return "".join(shared + [c for c in spec if c in first and c not in shared]
                       + [c for c in spec if c in second and c not in shared])

    def cost(lead, other):
        (x, x_spec), (_, other_spec) = lead, other
        batch = "".join(c for c in x_spec if c in other_spec and c in spec)
        # An operand whose batch axes lead needs only its last axes swapped: XLA:CPU folds
        # that transpose into a bf16 matmul that neither of its CPU kernels then runs (jax
        # 0.10: "UNIMPLEMENTED"). Avoid it; then the smaller, and on a tie no result transpose.
        return bool(batch) and x_spec.startswith(batch), x.size, layout(x_spec, other_spec) != spec

    (first, first_spec), (second, second_spec) = min(
        [((a, a_spec), (b, b_spec)), ((b, b_spec), (a, a_spec))], key=lambda pair: cost(*pair))
    order = layout(first_spec, second_spec)
    out = jnp.einsum(f"{first_spec},{second_spec}->{order}", first, second, preferred_element_type=jnp.float32)
    if order == spec:
        return out
    # The barrier stops XLA folding this transpose back into the matmul, onto the larger operand.
    return jnp.transpose(jax.lax.optimization_barrier(out), [order.index(c) for c in spec])


@jax.custom_vjp
def lookup(table_VxD, tokens_BxT):
    """The table's rows for the tokens; its gradient is summed in float32 and rounded once."""
    return jnp.take(table_VxD, tokens_BxT, axis=0)


def _lookup_fwd(table_VxD, tokens_BxT):
    return lookup(table_VxD, tokens_BxT), (table_VxD, tokens_BxT)  # the table, a live parameter: no copy kept


def _lookup_bwd(residuals, g_BxTxD):
    table_VxD, tokens_BxT = residuals
    # Autodiff would scatter-add a bf16 table's gradient in bf16: over 17k tokens of text,
    # 13% off (the most frequent token's row 18%), against 0.5% this way.
    grad_VxD = jnp.zeros(table_VxD.shape, jnp.float32).at[tokens_BxT].add(g_BxTxD.astype(jnp.float32))
    return grad_VxD.astype(table_VxD.dtype), None


lookup.defvjp(_lookup_fwd, _lookup_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def cross_entropy(x_BxTxD, table_VxD, targets_BxT, chunks: int = 1):
    """Mean cross-entropy (float32) of the logits x @ table.T against the targets, `chunks` slices of T at a time.

    Only one slice's logits exist at once, in the backward pass too (see _cross_entropy_fwd).
    """
    def add(loss, slice_):
        return loss + _softmax_parts(*slice_, table_VxD)[0], None

    loss, _ = jax.lax.scan(add, jnp.zeros((), jnp.float32), _slices(chunks, x_BxTxD, targets_BxT))
    return loss / targets_BxT.size


def _slices(chunks: int, *arrays_BxTx):
    """Each array as `chunks` slices of its T axis, stacked first: (chunks, B, T / chunks, ...)."""
    B, T = arrays_BxTx[0].shape[:2]
    return tuple(jnp.moveaxis(a.reshape(B, chunks, T // chunks, *a.shape[2:]), 1, 0) for a in arrays_BxTx)


def _softmax_parts(x_BxtxD, targets_Bxt, table_VxD):
    """(summed cross-entropy, exp(logits - their max), its sum): the softmax, exponentiated once."""
    logits_BxtxV = jnp.einsum("btd,vd->btv", x_BxtxD, table_VxD, preferred_element_type=jnp.float32)
    max_Bxtx1 = logits_BxtxV.max(axis=-1, keepdims=True)
    exp_BxtxV = jnp.exp(logits_BxtxV - max_Bxtx1)
    sum_Bxtx1 = exp_BxtxV.sum(axis=-1, keepdims=True)
    target_Bxt = jnp.take_along_axis(logits_BxtxV, targets_Bxt[..., None], axis=-1)[..., 0]
    loss = (jnp.log(sum_Bxtx1[..., 0]) + max_Bxtx1[..., 0] - target_Bxt).sum()
    return loss, exp_BxtxV, sum_Bxtx1


def _cross_entropy_fwd(x_BxTxD, table_VxD, targets_BxT, chunks):
    # Each slice's gradients are made here, with its logits: autodiff would keep every slice's logits
    # for the backward pass, 26 GB in float32 for openwebtext's 128 x 1024-token micro-batch.
    n = targets_BxT.size

    def add(carry, slice_):
        loss, grad_VxD = carry
        x_BxtxD, targets_Bxt = slice_
        chunk_loss, exp_BxtxV, sum_Bxtx1 = _softmax_parts(x_BxtxD, targets_Bxt, table_VxD)
        # d(mean loss)/d(logits) = (softmax - one-hot) / n, rounded once to the compute dtype.
        onehot_BxtxV = targets_Bxt[..., None] == jnp.arange(table_VxD.shape[0])
        dlogits_BxtxV = ((exp_BxtxV / sum_Bxtx1 - onehot_BxtxV) / n).astype(x_BxtxD.dtype)
        dx_BxtxD = jnp.einsum("btv,vd->btd", dlogits_BxtxV, table_VxD, preferred_element_type=jnp.float32)
        grad_VxD = grad_VxD + _leading_contraction(dlogits_BxtxV, "btv", x_BxtxD, "btd", "vd")
        return (loss + chunk_loss, grad_VxD), dx_BxtxD.astype(x_BxtxD.dtype)

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros(table_VxD.shape, jnp.float32))
    (loss, grad_VxD), dx_slices = jax.lax.scan(add, zeros, _slices(chunks, x_BxTxD, targets_BxT))
    dx_BxTxD = jnp.moveaxis(dx_slices, 0, 1).reshape(x_BxTxD.shape)
    return loss / n, (dx_BxTxD, grad_VxD.astype(table_VxD.dtype))


def _cross_entropy_bwd(chunks, residuals, g):
    dx_BxTxD, grad_VxD = residuals
    return dx_BxTxD * g.astype(dx_BxTxD.dtype), grad_VxD * g.astype(grad_VxD.dtype), None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
