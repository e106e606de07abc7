"""AdamW with independent weight decay, warmup + cosine schedule, global-norm clipping."""

import equinox as eqx
import jax
import optax

from midgpt.config import Config
from midgpt.model import RMSNorm


def lr_schedule(config: Config) -> optax.Schedule:
    """Learning rate of the update that follows `count` earlier ones.

    The first update already uses peak / warmup_steps (optax's warmup starts at 0,
    which would waste a step), update warmup_steps uses the peak, and the cosine
    reaches min_lr at update lr_decay_steps. warmup_steps=0 is 1: the first update uses the peak.
    """
    warmup = max(config.warmup_steps, 1)
    cosine = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, config.lr_decay_steps, config.min_lr)
    return lambda count: cosine(count + 1)


def decay_mask(params):
    """True for matrices (embedding, projections); False for norm gains."""
    is_norm = lambda x: isinstance(x, RMSNorm)
    return jax.tree.map(lambda x: not is_norm(x) and eqx.is_array(x), params, is_leaf=is_norm)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """update = -lr(t) * (adam + weight_decay / learning_rate * param).

    Dividing by the peak lr makes the decay independent (Wortsman et al. 2023):
    it follows the schedule's shape, but its size does not change with the peak lr.
    """
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
        optax.scale_by_adam(b1=config.beta1, b2=config.beta2),
        optax.add_decayed_weights(config.weight_decay / config.learning_rate, mask=decay_mask),
        optax.scale_by_learning_rate(lr_schedule(config)),
    )
