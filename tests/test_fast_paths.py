"""Every fast path against its reference: the same loss and gradients, to the precision of its dtype."""

import dataclasses
import functools
from types import SimpleNamespace

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midgpt import cpu
from midgpt.config import ModelConfig
from midgpt.model import GPT, attention_implementation, cast_floats, cudnn_flash_fits, dropout, project
from midgpt.precision import compute_dtype, cross_entropy, multiplies_bf16_faster
from midgpt.step import ACTIVATIONS_AT_ONCE, eval_loss, loss_fn

CONFIG = ModelConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32)


def loss_and_grads(cfg: ModelConfig, tokens_BxT, dtype=jnp.float32, key=None):
    """Loss and parameter gradients of the model initialised from seed 0 (the same for every cfg)."""
    params, static = eqx.partition(GPT(cfg, key=jax.random.key(0)), eqx.is_array)
    loss = lambda p: loss_fn(eqx.combine(cast_floats(p, dtype), static), tokens_BxT[:, :-1], tokens_BxT[:, 1:], key)
    return jax.jit(jax.value_and_grad(loss))(params)


def assert_same(a, b, rtol, atol=0.0):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=rtol)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(ga, gb, rtol=rtol, atol=atol)


def tokens(T: int = CONFIG.block_size + 1, seed: int = 0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (4, T), dtype=np.int32))


SHAPES = dict(b=2, t=5, s=6, h=3, c=4, d=8, f=12)


@pytest.mark.parametrize("spec", [
    "btd,df->btf", "btf,df->btd", "btd,dhc->bthc", "bthc,hcd->btd",  # weights: transposes the smaller operand
    "bthc,bshc->bhts", "bhts,bshc->bthc",  # attention: batched, and a transposed result
])
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_matmul_and_its_gradients_match_autodiff_of_a_float32_einsum(spec, dtype, rtol):
    (x_spec, y_spec), out_spec = spec.split("->")[0].split(","), spec.split("->")[1]
    rng = np.random.default_rng(0)
    x, y, g = (jnp.asarray(rng.normal(size=[SHAPES[c] for c in s]), jnp.float32) for s in (x_spec, y_spec, out_spec))
    out, vjp = jax.vjp(lambda x, y: project(spec, x, y, jnp.float32), x.astype(dtype), y.astype(dtype))
    want, want_vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), x, y)
    # bf16 rounds each input, so errors scale with the largest entry rather than each one.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))
    close(out, want)
    for got, expected in zip(vjp(g), want_vjp(g)):
        assert got.dtype == dtype and got.shape == expected.shape
        close(got.astype(jnp.float32), expected)


@pytest.mark.parametrize("block_size, n_head, n_embd, T", [(16, 2, 32, 17), (8, 4, 32, 9), (12, 3, 48, 13),
                                                           (16, 8, 128, 17)])
def test_bfloat16_training_step_compiles_and_runs_for_any_head_shape(block_size, n_head, n_embd, T):
    # XLA:CPU rejects some bf16 matmul layouts at run time only ("UNIMPLEMENTED"); matmul avoids them.
    cfg = ModelConfig(vocab_size=64, block_size=block_size, n_layer=2, n_head=n_head, n_embd=n_embd, dropout=0.1)
    loss, grads = loss_and_grads(cfg, tokens(T), jnp.bfloat16, key=jax.random.key(1))
    assert np.isfinite(float(loss)) and all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("T", [CONFIG.block_size + 1, 2 * CONFIG.block_size + 1])  # the second slides a window
def test_dot_product_attention_matches_the_einsum_path(T):
    batch = tokens(T)
    reference = loss_and_grads(dataclasses.replace(CONFIG, attention="einsum"), batch)
    # Their sums run in other orders: float32 rounding, up to 2e-7 in gradients of up to 0.45, in either compile mode.
    assert_same(loss_and_grads(dataclasses.replace(CONFIG, attention="xla"), batch), reference, rtol=1e-5, atol=1e-6)


DROPOUT_CONFIG, DROPOUT_KEY = dataclasses.replace(CONFIG, dropout=0.1), 1  # remat must keep (not redraw) its masks


@functools.cache
def dropout_reference():
    """Loss and gradients with CONFIG's remat and unroll, dropout on: computed once for every variant."""
    return loss_and_grads(DROPOUT_CONFIG, tokens(), key=jax.random.key(DROPOUT_KEY))


# ("none", 3): no remat, every layer unrolled, as shakespeare_char runs; ("full", 2) as shakespeare_char_cpu
@pytest.mark.parametrize("remat, unroll", [("dots", 1), ("none", 1), ("full", 2), ("full", 3), ("none", 2),
                                           ("none", 3)])
def test_remat_policy_and_scan_unroll_change_nothing_but_speed(remat, unroll):
    assert (remat, unroll) != (CONFIG.remat, CONFIG.scan_unroll)
    variant = dataclasses.replace(DROPOUT_CONFIG, remat=remat, scan_unroll=unroll)
    assert_same(loss_and_grads(variant, tokens(), key=jax.random.key(DROPOUT_KEY)), dropout_reference(),
                rtol=1e-5, atol=1e-7)


def assert_same_to_bfloat16_precision(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(float(loss_a) - float(loss_b)) < 0.02
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        assert ga.dtype == jnp.float32  # gradients land in the parameters' dtype
        cosine = jnp.vdot(ga, gb) / (jnp.linalg.norm(ga) * jnp.linalg.norm(gb))
        assert cosine > 0.99


def test_bfloat16_step_matches_float32_to_bfloat16_precision():
    batch = tokens()
    assert_same_to_bfloat16_precision(loss_and_grads(CONFIG, batch, jnp.bfloat16), loss_and_grads(CONFIG, batch))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on NVIDIA GPUs only")
def test_cudnn_attention_matches_the_einsum_path_in_bfloat16():
    batch = tokens()
    cudnn, einsum = (loss_and_grads(dataclasses.replace(CONFIG, attention=a), batch, jnp.bfloat16)
                     for a in ("cudnn", "einsum"))
    assert_same_to_bfloat16_precision(cudnn, einsum)


def described_device(platform_version: str, compute_capability: str = "9.0"):
    """What cudnn_flash_fits reads of a GPU, for the GPUs this machine does not have."""
    return SimpleNamespace(platform="gpu", client=SimpleNamespace(platform_version=platform_version),
                           compute_capability=compute_capability)


def test_auto_attention_takes_cudnn_only_where_it_runs():
    hopper, ampere, turing = (described_device("cuda 12080", c) for c in ("9.0", "8.0", "7.5"))
    assert cudnn_flash_fits(jnp.bfloat16, 64, hopper) and cudnn_flash_fits(jnp.bfloat16, 256, hopper)
    assert cudnn_flash_fits(jnp.bfloat16, 128, ampere) and not cudnn_flash_fits(jnp.bfloat16, 256, ampere)
    assert not cudnn_flash_fits(jnp.bfloat16, 72 + 4, hopper)  # not a multiple of 8
    assert not cudnn_flash_fits(jnp.bfloat16, 264, hopper)
    assert not cudnn_flash_fits(jnp.float32, 64, hopper)
    assert not cudnn_flash_fits(jnp.bfloat16, 64, turing)  # a T4 or a V100: before Ampere
    assert not cudnn_flash_fits(jnp.bfloat16, 64, described_device("rocm 6.4"))  # an AMD GPU
    assert not cudnn_flash_fits(jnp.bfloat16, 64, jax.devices("cpu")[0])
    assert attention_implementation("auto", jnp.bfloat16, True, 64) == "einsum"  # dropout: einsum only
    assert attention_implementation("xla", jnp.float32, False, 76) == "xla"  # as configured
    # jax.nn.dot_product_attention has no dropout: a GPT built by hand with it ran without the probabilities'.
    with pytest.raises(ValueError, match="attention=xla .* has no dropout"):
        attention_implementation("xla", jnp.float32, True, 64)


def test_auto_attention_keeps_the_einsum_path_for_dropout_where_cudnn_fits(monkeypatch):
    # On a GPU where cuDNN's flash attention runs, a run with dropout would lose the probabilities' dropout.
    from midgpt import model

    monkeypatch.setattr(model, "cudnn_flash_fits", lambda dtype, head_dim, device: True)
    assert attention_implementation("auto", jnp.bfloat16, False, 64) == "cudnn"
    assert attention_implementation("auto", jnp.bfloat16, True, 64) == "einsum"
    # And the model asks with its dropout: here, without cuDNN, the cuDNN path would not even trace.
    gpt = cast_floats(GPT(dataclasses.replace(CONFIG, dropout=0.1), key=jax.random.key(0)), jnp.bfloat16)
    jax.make_jaxpr(lambda tokens_BxT: gpt(tokens_BxT, key=jax.random.key(1)))(jnp.zeros((2, 16), jnp.int32))


# /proc/cpuinfo's vendor and flags, cut to those that matter, of the processors midgpt was measured on
# (benchmarks/RESULTS.md), and the ratio of XLA's bf16 matmul rate to its float32 one on each
AMD, INTEL = "vendor_id\t: AuthenticAMD\n", "vendor_id\t: GenuineIntel\n"


@pytest.mark.parametrize("cpuinfo, faster", [
    ((AMD + "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n") * 2, True),  # Zen 4 2.0-2.6x, Zen 5 1.7-2.4x
    (INTEL + "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n", True),  # 3.3x
    (INTEL + "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_fp16\n", False),  # 0.3-1.0x
    (AMD + "flags\t\t: fpu sse2 avx2 fma\nbugs\t\t: avx512_bf16\n", False),  # 0.6x
    ("Features\t: fp asimd bf16 i8mm\n", False),  # how XLA runs bf16 there is not measured
    ("", False),
], ids=["AMD EPYC Zen 4 or 5", "Intel Xeon AMX", "Intel Xeon AMX hidden", "AMD EPYC Zen 3", "Arm", "not Linux"])
def test_auto_compute_dtype_is_bfloat16_on_cpus_that_multiply_it_faster(cpuinfo, faster, monkeypatch):
    assert multiplies_bf16_faster(cpuinfo) == faster
    monkeypatch.setattr(cpu, "info", lambda: cpuinfo)
    on_cpu = jax.devices()[0].platform == "cpu"  # accelerators take bfloat16 whatever their host's CPU
    assert compute_dtype("auto") == ("float32" if on_cpu and not faster else "bfloat16")


@pytest.mark.parametrize("cpuinfo", [AMD + "flags\t\t: avx512_bf16\n", INTEL + "flags\t\t: avx512_bf16\n", ""],
                         ids=["bf16 faster", "bf16 slower", "not Linux"])
def test_a_compute_dtype_other_than_auto_is_kept_whatever_the_cpu(cpuinfo, monkeypatch):
    monkeypatch.setattr(cpu, "info", lambda: cpuinfo)
    assert compute_dtype("float32") == "float32" and compute_dtype("bfloat16") == "bfloat16"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on NVIDIA GPUs only")
@pytest.mark.parametrize("head_dim", [64, 76, 128, 256, 264])
def test_cudnn_runs_exactly_the_head_widths_auto_gives_it(head_dim):
    q_BxTxHxC = jnp.ones((1, 128, 2, head_dim), jnp.bfloat16)
    attend = lambda: jax.nn.dot_product_attention(q_BxTxHxC, q_BxTxHxC, q_BxTxHxC, is_causal=True,
                                                  implementation="cudnn").block_until_ready()
    if attention_implementation("auto", jnp.bfloat16, False, head_dim) == "cudnn":
        attend()
    else:
        with pytest.raises(Exception):
            attend()


def test_dropout_drops_at_its_rate_keeps_the_mean_and_redraws_per_key():
    x = jnp.ones((1000, 999), jnp.bfloat16)  # a size that is no multiple of 4: the last draw is cut
    a, b = dropout(x, 0.2, jax.random.key(0)), dropout(x, 0.2, jax.random.key(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float((a == 0).mean()) == pytest.approx(51 / 256, abs=0.003)  # 0.2 rounded to 1/256
    assert float(a.astype(jnp.float32).mean()) == pytest.approx(1.0, abs=0.01)
    assert float(((a == 0) != (b == 0)).mean()) > 0.2
    assert dropout(x, 0.2, None) is x and dropout(x, 0.0, jax.random.key(0)) is x


# Small batches run several at a time, the last group filled up with batches left out of the mean
# (E = 2 groups + 3); 512 x 16 x 32 fills ACTIVATIONS_AT_ONCE (a plain scan), 1024 x 16 x 32
# outgrows it (lax.map's batch_size=1).
@pytest.mark.parametrize("B, pieces", [(16, 1), (16, 4), (512, 1), (1024, 1)])
def test_evaluating_batches_in_pieces_gives_the_mean_of_their_losses(B, pieces):
    model = GPT(CONFIG, key=jax.random.key(0))
    T = CONFIG.block_size
    E = 2 * (ACTIVATIONS_AT_ONCE // (B * T * CONFIG.n_embd)) + 3
    tokens_ExBxT1 = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (E, B, T + 1), dtype=np.int32)
    x_ExBxT, y_ExBxT = jnp.asarray(tokens_ExBxT1[..., :-1]), jnp.asarray(tokens_ExBxT1[..., 1:])
    each = [jax.jit(loss_fn)(model, x_ExBxT[e], y_ExBxT[e]) for e in range(E)]
    np.testing.assert_allclose(eval_loss(model, x_ExBxT, y_ExBxT, "float32", pieces), np.mean(each), rtol=1e-6)


@pytest.mark.parametrize("E", [7, 50, 53])  # groups of 4 would leave 3, 2 and 1 batches
def test_evaluation_compiles_the_model_once_whatever_the_number_of_batches(E):
    B, T = 192, CONFIG.block_size
    assert ACTIVATIONS_AT_ONCE // (B * T * CONFIG.n_embd) == 4  # batches to run at once
    model = GPT(CONFIG, key=jax.random.key(0))
    dots = lambda E: str(jax.make_jaxpr(lambda m, x: eval_loss(m, x, x, "float32"))(
        model, jnp.zeros((E, B, T), jnp.int32))).count("dot_general")
    assert dots(E) == dots(1)  # lax.map would trace the model again for a remainder


def reference_loss(model: GPT, x_BxT, y_BxT):
    """Autodiff through the whole float32 logits: what precision.cross_entropy computes in slices."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x_BxT), y_BxT).mean()


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-3)])
def test_loss_in_slices_matches_autodiff_of_the_whole_logits(dtype, rtol):
    params, static = eqx.partition(GPT(CONFIG, key=jax.random.key(0)), eqx.is_array)
    x_BxT, y_BxT = tokens()[:, :-1], tokens()[:, 1:]
    at = lambda p: eqx.combine(cast_floats(p, dtype), static)
    want_loss, want_grads = jax.jit(jax.value_and_grad(lambda p: reference_loss(at(p), x_BxT, y_BxT)))(params)
    for chunks in [1, 4, CONFIG.block_size]:  # whole, in slices, one position at a time
        loss = lambda p: loss_fn(at(p), x_BxT, y_BxT, chunks=chunks)
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(params)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(jax.jit(loss)(params), want_loss, rtol=1e-6)  # not differentiated: the loss alone
        for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < rtol, chunks


@pytest.mark.parametrize("chunks", [1, 4])
def test_the_loss_gradients_follow_the_cotangent(chunks):
    # Training differentiates the loss alone (a cotangent of 1); a weighted or summed loss must scale too.
    rng = np.random.default_rng(0)
    x_BxTxD = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
    table_VxD = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    y_BxT = jnp.asarray(rng.integers(0, 5, (2, 8)), jnp.int32)
    grads = lambda scale: jax.grad(lambda x, t: scale * cross_entropy(x, t, y_BxT, chunks), argnums=(0, 1))(
        x_BxTxD, table_VxD)
    for once, thrice in zip(grads(1.0), grads(3.0), strict=True):
        np.testing.assert_allclose(thrice, 3 * once, rtol=1e-6)
        assert float(jnp.abs(once).max()) > 1e-3


def test_bfloat16_embedding_gradient_is_summed_in_float32():
    # 17,408 Zipf-distributed tokens, as in text (one openwebtext micro-batch of 16 rows holds
    # 16,384): the most frequent is a fifth of them. Scatter-added in bf16, the embedding's
    # gradient came out 13% off (that token's row 18%); summed in f32 and rounded once, 0.5%.
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, CONFIG.vocab_size + 1)
    batch = jnp.asarray(rng.choice(CONFIG.vocab_size, (1024, CONFIG.block_size + 1), p=p / p.sum()), jnp.int32)
    (_, bf16), (_, f32) = loss_and_grads(CONFIG, batch, jnp.bfloat16), loss_and_grads(CONFIG, batch)
    top = int(np.bincount(np.asarray(batch).ravel()).argmax())
    error = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert error(bf16.embed_VxD, f32.embed_VxD) < 0.02
    assert error(bf16.embed_VxD[top], f32.embed_VxD[top]) < 0.02
