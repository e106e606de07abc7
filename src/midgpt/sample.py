"""Text generation from a trained run: temperature, top-k, a sliding context window."""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from midgpt import checkpoint
from midgpt.config import Config, read_config_json
from midgpt.errors import MidgptError
from midgpt.model import GPT
from midgpt.optimizer import make_optimizer
from midgpt.train import fresh_state


def load_model(rundir: str, step: int | None = None) -> tuple[Config, GPT]:
    """The run's config and its parameters at step (default: the newest checkpoint), on one device."""
    config = read_config_json(rundir)
    if not os.path.isdir(checkpoint.directory(rundir)):
        raise MidgptError(f"{rundir} has no checkpoints yet (runs with --debug write none)")
    manager = checkpoint.make_manager(rundir, config)
    steps = manager.all_steps()
    step = max(steps, default=None) if step is None else step
    if step not in steps:
        raise MidgptError(f"{rundir} has no checkpoint at step {step}; it has {sorted(steps) or 'none'}")
    like = eqx.filter_eval_shape(fresh_state, config, make_optimizer(config))
    is_shape = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    one_device = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), eqx.filter(like, is_shape))
    try:
        state = checkpoint.restore(manager, step, like, one_device)
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
        raise MidgptError(f"checkpoint {step} of {rundir} does not restore ({type(e).__name__}); try --step") from None
    finally:
        manager.close()
    return config, state.model


def sample_token(logits_BxV, key, temperature: float, top_k: int | None):
    """Draw one token id per row; temperature 0 is greedy."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1)
    if top_k is not None:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV / temperature, axis=-1)


@eqx.filter_jit
def generate(model: GPT, prompt_BxP, max_new_tokens: int, key, temperature: float = 1.0, top_k: int | None = None):
    """Prompt followed by max_new_tokens generated tokens, (B, P + max_new_tokens).

    Each new token sees at most the last block_size tokens: the window slides
    once the sequence outgrows the model's context. Every step recomputes the
    whole window (no key/value cache yet).
    """
    B, P = prompt_BxP.shape
    total = P + max_new_tokens
    W = min(model.config.block_size, total)
    tokens_BxN = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt_BxP)

    def add_token(i, tokens_BxN):
        start = jnp.clip(i - W, 0, total - W)  # window [start, start + W) ends at or after i - 1
        window_BxW = jax.lax.dynamic_slice(tokens_BxN, (0, start), (B, W))
        logits_BxV = model(window_BxW)[:, i - 1 - start]
        next_B = sample_token(logits_BxV, jax.random.fold_in(key, i), temperature, top_k)
        return tokens_BxN.at[:, i].set(next_B)

    return jax.lax.fori_loop(P, total, add_token, tokens_BxN)
