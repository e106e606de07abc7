"""Optimiser promises: AdamW by hand, the warmup + cosine schedule, gradient accumulation, overfitting one batch,
steps run several to a call as one at a time."""

import dataclasses
import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midgpt.config import Config, ModelConfig, apply_overrides, check_config, load_config, steps_a_call
from midgpt.model import GPT
from midgpt.optimizer import lr_schedule, make_optimizer, schedule_note
from midgpt.sharding import DATA_AXES, make_mesh
from midgpt.step import init_state, loss_fn, make_train_step, pieces_per_micro_batch
from midgpt.train import calls

T = 16


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    # GPUs run float32 matmuls as TF32 by default; the equivalences below compare
    # two orders of the same float32 computation, so ask for full precision.
    with jax.default_matmul_precision("highest"):
        yield


def tiny_config(vocab_size: int = 11, **overrides) -> Config:
    model = ModelConfig(vocab_size=vocab_size, block_size=T, n_layer=2, n_head=2, n_embd=32)
    return Config(data_dir="unused", model=model, compute_dtype="float32", **overrides)


def closed_form_lr(config: Config, count: int) -> float:
    """The schedule written out: update count+1 of a linear warmup from 0, then a cosine to min_lr."""
    step, peak, warmup, decay = count + 1, config.learning_rate, max(config.warmup_steps, 1), config.lr_decay_steps
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, decay - warmup) / (decay - warmup)
    return config.min_lr + (peak - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def is_norm_gain(path) -> bool:
    # Every norm in the model is a field named *_norm: attn_norm, mlp_norm, q_norm, k_norm, final_norm.
    return "norm" in jax.tree_util.keystr(path)


@eqx.filter_jit
def optimizer_step(optimizer, params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("grad_clip", [0.5, 0.0])  # 0: no clipping, as in nanoGPT
def test_optimizer_step_matches_hand_computed_clipped_adamw(grad_clip):
    config = tiny_config(
        learning_rate=1e-2, warmup_steps=2, lr_decay_steps=10, min_lr=1e-3,
        beta1=0.8, beta2=0.95, weight_decay=0.1, grad_clip=grad_clip,
    )
    optimizer = make_optimizer(config)
    params = eqx.filter(GPT(config.model, key=jax.random.key(0)), eqx.is_array)
    opt_state = optimizer.init(params)
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path for path, _ in paths_and_leaves]
    assert sum(map(is_norm_gain, paths)) == 5 and not all(map(is_norm_gain, paths))

    rng = np.random.default_rng(0)
    p = [np.asarray(leaf, np.float64) for _, leaf in paths_and_leaves]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    b1, b2, eps = config.beta1, config.beta2, 1e-8
    for t in (1, 2):
        g = [rng.normal(size=x.shape).astype(np.float32) for x in p]
        params, opt_state = optimizer_step(optimizer, params, opt_state, jax.tree.unflatten(treedef, g))

        g = [x.astype(np.float64) for x in g]
        norm = math.sqrt(sum(np.sum(x**2) for x in g))
        if grad_clip:
            assert norm > 10 * grad_clip  # clipping is active
            g = [x * grad_clip / norm for x in g]
        lr = closed_form_lr(config, t - 1)
        for i, path in enumerate(paths):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            adam = (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
            decay = 0.0 if is_norm_gain(path) else config.weight_decay / config.learning_rate * p[i]
            p[i] = p[i] - lr * (adam + decay)

        for path, x, expected in zip(paths, jax.tree.leaves(params), p, strict=True):
            np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {t}, {jax.tree_util.keystr(path)}")


def test_weight_decay_shrinks_matrices_and_spares_norm_gains():
    config = tiny_config(learning_rate=1e-2, warmup_steps=2, lr_decay_steps=10, weight_decay=0.1)
    optimizer = make_optimizer(config)
    params = eqx.filter(GPT(config.model, key=jax.random.key(0)), eqx.is_array)
    opt_state = optimizer.init(params)
    # A zero gradient leaves Adam's step at zero, so only the decay moves parameters.
    new_params, _ = optimizer_step(optimizer, params, opt_state, jax.tree.map(np.zeros_like, params))
    shrink = 1 - config.weight_decay * closed_form_lr(config, 0) / config.learning_rate
    assert shrink < 0.96
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new_params),
                                strict=True):
        expected = old if is_norm_gain(path) else shrink * old
        np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_weight_decay_0_adds_nothing_and_keeps_the_state_layout_of_decay():
    # A resume may change weight_decay, and a restore needs the saved state's tree: optax.identity() in place
    # of the decay at 0 made a run saved with decay fail to restore. Nothing to gain either: optax skips a
    # constant 0 decay itself, so NaN parameters leave the updates finite.
    params = eqx.filter(GPT(tiny_config().model, key=jax.random.key(0)), eqx.is_array)
    optimizers = {wd: make_optimizer(tiny_config(weight_decay=wd)) for wd in (0.0, 0.1)}
    states = {wd: optimizer.init(params) for wd, optimizer in optimizers.items()}
    assert jax.tree.structure(states[0.0]) == jax.tree.structure(states[0.1])
    grads = jax.tree.map(jnp.ones_like, params)
    nan_params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    updates, _ = optimizers[0.0].update(grads, states[0.0], nan_params)
    assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
    updates, _ = optimizers[0.1].update(grads, states[0.1], nan_params)  # not vacuous: decay reads them
    assert not all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


def test_lr_schedule_warms_up_from_first_update_then_cosine_decays_to_min_lr():
    config = tiny_config(learning_rate=1e-3, warmup_steps=10, lr_decay_steps=110, min_lr=1e-4)
    schedule = lr_schedule(config)
    lr = lambda count: float(schedule(count))
    np.testing.assert_allclose(lr(0), 1e-3 / 10, rtol=1e-6)  # the first update already moves
    np.testing.assert_allclose(lr(9), 1e-3, rtol=1e-6)  # update warmup_steps uses the peak
    np.testing.assert_allclose(lr(109), 1e-4, rtol=1e-6)  # update lr_decay_steps reaches min_lr
    np.testing.assert_allclose(lr(59), (1e-3 + 1e-4) / 2, rtol=1e-5)  # cosine halfway
    np.testing.assert_allclose(lr(34), 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-5)
    np.testing.assert_allclose(lr(500), 1e-4, rtol=1e-6)  # and stays there
    for count in range(0, 130):
        np.testing.assert_allclose(lr(count), closed_form_lr(config, count), rtol=1e-5, err_msg=f"count {count}")


@pytest.mark.parametrize("warmup_steps", [0, 1])
def test_lr_schedule_without_warmup_starts_at_the_peak(warmup_steps):
    config = tiny_config(learning_rate=1e-3, warmup_steps=warmup_steps, lr_decay_steps=10, min_lr=1e-4)
    lr = lambda count: float(lr_schedule(config)(count))
    np.testing.assert_allclose(lr(0), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lr(9), 1e-4, rtol=1e-6)  # update lr_decay_steps reaches min_lr
    for count in range(0, 12):
        np.testing.assert_allclose(lr(count), closed_form_lr(config, count), rtol=1e-5, err_msg=f"count {count}")


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    G, B = 2, 3
    accum_config = tiny_config(g_accum_iters=G, batch_size=B)
    whole_config = dataclasses.replace(accum_config, g_accum_iters=1, batch_size=G * B)
    rng = np.random.default_rng(0)
    x_GxBxT = rng.integers(0, 11, (G, B, T), dtype=np.int32)
    y_GxBxT = rng.integers(0, 11, (G, B, T), dtype=np.int32)

    def one_step(config, x, y):
        optimizer = make_optimizer(config)
        # The jitted step donates its inputs, so each call gets its own fresh state.
        mesh = make_mesh(config)
        return make_train_step(config, optimizer, mesh)(init_state(config, optimizer, mesh), x, y)

    initial = jax.tree.map(np.asarray, eqx.filter(init_state(accum_config, make_optimizer(accum_config),
                                                             make_mesh(accum_config)).model, eqx.is_array))
    accum_state, accum_metrics = one_step(accum_config, x_GxBxT, y_GxBxT)
    whole_state, whole_metrics = one_step(whole_config, x_GxBxT.reshape(1, G * B, T), y_GxBxT.reshape(1, G * B, T))

    np.testing.assert_allclose(accum_metrics["loss"], whole_metrics["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(accum_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5, atol=1e-6)
    accum_leaves = jax.tree.leaves(eqx.filter(accum_state.model, eqx.is_array))
    whole_leaves = jax.tree.leaves(eqx.filter(whole_state.model, eqx.is_array))
    assert len(accum_leaves) == len(whole_leaves) == len(jax.tree.leaves(initial))
    for a, w, before in zip(accum_leaves, whole_leaves, jax.tree.leaves(initial)):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)
        assert np.any(np.asarray(a) != before)  # the step did move every parameter


def test_the_step_logs_the_loss_the_gradient_norm_before_clipping_and_the_updated_parameters_norm():
    # As the README defines metrics.jsonl's loss, grad_norm and param_norm; clipping at 0.5 here is active,
    # and with no warmup the first update moves the norm.
    config = tiny_config(batch_size=4, grad_clip=0.5, warmup_steps=0, learning_rate=1e-2)
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    state = init_state(config, optimizer, mesh)
    params = jax.tree.map(np.asarray, eqx.filter(state.model, eqx.is_array))
    rng = np.random.default_rng(0)
    x_1xBxT, y_1xBxT = (rng.integers(0, 11, (1, 4, T), dtype=np.int32) for _ in range(2))
    loss, grads = eqx.filter_value_and_grad(loss_fn)(state.model, x_1xBxT[0], y_1xBxT[0])
    state, metrics = make_train_step(config, optimizer, mesh)(state, x_1xBxT, y_1xBxT)
    norm = lambda tree: math.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    assert norm(grads) > 2 * config.grad_clip
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], norm(grads), rtol=1e-5)
    moved = eqx.filter(state.model, eqx.is_array)
    assert norm(moved) != pytest.approx(norm(params), rel=1e-4)
    np.testing.assert_allclose(metrics["param_norm"], norm(moved), rtol=1e-5)


def test_micro_batches_cut_into_pieces_give_the_same_step():
    config = tiny_config(batch_size=6)
    rng = np.random.default_rng(0)
    x_GxBxT, y_GxBxT = (rng.integers(0, 11, (1, 6, T), dtype=np.int32) for _ in range(2))
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    steps = [make_train_step(config, optimizer, mesh, pieces=p)(init_state(config, optimizer, mesh), x_GxBxT, y_GxBxT)
             for p in (1, 3)]
    (whole_state, whole_metrics), (cut_state, cut_metrics) = steps
    np.testing.assert_allclose(cut_metrics["loss"], whole_metrics["loss"], rtol=1e-5, atol=1e-6)
    # Adam's first update is about sign(g): only the norm shows a gradient off by a factor (the pieces' sum).
    np.testing.assert_allclose(cut_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5)
    for a, w in zip(jax.tree.leaves(eqx.filter(cut_state.model, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(whole_state.model, eqx.is_array)), strict=True):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)


def test_each_step_and_each_seed_draw_their_own_dropout_masks():
    # Another --seed is another run, not only another initialisation.
    config = tiny_config(batch_size=2)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=0.5))
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    train_step = make_train_step(config, optimizer, mesh)
    x_GxBxT = np.random.default_rng(0).integers(0, 11, (1, 2, T), dtype=np.int32)

    def loss_at(step, seed=0):  # the same parameters and batch: only the step or the seed, which the masks follow
        state = init_state(dataclasses.replace(config, seed=seed), optimizer, mesh)
        # seed 0's parameters, made again each time: the step donates them
        state = eqx.tree_at(lambda s: (s.model, s.step), state,
                            (init_state(config, optimizer, mesh).model, jnp.asarray(step, jnp.int32)))
        return float(train_step(state, x_GxBxT, x_GxBxT)[1]["loss"])

    assert loss_at(0) == loss_at(0) != loss_at(1)
    assert loss_at(0, seed=1) != loss_at(0)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_each_micro_batch_draws_its_own_dropout_masks(dropout):
    # Two micro-batches, then the same two swapped: with one mask for both, the step's loss (their
    # mean) would not change.
    config = tiny_config(batch_size=2, g_accum_iters=2)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=dropout))
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    train_step = make_train_step(config, optimizer, mesh)
    x_GxBxT = np.random.default_rng(0).integers(0, 11, (2, 2, T), dtype=np.int32)
    loss_of = lambda x_GxBxT: float(train_step(init_state(config, optimizer, mesh), x_GxBxT, x_GxBxT)[1]["loss"])
    losses = loss_of(x_GxBxT), loss_of(x_GxBxT[::-1])
    if dropout:
        assert abs(losses[0] - losses[1]) > 1e-3, losses
    else:
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("batch_size, block_size, n_embd, pieces", [
    (64, 256, 384, 16), (12, 64, 128, 1), (64, 64, 128, 2), (10, 300, 384, 5), (6, 2048, 384, 6)])
def test_a_lone_cpu_runs_pieces_of_at_most_1024_tokens_of_width_384(batch_size, block_size, n_embd, pieces):
    config = dataclasses.replace(tiny_config(batch_size=batch_size), model=ModelConfig(11, block_size, 2, 2, n_embd))
    lone_cpu = jax.sharding.Mesh(np.array(jax.devices("cpu")[:1]).reshape(1, 1), DATA_AXES)
    assert pieces_per_micro_batch(config, lone_cpu) == pieces


def two_layers_of_shakespeare_char_cpu() -> Config:
    config = dataclasses.replace(load_config("shakespeare_char_cpu"), compute_dtype="float32")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, n_layer=2))


# The tiny model's, and shakespeare_char_cpu's: in float32 there, the rotary tables that XLA computed differed
# between the two programs (folded into constants in one), and so did the parameters, by 4e-7 after two steps.
@pytest.mark.parametrize("make_config", [
    lambda: tiny_config(batch_size=2, warmup_steps=1),
    lambda: tiny_config(batch_size=2, g_accum_iters=2, warmup_steps=1),
    two_layers_of_shakespeare_char_cpu,
], ids=["tiny", "tiny, 2 micro-batches", "shakespeare_char_cpu"])
def test_steps_run_in_one_call_leave_the_state_of_one_step_a_call_bit_for_bit(make_config, optimized):
    # Bit for bit: a resume off the calls' grid runs steps alone where the first run ran them in a call.
    # Compiled as launch.py compiles, whose optimisations fold constants.
    config = make_config()
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=0.1))
    G, B, T, V = config.g_accum_iters, config.batch_size, config.model.block_size, config.model.vocab_size
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    train_step = make_train_step(config, optimizer, mesh)
    rng = np.random.default_rng(0)
    x_KxGxBxT, y_KxGxBxT = (rng.integers(0, V, (3, G, B, T), dtype=np.int32) for _ in range(2))
    alone = init_state(config, optimizer, mesh)
    for x_GxBxT, y_GxBxT in zip(x_KxGxBxT, y_KxGxBxT):
        alone, alone_metrics = train_step(alone, x_GxBxT, y_GxBxT)
    together, together_metrics = train_step(init_state(config, optimizer, mesh), x_KxGxBxT, y_KxGxBxT)
    assert int(together.step) == int(alone.step) == 3
    assert {k: float(v) for k, v in together_metrics.items()} == {k: float(v) for k, v in alone_metrics.items()}
    arrays = lambda state: jax.tree.leaves(eqx.filter(state, eqx.is_array))
    for a, b in zip(arrays(together), arrays(alone), strict=True):
        np.testing.assert_array_equal(a, b)


def test_calls_end_at_every_step_the_loop_acts_at_and_take_two_lengths():
    config = tiny_config(max_steps=63, log_interval=10, eval_interval=20, checkpoint_interval=30, steps_per_call=4)
    assert steps_a_call(config) == 2  # 4 does not divide 10; 3 neither
    assert steps_a_call(dataclasses.replace(config, steps_per_call=7)) == 5
    assert steps_a_call(dataclasses.replace(config, steps_per_call=10**9)) == 10  # no more than between log steps
    # Every number up to steps_per_call was tried in turn: launch.py took 26 s to start with intervals of 10**8.
    huge = dataclasses.replace(config, **dict.fromkeys(("log_interval", "eval_interval", "checkpoint_interval",
                                                        "steps_per_call"), 10**12))
    assert steps_a_call(huge) == 10**12 and steps_a_call(dataclasses.replace(huge, steps_per_call=10**6 - 1)) == 800_000
    for every, most in itertools.product(range(1, 40), range(1, 40)):  # as the plain search found it
        cut = dataclasses.replace(config, log_interval=every, eval_interval=every, checkpoint_interval=every,
                                  steps_per_call=most)
        assert steps_a_call(cut) == max(n for n in range(1, min(most, every) + 1) if every % n == 0), (every, most)
    # Each interval its own: a call that divided the log interval alone ran past an evaluation (25 of 10, 25, 30).
    for intervals in itertools.product(range(1, 13), repeat=4):
        log, evaluation, save, most = intervals
        cut = dataclasses.replace(config, log_interval=log, eval_interval=evaluation, checkpoint_interval=save,
                                  steps_per_call=most)
        assert steps_a_call(cut) == max(n for n in range(1, most + 1) if log % n == evaluation % n == save % n == 0), (
            intervals)
    config = dataclasses.replace(config, steps_per_call=5)
    named = lambda cut: [(r[0], r[-1]) for r in cut]
    assert named(calls(0, config, range(0))) == [(s, s + 4) for s in range(1, 61, 5)] + [(61, 61), (62, 62), (63, 63)]
    # A resume off the grid (a stop at step 12) runs steps alone up to it; a trace of steps 4-6, each alone.
    assert named(calls(12, config, range(0)))[:4] == [(13, 13), (14, 14), (15, 15), (16, 20)]
    assert named(calls(0, config, range(4, 7)))[:8] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8)]
    assert named(calls(0, config, range(4, 7)))[10:12] == [(11, 15), (16, 20)]
    # A trace from step 5, inside the call of steps 1-5: a call starts the trace, so that one is cut.
    assert named(calls(0, config, range(5, 8)))[:6] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]


def test_tiny_model_overfits_one_fixed_batch():
    steps, B, V = 150, 8, 16
    config = tiny_config(
        vocab_size=V, batch_size=B, learning_rate=3e-3, warmup_steps=0, lr_decay_steps=steps,
        min_lr=3e-4, weight_decay=0.0,
    )
    rng = np.random.default_rng(0)
    seq_BxT1 = rng.integers(0, V, (B, T + 1), dtype=np.int32)
    seq_BxT1[:, 0] = np.arange(B)  # distinct first tokens: every prefix has one continuation
    x_GxBxT, y_GxBxT = seq_BxT1[None, :, :-1], seq_BxT1[None, :, 1:]
    optimizer = make_optimizer(config)
    mesh = make_mesh(config)
    state = init_state(config, optimizer, mesh)
    train_step = make_train_step(config, optimizer, mesh)
    losses = []
    for step in range(steps):
        state, metrics = train_step(state, x_GxBxT, y_GxBxT)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 2.0  # starts knowing nothing (log 16 = 2.8)
    assert losses[-1] < 0.1, losses[::15]


@pytest.mark.parametrize("max_steps, warming, fix", [
    (150, "", "--lr_decay_steps=150"),  # warmup_steps=100 ends before
    (30, ", still warming up (warmup_steps=100)", "--lr_decay_steps=30 --warmup_steps=3"),
    (100, ", still warming up (warmup_steps=100)", "--lr_decay_steps=100 --warmup_steps=10"),  # its last update
    (2, ", still warming up (warmup_steps=100)", "--lr_decay_steps=2 --warmup_steps=0"),  # the shortest decay
])
def test_a_run_that_ends_before_its_cosine_is_told_the_learning_rate_it_stops_at_and_how_to_end_there(
        max_steps, warming, fix):
    # A short try of a long config is left at a high rate, unannealed: its last loss is not the config's.
    config = dataclasses.replace(load_config("shakespeare_char_cpu"), max_steps=max_steps)
    lr = closed_form_lr(config, max_steps - 1)  # update max_steps's
    assert schedule_note(config) == f"the run ends at step {max_steps}, at learning rate {lr:.3g}{warming}: its " \
                                    f"cosine reaches min_lr=0.0001 at lr_decay_steps=2000 (pass {fix} to end there)"
    ends_there = apply_overrides(config, fix.split())
    check_config(ends_there)  # the advice runs
    assert schedule_note(ends_there) is None


def test_one_step_gets_no_advice_and_a_run_past_its_cosine_is_told_where_it_ends():
    config = load_config("shakespeare_char_cpu")
    one = dataclasses.replace(config, max_steps=1)  # no lr_decay_steps ends there: the least is 2
    assert schedule_note(one).endswith("min_lr=0.0001 at lr_decay_steps=2000")
    longer = dataclasses.replace(config, max_steps=2500)
    assert schedule_note(longer) == "from step 2001 on, min_lr=0.0001: the cosine ends at lr_decay_steps=2000"
