"""New tokens per second of KV-cached generation against recomputing the whole context per token.

python benchmarks/sample_throughput.py [--config=shakespeare_char] [--num_samples=8]
    [--max_new_tokens=500] [--FIELD=VALUE ...]
prints one JSON line. Both paths are jitted, compiled before timing, and use the
config's model (randomly initialised: speed does not depend on the weights) in its
compute dtype.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from midgpt.cli import ArgumentParser, add_config_option, positive_int, run, say
from train_throughput import check_device, checked_config

if TYPE_CHECKING:  # for the annotation alone: it imports JAX, which main imports once the arguments are good
    from midgpt.model import GPT


def generate_recomputing(model: GPT, prompt_BxP, max_new_tokens: int, key, temperature: float = 1.0):
    """The reference path, for this comparison only: every token runs the model over a full window.

    main jits it: eqx.filter_jit here would import JAX before the arguments are checked.
    """
    import jax
    import jax.numpy as jnp

    from midgpt.sample import sample_token

    B, P = prompt_BxP.shape
    total = P + max_new_tokens
    W = min(model.config.block_size, total)
    tokens_BxN = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt_BxP)

    def add_token(i, tokens_BxN):
        start = jnp.clip(i - W, 0, total - W)  # the window [start, start + W) ends at or after i - 1
        window_BxW = jax.lax.dynamic_slice(tokens_BxN, (0, start), (B, W))
        logits_BxV = model(window_BxW)[:, i - 1 - start]
        return tokens_BxN.at[:, i].set(sample_token(logits_BxV, jax.random.fold_in(key, i), temperature, None))

    return jax.lax.fori_loop(P, total, add_token, tokens_BxN)


def tokens_per_sec(fn, *args) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return args[1].shape[0] * args[2] / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__)
    add_config_option(parser, "its model, untrained", default="shakespeare_char")
    parser.add_argument("--num_samples", type=positive_int, default=8, help="samples drawn at once")
    parser.add_argument("--max_new_tokens", type=positive_int, default=500, help="tokens each")
    args, overrides = parser.parse_known_args(argv)
    config = checked_config(args.config, overrides, list(vars(args)))

    import equinox as eqx
    import jax  # only once the arguments are good
    import jax.numpy as jnp

    from midgpt.model import GPT, cast_floats
    from midgpt.precision import compute_dtype
    from midgpt.sample import fitting_memory, generate

    check_device(config)
    dtype = compute_dtype(config.compute_dtype)
    model = cast_floats(GPT(config.model, key=jax.random.key(0)), jnp.dtype(dtype))
    prompt_BxP = jnp.zeros((args.num_samples, 1), jnp.int32)
    key = jax.random.key(0)
    with fitting_memory(args.num_samples, 1 + args.max_new_tokens):
        cached = tokens_per_sec(generate, model, prompt_BxP, args.max_new_tokens, key)
        recomputing = tokens_per_sec(eqx.filter_jit(generate_recomputing), model, prompt_BxP,
                                     args.max_new_tokens, key)
    say(json.dumps({
        "config": args.config, "overrides": overrides, "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind, "compute_dtype": dtype,
        "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
        "cached_tokens_per_sec": cached, "recompute_tokens_per_sec": recomputing,
        "speedup": cached / recomputing,
    }))


if __name__ == "__main__":
    run(main)
