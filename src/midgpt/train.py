"""The training step (a pure function) and the plain Python loop around it."""

import json
import math
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from midgpt import checkpoint, data
from midgpt.config import Config, config_to_dict
from midgpt.errors import MidgptError
from midgpt.model import GPT, cast_floats, count_params
from midgpt.optimizer import lr_schedule, make_optimizer

# Streams of batch keys (seed, stream, index): one per use, so they never collide.
TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 0, 1, 2


class TrainState(eqx.Module):
    model: GPT  # parameters in param_dtype
    opt_state: optax.OptState
    step: jax.Array  # updates done so far


def loss_fn(model: GPT, x_BxT, y_BxT, key=None):
    """Mean next-token cross-entropy, in float32."""
    logits_BxTxV = model(x_BxT, key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, y_BxT).mean()


def init_state(config: Config, optimizer: optax.GradientTransformation) -> TrainState:
    model = GPT(config.model, key=jax.random.key(config.seed))
    model = cast_floats(model, jnp.dtype(config.param_dtype))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    return TrainState(model, opt_state, jnp.zeros((), jnp.int32))


def make_train_step(config: Config, optimizer: optax.GradientTransformation):
    """Build the jitted step (state, x_GxBxT, y_GxBxT, key) -> (state, metrics)."""
    compute_dtype = jnp.dtype(config.compute_dtype)
    schedule = lr_schedule(config)

    def train_step(state: TrainState, x_GxBxT, y_GxBxT, key):
        params, static = eqx.partition(state.model, eqx.is_array)

        # Differentiate with respect to the param_dtype copy, so gradients and
        # their sum over micro-batches stay in param_dtype.
        def micro_loss(params, x_BxT, y_BxT, micro_key):
            model = eqx.combine(cast_floats(params, compute_dtype), static)
            return loss_fn(model, x_BxT, y_BxT, micro_key)

        def accumulate(grad_sum, micro_batch):
            loss, grad = jax.value_and_grad(micro_loss)(params, *micro_batch)
            return jax.tree.map(jnp.add, grad_sum, grad), loss

        G = x_GxBxT.shape[0]
        keys_G = jax.random.split(key, G)
        grad_sum, loss_G = jax.lax.scan(
            accumulate, jax.tree.map(jnp.zeros_like, params), (x_GxBxT, y_GxBxT, keys_G)
        )
        grads = jax.tree.map(lambda g: g / G, grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_G.mean(),
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
        }
        return TrainState(eqx.combine(params, static), opt_state, state.step + 1), metrics

    return eqx.filter_jit(train_step, donate="all")


@eqx.filter_jit
def eval_loss(model: GPT, x_BxT, y_BxT):
    return loss_fn(model, x_BxT, y_BxT)


def evaluate(model: GPT, tokens, config: Config, stream: int) -> float:
    """Mean loss over eval_iters batches; the same batches at every evaluation."""
    model = cast_floats(model, jnp.dtype(config.compute_dtype))
    losses = []
    for i in range(config.eval_iters):
        x_BxT, y_BxT = data.get_batch(
            tokens, (config.seed, stream, i), config.batch_size, config.model.block_size
        )
        losses.append(eval_loss(model, x_BxT, y_BxT))
    return float(np.mean(jax.device_get(losses)))


def train_batch(tokens, config: Config, step: int):
    """The global batch of update `step`, shaped (G, B, T): the same on every call."""
    G, B, T = config.g_accum_iters, config.batch_size, config.model.block_size
    x, y = data.get_batch(tokens, (config.seed, TRAIN_STREAM, step), G * B, T)
    return x.reshape(G, B, T), y.reshape(G, B, T)


def check_data(config: Config):
    """Open the token files and check that the model's vocabulary covers them."""
    meta = data.load_meta(config.data_dir)
    if meta["vocab_size"] > config.model.vocab_size:
        raise MidgptError(
            f"{config.data_dir} has {meta['vocab_size']} token ids but model.vocab_size is "
            f"{config.model.vocab_size}; set --model.vocab_size={meta['vocab_size']} or more"
        )
    return data.load_tokens(config.data_dir, "train"), data.load_tokens(config.data_dir, "val")


def start_rundir(config: Config, rundir: str):
    if os.path.exists(os.path.join(rundir, "config.json")):
        raise MidgptError(
            f"{rundir} already holds a run; pass a new --rundir (resuming is not supported yet)"
        )
    os.makedirs(rundir, exist_ok=True)
    with open(os.path.join(rundir, "config.json"), "w") as f:
        json.dump(config_to_dict(config), f, indent=2)


def train(config: Config, rundir: str, debug: bool = False) -> GPT:
    """Train from scratch into rundir: config.json, metrics.jsonl and the final model.eqx."""
    train_tokens, val_tokens = check_data(config)
    start_rundir(config, rundir)
    print("config:", json.dumps(config_to_dict(config)))

    optimizer = make_optimizer(config)
    state = init_state(config, optimizer)
    train_step = make_train_step(config, optimizer)
    print(f"{count_params(state.model):,} parameters; run directory {rundir}")
    tokens_per_step = config.g_accum_iters * config.batch_size * config.model.block_size
    dropout_key = jax.random.key(config.seed + 1)
    # A few steady-state steps, after the compile, so the trace shows the step itself.
    profile_steps = range(3, min(6, config.max_steps + 1)) if debug else range(0)
    if profile_steps:
        print(f"debug: profiler trace of steps {profile_steps[0]}-{profile_steps[-1]} in {rundir}/profile")

    log = open(os.path.join(rundir, "metrics.jsonl"), "a")
    bar = tqdm(range(1, config.max_steps + 1), desc="train", dynamic_ncols=True)
    interval_start, interval_steps = time.perf_counter(), 0
    for step in bar:
        if profile_steps and step == profile_steps[0]:
            jax.profiler.start_trace(os.path.join(rundir, "profile"))
        x_GxBxT, y_GxBxT = train_batch(train_tokens, config, step)
        state, metrics = train_step(state, x_GxBxT, y_GxBxT, jax.random.fold_in(dropout_key, step))
        interval_steps += 1
        if profile_steps and step == profile_steps[-1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        if step == 1:  # leave the compile out of the throughput
            jax.block_until_ready(state)
            tqdm.write(f"step 1 (compile included) took {time.perf_counter() - interval_start:.1f} s")
            interval_start, interval_steps = time.perf_counter(), 0

        is_eval = step % config.eval_interval == 0 or step == config.max_steps
        if not (is_eval or step % config.log_interval == 0):
            continue
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if not math.isfinite(record["loss"]):
            raise MidgptError(f"loss is {record['loss']} at step {step}; lower learning_rate")
        elapsed = time.perf_counter() - interval_start
        record["tokens_per_sec"] = interval_steps * tokens_per_step / elapsed if interval_steps else None
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_sec'] or 0:,.0f}")
        if is_eval:
            record["train_loss"] = evaluate(state.model, train_tokens, config, EVAL_TRAIN_STREAM)
            record["val_loss"] = evaluate(state.model, val_tokens, config, EVAL_VAL_STREAM)
            tqdm.write(f"step {step}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}")
        log.write(json.dumps(record) + "\n")
        log.flush()
        interval_start, interval_steps = time.perf_counter(), 0
    bar.close()
    log.close()
    checkpoint.save_model(rundir, state.model)
    return state.model
