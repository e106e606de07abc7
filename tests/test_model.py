"""Model promises: causality, relative rotary positions, scan equals a loop, one tied embedding, dropout, bf16."""

import dataclasses
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from midgpt.config import Config, ModelConfig
from midgpt.model import (GPT, Attention, Norm, apply_rotary, cast_floats, count_params, dropout, rotary_tables,
                          softmax_attention)
from midgpt.optimizer import make_optimizer
from midgpt.sharding import make_mesh
from midgpt.step import init_state, loss_fn, make_train_step

V, T, L, H, D = 11, 16, 2, 2, 32  # V = 11 so no other leaf has the embedding's (V, D) shape
C = D // H


def model_config(dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=D, dropout=dropout)


def make_model(dropout: float = 0.0, seed: int = 0) -> GPT:
    return GPT(model_config(dropout), key=jax.random.key(seed))


def random_tokens(seed: int, B: int = 3):
    return np.random.default_rng(seed).integers(0, V, (B, T), dtype=np.int32)


def logits_from_pieces(model: GPT, tokens_BxT, embed_in_VxD, embed_out_VxD, embed_key=None, layer_keys=None):
    """The model's forward written out by hand from its own pieces: the L blocks in
    a Python loop (no scan, no checkpoint), and separate input and output embeddings."""
    x_BxTxD = dropout(jnp.take(embed_in_VxD, tokens_BxT, axis=0), model.config.dropout, embed_key)
    sin_TxC, cos_TxC = rotary_tables(jnp.arange(tokens_BxT.shape[1]), C, model.config.rope_base)
    block_params, block_static = eqx.partition(model.blocks, eqx.is_array)
    causal_TxT = jnp.tril(jnp.ones((tokens_BxT.shape[1],) * 2, dtype=bool))
    for i in range(model.config.n_layer):
        block = eqx.combine(jax.tree.map(lambda x: x[i], block_params), block_static)
        x_BxTxD, _ = block(x_BxTxD, sin_TxC, cos_TxC, causal_TxT, key=None if layer_keys is None else layer_keys[i])
    x_BxTxD = model.final_norm(x_BxTxD)
    return jnp.einsum("btd,vd->btv", x_BxTxD, embed_out_VxD, preferred_element_type=jnp.float32)


@eqx.filter_jit
def forward(model: GPT, tokens_BxT, key=None):
    return model(tokens_BxT, key=key)


def vd_leaves(tree):
    return [x for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)) if x.shape == (V, D)]


def test_future_tokens_do_not_change_past_logits():
    model = make_model()
    tokens_BxT = random_tokens(0)
    logits_BxTxV = forward(model, tokens_BxT)
    assert logits_BxTxV.dtype == jnp.float32
    for t in (1, 5, T - 1):
        # Every token from t on is replaced by a different one.
        changed_BxT = tokens_BxT.copy()
        changed_BxT[:, t:] = (tokens_BxT[:, t:] + 1 + random_tokens(t)[:, t:] % (V - 1)) % V
        assert np.all(changed_BxT[:, t:] != tokens_BxT[:, t:])
        new_logits_BxTxV = forward(model, changed_BxT)
        np.testing.assert_allclose(new_logits_BxTxV[:, :t], logits_BxTxV[:, :t], rtol=0, atol=1e-6)
        # Not vacuous: the positions that see the change do move.
        assert np.max(np.abs(new_logits_BxTxV[:, t:] - logits_BxTxV[:, t:])) > 1e-2


def test_rotary_tables_of_positions_known_when_traced_are_constants_that_xla_computes_alike():
    # Training's and evaluation's positions are known: their tables are numpy constants, the same bits in every
    # program. Sampling's are traced, and XLA computes them, within the 1e-5 rad of its float32 angle.
    positions_T = np.arange(1024)
    known = rotary_tables(positions_T, C, 10000.0)
    computed = jax.jit(rotary_tables, static_argnums=(1, 2))(jnp.asarray(positions_T), C, 10000.0)
    for known_TxC, computed_TxC in zip(known, computed, strict=True):
        assert isinstance(known_TxC, np.ndarray) and known_TxC.dtype == np.float32
        np.testing.assert_allclose(known_TxC, computed_TxC, rtol=0, atol=2e-5)


def test_rotary_attention_scores_depend_on_relative_position_only():
    positions = jnp.arange(64)
    sin_TxC, cos_TxC = rotary_tables(positions, C, 10000.0)
    kq, kk = jax.random.split(jax.random.key(0))
    q_C = jax.random.normal(kq, (C,))
    k_C = jax.random.normal(kk, (C,))
    # The same query and key vector placed at every position: (B=1, T, H=1, C).
    q_1xTx1xC = jnp.broadcast_to(q_C, (1, len(positions), 1, C))
    k_1xTx1xC = jnp.broadcast_to(k_C, (1, len(positions), 1, C))
    rq_TxC = apply_rotary(q_1xTx1xC, sin_TxC, cos_TxC)[0, :, 0]
    rk_TxC = apply_rotary(k_1xTx1xC, sin_TxC, cos_TxC)[0, :, 0]
    score = lambda m, n: float(jnp.dot(rq_TxC[m], rk_TxC[n]))

    for m, n in [(3, 0), (7, 7), (2, 9), (20, 5)]:
        for s in (1, 4, 17, 30):
            np.testing.assert_allclose(score(m + s, n + s), score(m, n), rtol=1e-4, atol=1e-4)
    # Rotation preserves length, and the score does change with the offset m - n.
    np.testing.assert_allclose(jnp.linalg.norm(rq_TxC, axis=-1), jnp.linalg.norm(q_C), rtol=1e-5)
    offsets = [score(10 + d, 10) for d in range(8)]
    assert max(offsets) - min(offsets) > 0.5


def test_the_models_logits_depend_on_relative_positions_only():
    # Rotary on the queries only, or on neither, would pass the test above; the model must rotate both.
    model, tokens_BxT = make_model(), random_tokens(3)
    tokens_BxT[:, 1] = (tokens_BxT[:, 0] + 1) % V  # two different tokens to swap below
    logits_BxTxV = forward(model, tokens_BxT)
    shifted = eqx.filter_jit(lambda m, t, first: m(t, positions_T=jnp.arange(T) + first))
    np.testing.assert_allclose(shifted(model, tokens_BxT, 37), logits_BxTxV, rtol=1e-4, atol=1e-4)
    # Also as far as sample.py goes (max_new_tokens up to 2**30), where float32 positions are 64 apart;
    # the angles are then as exact as float32 keeps them at position 2000.
    for first in (10**7 + 37, 2**30):
        np.testing.assert_allclose(shifted(model, tokens_BxT, first), logits_BxTxV, rtol=3e-4, atol=3e-4)
    # Positions are used at all: in one layer (more would tell positions by the causal mask alone),
    # swapping two earlier tokens moves a later logit.
    one_layer = GPT(ModelConfig(vocab_size=V, block_size=T, n_layer=1, n_head=H, n_embd=D), key=jax.random.key(0))
    swapped_BxT = tokens_BxT.copy()
    swapped_BxT[:, [0, 1]] = tokens_BxT[:, [1, 0]]
    moved_BxV = forward(one_layer, swapped_BxT)[:, 5] - forward(one_layer, tokens_BxT)[:, 5]
    assert np.min(np.max(np.abs(moved_BxV), axis=-1)) > 1e-3


def test_scanned_checkpointed_layers_equal_a_python_loop_over_blocks():
    model = make_model()
    tokens_BxT, targets_BxT = random_tokens(1), random_tokens(2)
    expected_BxTxV = eqx.filter_jit(logits_from_pieces)(model, tokens_BxT, model.embed_VxD, model.embed_VxD)
    np.testing.assert_allclose(forward(model, tokens_BxT), expected_BxTxV, rtol=1e-5, atol=1e-5)

    # The backward pass too: rematerialisation must not change the gradients.
    def loop_loss(m):
        logits_BxTxV = logits_from_pieces(m, tokens_BxT, m.embed_VxD, m.embed_VxD)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()

    grads = eqx.filter_jit(eqx.filter_grad(lambda m: loss_fn(m, tokens_BxT, targets_BxT)))(model)
    loop_grads = eqx.filter_jit(eqx.filter_grad(loop_loss))(model)
    leaves, loop_leaves = jax.tree.leaves(grads), jax.tree.leaves(loop_grads)
    assert len(leaves) == len(loop_leaves) > 0
    for g, lg in zip(leaves, loop_leaves):
        np.testing.assert_allclose(g, lg, rtol=1e-4, atol=1e-6)


def test_parameter_count_matches_formula_with_embedding_counted_once():
    model = make_model()
    assert len(vd_leaves(model)) == 1
    per_layer = 4 * D * D + 2 * C + 2 * D + 8 * D * D  # attention, q/k gains, norm gains, MLP
    expected = V * D + L * per_layer + D
    assert count_params(model) == expected
    assert sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))) == expected


def test_tied_embedding_gradient_is_sum_of_input_and_output_gradients():
    model = make_model()
    tokens_BxT, targets_BxT = random_tokens(3), random_tokens(4)

    def untied_loss(embed_in_VxD, embed_out_VxD):
        logits_BxTxV = logits_from_pieces(model, tokens_BxT, embed_in_VxD, embed_out_VxD)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()

    def tied_loss(embed_VxD):
        return loss_fn(eqx.tree_at(lambda m: m.embed_VxD, model, embed_VxD), tokens_BxT, targets_BxT)

    E = model.embed_VxD
    untied, (grad_in_VxD, grad_out_VxD) = jax.jit(jax.value_and_grad(untied_loss, argnums=(0, 1)))(E, E)
    tied, tied_grad_VxD = jax.jit(jax.value_and_grad(tied_loss))(E)
    np.testing.assert_allclose(untied, tied, rtol=1e-6)
    np.testing.assert_allclose(tied_grad_VxD, grad_in_VxD + grad_out_VxD, rtol=1e-4, atol=1e-7)
    # Both paths contribute, so neither term alone would pass.
    for part_VxD in (grad_in_VxD, grad_out_VxD):
        assert np.max(np.abs(tied_grad_VxD - part_VxD)) > 1e-3


def test_embedding_stays_one_array_through_an_optimiser_step():
    config = Config(data_dir="unused", model=model_config(), batch_size=2, compute_dtype="float32")
    optimizer = make_optimizer(config)
    mesh = make_mesh(config)
    state = init_state(config, optimizer, mesh)
    x_GxBxT = random_tokens(5, B=2)[None]
    y_GxBxT = random_tokens(6, B=2)[None]
    state, _ = make_train_step(config, optimizer, mesh)(state, x_GxBxT, y_GxBxT)
    assert len(vd_leaves(state.model)) == 1
    adam_states = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                   if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam_states) == 1
    assert len(vd_leaves(adam_states[0].mu)) == 1
    assert len(vd_leaves(adam_states[0].nu)) == 1


def test_dropout_only_with_a_key():
    tokens_BxT = random_tokens(7)
    dropped, plain = make_model(dropout=0.3), make_model(dropout=0.0)
    # Without a key: deterministic, and the same as a model without dropout.
    no_key_BxTxV = forward(dropped, tokens_BxT)
    np.testing.assert_array_equal(forward(dropped, tokens_BxT), no_key_BxTxV)
    np.testing.assert_allclose(no_key_BxTxV, forward(plain, tokens_BxT), rtol=1e-6, atol=1e-6)
    # With keys: random, and reproducible for the same key.
    a_BxTxV = forward(dropped, tokens_BxT, key=jax.random.key(1))
    b_BxTxV = forward(dropped, tokens_BxT, key=jax.random.key(2))
    np.testing.assert_array_equal(forward(dropped, tokens_BxT, key=jax.random.key(1)), a_BxTxV)
    assert np.max(np.abs(a_BxTxV - b_BxTxV)) > 1e-2
    assert np.max(np.abs(a_BxTxV - no_key_BxTxV)) > 1e-2
    # dropout = 0: a key changes nothing.
    np.testing.assert_allclose(forward(plain, tokens_BxT, key=jax.random.key(1)), forward(plain, tokens_BxT),
                               rtol=1e-6, atol=1e-6)


def test_attention_dropout_zeroes_a_share_of_the_probabilities_and_scales_up_the_rest():
    B, S, Hs = 2, 64, 2
    q_BxSxHxS, k_BxSxHxS = jax.random.normal(jax.random.key(0), (2, B, S, Hs, S))
    # Each value one-hot in its key position: the output is the (dropped) attention probabilities themselves.
    v_BxSxHxS = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (B, S, Hs, S))
    mask_SxS = jnp.tril(jnp.ones((S, S), bool))
    prob_BxSxHxS = np.asarray(softmax_attention(q_BxSxHxS, k_BxSxHxS, v_BxSxHxS, mask_SxS, 0.25, None))
    dropped_BxSxHxS = np.asarray(softmax_attention(q_BxSxHxS, k_BxSxHxS, v_BxSxHxS, mask_SxS, 0.25, jax.random.key(1)))
    seen_BxSxHxS = np.broadcast_to(np.asarray(mask_SxS)[None, :, None, :], prob_BxSxHxS.shape)
    zeroed = dropped_BxSxHxS[seen_BxSxHxS] == 0
    assert abs(zeroed.mean() - 0.25) < 0.02  # of 8,320 probabilities: 4 standard deviations
    np.testing.assert_allclose(dropped_BxSxHxS[seen_BxSxHxS][~zeroed], prob_BxSxHxS[seen_BxSxHxS][~zeroed] / 0.75,
                               rtol=1e-5)


def test_the_attention_module_drops_its_probabilities_at_its_rate():
    # With one key, a head's probability is 1: dropping it zeroes that head's whole output at the token, where the
    # output's own dropout zeroes single features. Identity value and output projections let both be seen.
    B, C = 512, D // H
    cfg = ModelConfig(vocab_size=V, block_size=1, n_layer=1, n_head=H, n_embd=D, dropout=0.5)
    eye_DxD = jnp.eye(D)
    attention = eqx.tree_at(lambda a: (a.wv_DxHxC, a.wo_HxCxD), Attention(cfg, key=jax.random.key(0)),
                            (eye_DxD.reshape(D, H, C), eye_DxD.reshape(H, C, D)))
    x_Bx1xD = jax.random.normal(jax.random.key(1), (B, 1, D))
    sin_1xC, cos_1xC = rotary_tables(np.arange(1), C, cfg.rope_base)
    out_Bx1xD, _ = attention(x_Bx1xD, sin_1xC, cos_1xC, np.ones((1, 1), bool), key=jax.random.key(2))
    dropped_BxH = np.all(np.asarray(out_Bx1xD).reshape(B, H, C) == 0, axis=-1)
    # Of 1,024 heads, within 4.5 standard deviations of half; without the probabilities' dropout, 0.5**16 of them.
    assert abs(dropped_BxH.mean() - 0.5) < 0.07


@pytest.mark.parametrize("rate", [1 / 256, 0.25])
def test_dropout_zeroes_its_rate_of_the_elements_and_keeps_their_mean(rate):
    n = 2**20
    y_N = np.asarray(dropout(jnp.ones(n), rate, jax.random.key(0)))
    # Within 5 standard deviations of fair draws; a threshold one 256th off is 9 or more away.
    assert abs((y_N == 0).mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    assert abs(y_N.mean() - 1) < 5 * np.sqrt(rate / (1 - rate) / n)


def test_with_dropout_the_scan_is_still_the_loop_and_each_layer_draws_its_own_masks():
    model, tokens_BxT, key = make_model(dropout=0.3), random_tokens(4), jax.random.key(7)
    # The model's keys: one for the embedding's dropout, and one a layer from the blocks' split.
    embed_key, blocks_key = jax.random.split(key)
    layer_keys = jax.random.split(blocks_key, L)
    pieces = eqx.filter_jit(logits_from_pieces)
    expected_BxTxV = pieces(model, tokens_BxT, model.embed_VxD, model.embed_VxD, embed_key, layer_keys)
    np.testing.assert_allclose(forward(model, tokens_BxT, key), expected_BxTxV, rtol=1e-5, atol=1e-5)
    # Not vacuous: one key for every layer (each dropping the same units) gives other logits.
    same_BxTxV = pieces(model, tokens_BxT, model.embed_VxD, model.embed_VxD, embed_key, [layer_keys[0]] * L)
    assert np.max(np.abs(same_BxTxV - expected_BxTxV)) > 1e-2


def test_qk_layernorm_centres_then_normalises():
    x_4xC = jax.random.normal(jax.random.key(0), (4, C)) + 3.0  # far from centred
    y_4xC = np.asarray(Norm(C, centre=True)(x_4xC))
    np.testing.assert_allclose(y_4xC.mean(axis=-1), 0, atol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.mean(y_4xC**2, axis=-1)), 1, rtol=1e-4)


def test_a_bfloat16_norm_is_the_float32_norm_rounded_once():
    # Centred in bf16, x near 100 (bf16's spacing there is 0.5) lost most of its deviations before normalising.
    x_4xC = (jax.random.normal(jax.random.key(0), (4, C)) + 100.0).astype(jnp.bfloat16)
    for norm in (Norm(C), Norm(C, centre=True)):
        y_4xC = norm(x_4xC)
        assert y_4xC.dtype == jnp.bfloat16
        expected_4xC = norm(x_4xC.astype(jnp.float32)).astype(jnp.bfloat16)
        np.testing.assert_allclose(y_4xC.astype(jnp.float32), expected_4xC.astype(jnp.float32), rtol=1e-2)


def test_every_leaf_of_the_model_is_an_array():
    # Settings such as Norm.centre are static fields: as leaves they are no parameters, and a plain jax.jit of
    # the model fails on them.
    assert all(eqx.is_array(x) for x in jax.tree.leaves(make_model()))


def test_bfloat16_compute_returns_float32_logits_close_to_float32_model():
    model = make_model()
    model_bf16 = cast_floats(model, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(eqx.filter(model_bf16, eqx.is_array)))
    tokens_BxT = random_tokens(8)
    logits_BxTxV = forward(model, tokens_BxT)
    bf16_logits_BxTxV = forward(model_bf16, tokens_BxT)
    assert bf16_logits_BxTxV.dtype == jnp.float32
    err_BxTxV = np.abs(np.asarray(bf16_logits_BxTxV) - np.asarray(logits_BxTxV))
    assert err_BxTxV.max() < 0.05 * np.abs(logits_BxTxV).max()
    assert np.linalg.norm(err_BxTxV) < 0.03 * np.linalg.norm(logits_BxTxV)
    assert err_BxTxV.max() > 0  # the cast model really computed in bf16


@pytest.mark.parametrize("rope_base", [10000.0, 500.0])
def test_the_forward_pass_is_the_gpt_the_readme_describes(rope_base):
    # Written again in float64 numpy from the README's words, not from the model's pieces: pre-norm RMSNorm,
    # q and k each LayerNormed (centred, no bias) then rotated by position, causal softmax attention, a 4x
    # GELU MLP (tanh form, jax.nn.gelu's default), a final RMSNorm and the input embedding as output layer.
    rng = np.random.default_rng(0)
    gpt = GPT(dataclasses.replace(model_config(), rope_base=rope_base), key=jax.random.key(0))
    model = jax.tree.map(lambda x: x * (1 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32) if eqx.is_array(x)
                         else x, gpt)  # the gains too, which start at one
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), eqx.filter(model, eqx.is_array))
    tokens_BxT = random_tokens(1)

    def rms_norm(x, gain):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * gain

    def rotate(x_BxTxHxC):  # features i and i + C/2 form a pair, turned by position * rope_base^(-2i/C)
        angle_TxR = np.arange(T)[:, None] * rope_base ** (-np.arange(0, C, 2) / C)
        cos, sin = np.cos(angle_TxR)[:, None], np.sin(angle_TxR)[:, None]
        x1, x2 = x_BxTxHxC[..., : C // 2], x_BxTxHxC[..., C // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    x = p.embed_VxD[tokens_BxT]
    for i in range(L):
        b = jax.tree.map(lambda a: a[i], p.blocks)
        h = rms_norm(x, b.attn_norm.weight_D)
        q, k, v = (np.einsum("btd,dhc->bthc", h, w) for w in (b.attn.wq_DxHxC, b.attn.wk_DxHxC, b.attn.wv_DxHxC))
        q = rotate(rms_norm(q - q.mean(-1, keepdims=True), b.attn.q_norm.weight_D))
        k = rotate(rms_norm(k - k.mean(-1, keepdims=True), b.attn.k_norm.weight_D))
        scores = np.einsum("bthc,bshc->bhts", q, k) / np.sqrt(C) + np.where(np.tri(T), 0, -np.inf)
        prob = np.exp(scores - scores.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        x = x + np.einsum("bhts,bshc,hcd->btd", prob, v, b.attn.wo_HxCxD)
        h = rms_norm(x, b.mlp_norm.weight_D)
        x = x + gelu(h @ b.mlp.w_in_DxF) @ b.mlp.w_out_DxF.T
    logits = rms_norm(x, p.final_norm.weight_D) @ p.embed_VxD.T
    np.testing.assert_allclose(forward(model, tokens_BxT), logits, rtol=2e-4, atol=2e-4)


def test_initialisation_has_gpt2_scales_and_follows_the_seed():
    # Residual outputs shrink with depth (1/sqrt(2 L) of their fan-in's scale), as GPT-2's do; weights are normal
    # cut at 2 standard deviations, whose spread is 0.88 of the scale; the embedding is a plain normal.
    from midgpt.model import fresh_model

    model = ModelConfig(vocab_size=512, block_size=16, n_layer=3, n_head=4, n_embd=128)
    make = lambda seed: fresh_model(Config(data_dir="unused", model=model, seed=seed))
    gpt, D, L, F = make(0), model.n_embd, model.n_layer, 4 * model.n_embd
    cut = 0.8796  # the standard deviation of a unit normal cut at +-2
    attn = gpt.blocks.attn
    scales = {"embed_VxD": 1 / np.sqrt(D), "wq_DxHxC": cut / np.sqrt(D), "wk_DxHxC": cut / np.sqrt(D),
              "wv_DxHxC": cut / np.sqrt(D), "wo_HxCxD": cut / np.sqrt(2 * D * L), "w_in_DxF": cut / np.sqrt(D),
              "w_out_DxF": cut / np.sqrt(2 * F * L)}
    arrays = {"embed_VxD": gpt.embed_VxD, "wq_DxHxC": attn.wq_DxHxC, "wk_DxHxC": attn.wk_DxHxC,
              "wv_DxHxC": attn.wv_DxHxC, "wo_HxCxD": attn.wo_HxCxD, "w_in_DxF": gpt.blocks.mlp.w_in_DxF,
              "w_out_DxF": gpt.blocks.mlp.w_out_DxF}
    for name, x in arrays.items():
        assert float(jnp.std(x)) == pytest.approx(scales[name], rel=0.03), name
    # Each drawn with its own key: over L D^2 = 49,152 pairs, a correlation of 0.02 is 4.4 standard deviations.
    same_shape = [attn.wq_DxHxC, attn.wk_DxHxC, attn.wv_DxHxC, attn.wo_HxCxD.reshape(attn.wq_DxHxC.shape)]
    for a, b in itertools.combinations(same_shape, 2):
        assert abs(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]) < 0.02
    same, other = make(0), make(1)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gpt), jax.tree.leaves(same)))
    assert not np.array_equal(gpt.embed_VxD, other.embed_VxD)
    assert not np.array_equal(gpt.blocks.attn.wq_DxHxC, other.blocks.attn.wq_DxHxC)
