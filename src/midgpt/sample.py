"""Text generation from a trained model: temperature, top-k, a sliding context window."""

import equinox as eqx
import jax
import jax.numpy as jnp

from midgpt.model import GPT


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
