"""AdamW with independent weight decay, warmup + cosine schedule, global-norm clipping."""

import jax
import optax

from midgpt.config import Config
from midgpt.model import Norm


def lr_schedule(config: Config) -> optax.Schedule:
    """Learning rate of the update that follows `count` earlier ones.

    Update 1 uses peak / warmup_steps, update warmup_steps the peak, update lr_decay_steps min_lr.
    """
    # Shifted by one: optax's warmup starts at 0, which would waste a step. warmup_steps=0 acts as 1.
    warmup = max(config.warmup_steps, 1)
    cosine = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, config.lr_decay_steps, config.min_lr)
    return lambda count: cosine(count + 1)


def lr_at(config: Config, count: int) -> float:
    """The learning rate of the update that follows `count` earlier ones, as a number to print."""
    # One program: called on a number, optax's schedule runs a dozen operations, each compiled on its own
    # (0.4 s of every launch's start here, against 0.06 s).
    return float(jax.jit(lr_schedule(config))(count))


def schedule_note(config: Config) -> str | None:
    """What a run whose max_steps is not lr_decay_steps should know of its learning rate's end."""
    if config.lr_decay_steps < config.max_steps:  # as extending a finished run with --max_steps alone does
        return (f"from step {config.lr_decay_steps + 1} on, min_lr={config.min_lr:g}: the cosine ends at "
                f"lr_decay_steps={config.lr_decay_steps}")
    if config.lr_decay_steps == config.max_steps:
        return None
    # A short try of a long config: its last steps are not annealed, so its last loss is not the config's.
    last_lr = lr_at(config, config.max_steps - 1)
    warming = config.warmup_steps >= config.max_steps  # then the advice must shorten warmup too, to be valid
    fix = f"--lr_decay_steps={config.max_steps}" + (f" --warmup_steps={config.max_steps // 10}" if warming else "")
    return (f"the run ends at step {config.max_steps}, at learning rate {last_lr:.3g}"
            + (f", still warming up (warmup_steps={config.warmup_steps})" if warming else "")
            + f": its cosine reaches min_lr={config.min_lr:g} at lr_decay_steps={config.lr_decay_steps}"
            + (f" (pass {fix} to end there)" if config.max_steps >= 2 else ""))  # lr_decay_steps is at least 2


def decay_mask(params):
    """False for norm gains (every array inside a Norm), True for all else: the matrices today."""
    # By module, not by rank: the stacked layers make every gain 2-D. A bias added later would be decayed.
    is_norm = lambda x: isinstance(x, Norm)
    return jax.tree.map(lambda x: not is_norm(x), params, is_leaf=is_norm)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """update = -lr(t) * (adam + weight_decay / learning_rate * param).

    Independent decay (Wortsman et al. 2023): it follows the schedule's shape, not the peak lr's size.
    """
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
        optax.scale_by_adam(b1=config.beta1, b2=config.beta2),
        # At weight_decay=0 too, which optax skips itself: optax.identity() there would change the state's
        # tree, and a run resumed with another weight_decay would not restore.
        optax.add_decayed_weights(config.weight_decay / config.learning_rate, mask=decay_mask),
        optax.scale_by_learning_rate(lr_schedule(config)),
    )
