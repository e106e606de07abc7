"""Text generation from a trained run: a checkpoint restored on one device, the samples checked to fit in its
memory, then temperature, top-k and a sliding context window over a KV cache."""

import contextlib
import functools
import itertools
import os
import zlib

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from midgpt import checkpoint, data, memory, sharding
from midgpt.config import Config
from midgpt.errors import MidgptError
from midgpt.model import GPT, fresh_model, project
from midgpt.rundir import CHECKPOINTS, read_run_config, saved_steps


def check_samples_fit(model: GPT, num_samples: int, prompt_tokens: int, max_new_tokens: int, available: int,
                      source: str, **sampling) -> None:
    """Refuse, in one line, samples that need more than `available` bytes: XLA's count of the prompt pass or a
    decoding chunk, the larger, and the tokens generate holds."""
    if max_new_tokens == 0:  # the prompt alone is shown: neither program runs
        return
    # Well within the memory, skip the compiles (seconds each). The bound: the model, 16 caches a sample (XLA needs
    # two or three) and every value the programs trace, all held at once (a long prompt's attention scores or a large
    # vocabulary's logits outgrow the caches: 4 samples of a 2048-token prompt, one layer of 8 heads: 0.5 GiB, 16
    # caches 0.06 GiB).
    cache_bytes = memory.tree_bytes(jax.eval_shape(lambda: model.empty_cache(1)))
    programs = _programs(model, num_samples, prompt_tokens, max_new_tokens, **sampling)
    traced = max((traced_bytes(program.trace(*args, **sampling).jaxpr.jaxpr) for program, args in programs), default=0)
    far_bound = memory.tree_bytes(eqx.filter(model, eqx.is_array)) + 16 * num_samples * cache_bytes + traced
    if far_bound + token_bytes(num_samples, prompt_tokens + max_new_tokens) < available:
        return
    need = functools.partial(sampling_bytes, model, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens,
                             **sampling)
    if (all_of_them := need(num_samples)) <= available:
        return
    # The memory grows in proportion to the samples (the cache, the activations) from the model's own. The
    # advice leaves a tenth for what XLA does not count (10,000 samples of shakespeare_char_cpu: 0.3 GB more),
    # but not below the one sample that this check lets run.
    one, within = all_of_them if num_samples == 1 else need(1), int(0.9 * available)
    fit = 0 if one > available else max(1, 1 + (within - one) * (num_samples - 1) // (all_of_them - one))
    tokens = prompt_tokens + max_new_tokens
    said = f"{num_samples} samples of {tokens} tokens need" if num_samples > 1 else f"1 sample of {tokens} tokens needs"
    raise MidgptError(f"{said} {memory.readable(all_of_them)} of the {memory.readable(available)} of {source}"
                      + (f"; lower --num_samples to {fit}" + " or fewer" * (fit > 1) if fit else
                         (f"; one alone needs {memory.readable(one)}" if num_samples > 1 else "")
                         + ": sample on a machine with more memory"))


def sampling_bytes(model: GPT, num_samples: int, *, prompt_tokens: int, max_new_tokens: int, **sampling) -> int:
    """XLA's bytes for the prompt pass of num_samples rows or a chunk of their decoding, the larger (compiled only),
    and their tokens'."""
    def total(compiled):
        used = compiled.memory_analysis()
        return (used.argument_size_in_bytes + used.output_size_in_bytes - used.alias_size_in_bytes
                + used.temp_size_in_bytes)

    programs = _programs(model, num_samples, prompt_tokens, max_new_tokens, **sampling)
    return (max(total(program.lower(*args, **sampling).compile()) for program, args in programs)
            + token_bytes(num_samples, prompt_tokens + max_new_tokens))


def token_bytes(num_samples: int, tokens: int) -> int:
    """The int32 tokens generate holds as it makes them, and once more as it joins them."""
    # XLA counts a chunk's: in long samples, the rest outgrow the caches (1000 samples of 20,000 tokens of a tiny
    # model peaked 0.16 GB above 1000 of 100, 0.08 GB of tokens).
    return 2 * num_samples * tokens * 4


def _programs(model: GPT, num_samples: int, prompt_tokens: int, max_new_tokens: int, **sampling) -> list:
    """(_prefill, its arguments) and (_decode, a chunk's), as abstract arrays: the programs that sampling runs."""
    key = jax.eval_shape(jax.random.key, 0)
    prompt_BxP = jax.ShapeDtypeStruct((num_samples, prompt_tokens), jnp.int32)
    programs = [(_prefill, (model, prompt_BxP, key))]
    if max_new_tokens > 1:
        cache, token_B = jax.eval_shape(functools.partial(_prefill, **sampling), model, prompt_BxP, key)
        start = jax.ShapeDtypeStruct((), jnp.int32)
        programs.append((_decode, (model, cache, token_B, start, key, _chunk_length(max_new_tokens))))
    return programs


def traced_bytes(jaxpr) -> int:
    """Bytes of every value a jaxpr makes, those of the jaxprs inside it (a scan's body, once) included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += memory.tree_bytes([v.aval for v in eqn.outvars])
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else [param]:
                if isinstance(inner, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    total += traced_bytes(getattr(inner, "jaxpr", inner))
    return total


@contextlib.contextmanager
def fitting_memory(num_samples: int, tokens: int):
    """Samples that do not fit the device's memory become one line that says what to lower."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not memory.ran_out(e):
            raise
        raise MidgptError(f"{num_samples} sample{'s' * (num_samples > 1)} of {tokens} tokens "
                          f"{'do' if num_samples > 1 else 'does'} not fit the device's memory; lower --num_samples "
                          "or --max_new_tokens") from None


def load_model(rundir: str, step: int | None = None, say=None, config: Config | None = None) -> tuple[Config, GPT]:
    """The run's config (read_run_config's, unless given) and its parameters at step (default: the newest that
    restores, said with say), on one device."""
    config = config or read_run_config(rundir)
    if not os.path.isdir(checkpoint.directory(rundir)):
        # Every run makes it (--debug's empty) before its config.json: a run without it had it removed.
        raise MidgptError(f"{rundir} holds no {CHECKPOINTS}/ (removed?): put the run's checkpoints back "
                          "there to sample from it")
    like = eqx.filter_eval_shape(fresh_model, config)
    failed = {}  # step: why, of the newest checkpoints, which did not restore
    # A run in training removes its oldest checkpoint as each new one commits, maybe while orbax reads
    # the folder or the checkpoint chosen here: then they are listed again, and the newest is another.
    for attempt in itertools.count():
        # Only those whose save finished, as a resume takes them: one still being written reads as damaged.
        steps = checkpoint.committed_steps(rundir)
        untried = [s for s in steps if s not in failed]
        chosen = step if step is not None else untried[-1] if untried else None
        if chosen is None and failed:
            raise MidgptError(f"no checkpoint of {rundir} restores ({checkpoint.failures(failed)}): fix the cause, "
                              "or train the run again")
        if chosen is None:
            raise MidgptError(f"{rundir} has no finished checkpoint yet: sample once its training has saved one "
                              f"(every {config.checkpoint_interval} steps, and at its end or stop; a --debug run "
                              "saves none)")
        if chosen not in steps:
            unfinished = " whose save finished" if chosen in saved_steps(rundir) else ""
            raise MidgptError(f"{rundir} has no checkpoint{unfinished} at step {chosen}; it has {steps or 'none'}")
        try:
            model = restore_on_one_device(rundir, config, chosen, like)
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            gone = not checkpoint.committed(rundir, chosen)
            if attempt < 2 and checkpoint.committed_steps(rundir) != steps and (step is None or not gone):
                continue
            if gone:
                raise MidgptError(f"checkpoint {chosen} of {rundir} was removed as it was read (its training keeps "
                                  f"the newest {config.keep_checkpoints}); "
                                  + ("pass a newer --step, or none" if step is not None else "try again")) from None
            if isinstance(e, MidgptError):
                raise
            if step is None:  # the newest that restores, as a resume takes
                failed[chosen] = checkpoint.describe(e)
                continue
            others = [s for s in steps if s != chosen]
            raise MidgptError(f"checkpoint {chosen} of {rundir} does not restore ({checkpoint.describe(e)}); "
                              + (f"try --step= another of {others}, or none for the newest that restores" if others
                                 else "it is the run's only one: fix the cause, or train the run again")) from None
        # Which one: a run in training saves a newer one every checkpoint_interval steps.
        if failed and say:
            shown = ", ".join(map(str, sorted(failed, reverse=True)))
            say(f"checkpoint{'s' * (len(failed) > 1)} {shown} of {rundir} do{'es' * (len(failed) == 1)} not restore "
                f"({failed[max(failed)]}): sampling from checkpoint {chosen}")
        elif say:
            say(f"sampling from checkpoint {chosen} of {rundir}")
        return config, model


def restore_on_one_device(rundir: str, config: Config, step: int, like: GPT) -> GPT:
    """The model of checkpoint step, on one device."""
    one_device = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]),
                              eqx.filter(like, sharding.is_abstract))
    # Made only for a step whose save finished (load_model's checks): orbax warns of each unfinished save.
    manager = checkpoint.make_manager(rundir, config)
    try:
        # Another model is no damage: said apart.
        checkpoint.check_arrays(checkpoint.step_directory(rundir, step), like, part="model")
        return checkpoint.restore_model(manager, step, like, one_device)
    finally:
        manager.close()


def run_meta(rundir: str, config: Config, say=None) -> dict:
    """The tokenizer the run trained with: its copy of the data's meta.json (older runs: the data's own, said)."""
    meta = data.load_run_meta(rundir, config.data_dir)
    if meta is not None:
        return meta
    if not os.path.exists(os.path.join(config.data_dir, "meta.json")):  # preparing data is no fix
        raise MidgptError(f"{rundir} holds no meta.json (its tokenizer), nor does its data_dir {config.data_dir}; "
                          f"copy the meta.json of the data it trained on to {rundir}/")
    if say:  # prepared again from other text since, it would decode wrongly, and nothing would tell
        say(f"{rundir} holds no copy of its data's meta.json: decoding with {config.data_dir}/meta.json, "
            "which must be of the data it trained on")
    return data.load_meta(config.data_dir)


def sample_token(logits_BxV, key, temperature: float, top_k: int | None, vocab: int | None = None):
    """Draw one token id per row, below vocab if given; temperature 0 is greedy."""
    # vocab is the tokenizer's: a table padded for speed (openwebtext's 50304 rows for GPT-2's
    # 50257 ids) has rows that were never a target and that no tokenizer decodes.
    logits_BxV = logits_BxV[:, :vocab]
    if temperature < float(np.finfo(np.float32).tiny):  # 0, or one that float32 arithmetic flushes to 0
        return jnp.argmax(logits_BxV, axis=-1)
    # Shifted to a maximum of 0, so that a small temperature cannot overflow the likeliest tokens into tied infs;
    # a temperature past float32's largest draws as evenly as that one, without the cast's overflow warning.
    temperature = min(temperature, float(np.finfo(np.float32).max))
    scaled_BxV = (logits_BxV - logits_BxV.max(axis=-1, keepdims=True)) / temperature
    # k of V or more is every token: drawn as without top_k, or --top_k=65 would write other text than none.
    if top_k is not None and top_k < logits_BxV.shape[-1]:
        # A draw among exactly k, ties or not, chosen by the logits (a huge temperature ties all).
        top_ids_Bxk = jax.lax.top_k(logits_BxV, top_k)[1]
        drawn_B = jax.random.categorical(key, jnp.take_along_axis(scaled_BxV, top_ids_Bxk, axis=-1), axis=-1)
        return jnp.take_along_axis(top_ids_Bxk, drawn_B[:, None], axis=-1)[:, 0]
    return jax.random.categorical(key, scaled_BxV, axis=-1)


def prompt_key(seed: int, ids: list[int]) -> jax.Array:
    """The key of the draws that continue the prompt `ids`: the seed's, folded with the prompt."""
    # Not the seed's alone: with the same draws at each position for every prompt, a model's
    # continuations of different prompts fell into the same text after a few dozen characters.
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(np.asarray(ids, np.int32).tobytes()))


DECODE_CHUNK = 64  # tokens a call of _decode makes, at most


def generate(model: GPT, prompt_BxP, max_new_tokens: int, key, temperature: float = 1.0, top_k: int | None = None,
             vocab: int | None = None):
    """Prompt followed by max_new_tokens generated tokens, (B, P + max_new_tokens); new ids below vocab if given."""
    return jnp.concatenate([prompt_BxP, *generate_chunks(model, prompt_BxP, max_new_tokens, key, temperature, top_k,
                                                         vocab)], axis=1)


def generate_chunks(model: GPT, prompt_BxP, max_new_tokens: int, key, temperature: float = 1.0,
                    top_k: int | None = None, vocab: int | None = None, chunk: int = DECODE_CHUNK):
    """The new tokens of `generate`, (B, n) arrays of at most `chunk` positions each: to show them as they come.

    Past block_size the context slides, as in the model's forward pass: each layer attends to the block_size
    latest positions, so a token's reach grows by block_size - 1 with each layer.
    """
    # Checked at the call, not at the first next() of a generator.
    if prompt_BxP.shape[1] > model.config.block_size:
        raise ValueError("the prompt must fit block_size; keep its last block_size tokens")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    return _chunks(model, prompt_BxP, max_new_tokens, key, chunk, temperature=temperature, top_k=top_k, vocab=vocab)


def _chunk_length(max_new_tokens: int, chunk: int = DECODE_CHUNK) -> int:
    """Tokens a call of _decode makes, at most `chunk`: one compiled program for any max_new_tokens."""
    # No more than the tokens after the first: a 20-token sample decoded 64 positions, slower than no cache.
    return max(1, min(chunk, max_new_tokens - 1))


def _chunks(model: GPT, prompt_BxP, max_new_tokens: int, key, chunk: int, **sampling):
    P = prompt_BxP.shape[1]
    if max_new_tokens == 0:
        return
    cache, token_B = _prefill(model, prompt_BxP, key, **sampling)
    yield token_B[:, None].astype(prompt_BxP.dtype)
    chunk = _chunk_length(max_new_tokens, chunk)
    for position in range(P, P + max_new_tokens - 1, chunk):
        cache, new_BxN = _decode(model, cache, token_B, jnp.int32(position), key, chunk, **sampling)
        token_B = new_BxN[:, -1]
        yield new_BxN[:, :P + max_new_tokens - 1 - position].astype(prompt_BxP.dtype)


def _last_logits(model: GPT, tokens_BxT, positions_T, cache):
    """(the float32 logits after each row's last token, (B, V); the cache with the tokens' keys and values)."""
    x_BxTxD, embed_VxD, cache = model.hidden(tokens_BxT, positions_T=positions_T, cache=cache)
    # The last position's logits only: all T of them were a (B, T, V) float32 array, 1.5 GiB for
    # 8 samples of a 1024-token GPT-2 prompt, and a third more compute.
    return project("bd,vd->bv", x_BxTxD[:, -1], embed_VxD, out_dtype=jnp.float32), cache


SAMPLING = ("temperature", "top_k", "vocab")  # the sampling options, static in _prefill and _decode


@functools.partial(jax.jit, static_argnames=SAMPLING)
def _prefill(model: GPT, prompt_BxP, key, temperature, top_k, vocab):
    """(the KV cache of the prompt, the first new token of each row, (B,))."""
    B, P = prompt_BxP.shape
    logits_BxV, cache = _last_logits(model, prompt_BxP, np.arange(P), model.empty_cache(B))
    return cache, sample_token(logits_BxV, jax.random.fold_in(key, P), temperature, top_k, vocab)


# The cache is donated: the chunk's output takes its buffer, where XLA would otherwise copy it in (once more
# the cache's memory, at each chunk).
@functools.partial(jax.jit, static_argnames=("steps", *SAMPLING), donate_argnames="cache")
def _decode(model: GPT, cache, token_B, start, key, steps: int, temperature, top_k, vocab):
    """(the cache, the `steps` tokens after token_B, which sits at position start), one position's forward pass each."""
    def decode(carry, position):
        cache, token_B = carry
        logits_BxV, cache = _last_logits(model, token_B[:, None], position[None], cache)
        # Each token's draw is keyed by its position: the same text, whatever the chunks.
        next_B = sample_token(logits_BxV, jax.random.fold_in(key, position + 1), temperature, top_k, vocab)
        return (cache, next_B), next_B

    (cache, _), new_NxB = jax.lax.scan(decode, (cache, token_B), start + jnp.arange(steps))
    return cache, new_NxB.T
