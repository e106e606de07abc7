"""Generation promises: the KV cache changes nothing, greedy continues a learned pattern, seeds repeat."""

import codecs
import functools
import re
import shutil
import subprocess
import sys
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO_ROOT
from midgpt import checkpoint, data, sample, tokenizer
from midgpt.config import Config, ModelConfig, apply_overrides, load_config
from midgpt.errors import MidgptError
from midgpt.model import GPT, cast_floats
from midgpt.optimizer import make_optimizer
from midgpt.sample import (check_samples_fit, fitting_memory, generate, generate_chunks, load_model, prompt_key,
                           sample_token)
from midgpt.sharding import make_mesh
from midgpt.step import fresh_state, init_state, make_train_step
from midgpt.train import write_config

V, W = 11, 8  # vocabulary, block_size


def tiny_model(seed=0) -> GPT:
    return GPT(ModelConfig(vocab_size=V, block_size=W, n_layer=2, n_head=2, n_embd=32), key=jax.random.key(seed))


@pytest.mark.parametrize("prefill", [1, 5, W])
def test_cached_decoding_equals_the_full_forward_pass_even_past_block_size(prefill):
    model = tiny_model()
    tokens_BxN = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 3 * W - 3)), jnp.int32)
    forward = jax.jit(lambda tokens: model(tokens))
    full_BxNxV = forward(tokens_BxN)

    # As sampling prefills (positions known as the call is traced) and decodes.
    prefill_step = jax.jit(lambda tokens, cache: sample._last_logits(model, tokens, np.arange(prefill), cache))
    step = jax.jit(functools.partial(sample._last_logits, model))
    logits_BxV, cache = prefill_step(tokens_BxN[:, :prefill], model.empty_cache(2))
    cached = [logits_BxV]
    for p in range(prefill, tokens_BxN.shape[1]):
        logits_BxV, cache = step(tokens_BxN[:, p:p + 1], jnp.array([p]), cache)
        cached.append(logits_BxV)
    cached_BxNxV = jnp.stack(cached, axis=1)  # the logits after each position from the prompt's last on
    np.testing.assert_allclose(cached_BxNxV, full_BxNxV[:, prefill - 1:], rtol=1e-5, atol=1e-5)
    # The window slides: each layer looks W - 1 tokens back, so beyond n_layer (W - 1)
    # positions the first token no longer matters.
    reach = model.config.n_layer * (W - 1)
    changed_BxNxV = forward(tokens_BxN.at[:, 0].set((tokens_BxN[:, 0] + 1) % V))
    np.testing.assert_allclose(changed_BxNxV[:, reach + 1:], full_BxNxV[:, reach + 1:], rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(changed_BxNxV[:, reach] - full_BxNxV[:, reach])) > 1e-4


def test_several_tokens_at_once_past_block_size_with_a_cache_are_refused_not_written_over_others():
    # Written before they attend, their keys would take the slots of keys that the earlier of them still see:
    # wrong logits, silently (a write across the cache's end also landed in other slots).
    model = tiny_model()
    tokens_BxN = jnp.zeros((2, W + 2), jnp.int32)
    _, cache = sample._last_logits(model, tokens_BxN[:, :W - 2], np.arange(W - 2), model.empty_cache(2))
    refusal = ("several tokens at once with a cache take positions known as the call is traced (numpy), all below "
               "block_size; past it, pass them one at a time")
    with pytest.raises(ValueError, match=re.escape(refusal)):
        sample._last_logits(model, tokens_BxN[:, W - 2:], np.arange(W - 2, W + 2), cache)
    with pytest.raises(ValueError, match=re.escape(refusal)):  # traced, they cannot be checked
        jax.jit(functools.partial(sample._last_logits, model))(tokens_BxN[:, W - 2:W], jnp.arange(W - 2, W), cache)
    # One at a time, past block_size as below it.
    for position in range(W - 2, W + 2):
        _, cache = sample._last_logits(model, tokens_BxN[:, position:position + 1], jnp.array([position]), cache)
    assert sorted(np.asarray(cache.positions_S).tolist()) == list(range(2, W + 2))


def test_greedy_decoding_continues_a_learned_pattern():
    period, steps, B = 7, 200, 16
    config = Config(data_dir="unused", model=ModelConfig(vocab_size=V, block_size=W, n_layer=2, n_head=2, n_embd=32),
                    batch_size=B, learning_rate=3e-3, warmup_steps=10, lr_decay_steps=steps, compute_dtype="float32")
    phases_B = np.random.default_rng(0).integers(0, period, B)
    seq_BxT1 = (phases_B[:, None] + np.arange(W + 1)) % period
    x_GxBxT, y_GxBxT = seq_BxT1[None, :, :-1].astype(np.int32), seq_BxT1[None, :, 1:].astype(np.int32)
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    state, train_step = init_state(config, optimizer, mesh), make_train_step(config, optimizer, mesh)
    for _ in range(steps):
        state, metrics = train_step(state, x_GxBxT, y_GxBxT)
    assert float(metrics["loss"]) < 0.05

    prompt_1xP = jnp.array([[2, 3, 4]], jnp.int32)
    tokens_1xN = generate(state.model, prompt_1xP, 5 * W, jax.random.key(0), temperature=0.0)
    expected = (2 + np.arange(3 + 5 * W)) % period  # five windows' worth: well past block_size
    np.testing.assert_array_equal(np.asarray(tokens_1xN[0]), expected)


def test_greedy_generation_is_the_argmax_of_the_full_forward_pass_even_past_block_size():
    # The prompt's pass and each decoded position, against the model run on the whole text at each step. Sharp
    # attention and large logits: at initialisation, a position one off changed too little to change an argmax.
    model = eqx.tree_at(lambda m: (m.blocks.attn.q_norm.weight_D, m.blocks.attn.wo_HxCxD), tiny_model(seed=3),
                        replace_fn=lambda w: 8 * w)
    prompt_BxP = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 5)), jnp.int32)
    forward = jax.jit(lambda tokens: model(tokens))
    expected = np.asarray(prompt_BxP)
    for _ in range(2 * W):
        next_B = np.argmax(np.asarray(forward(jnp.asarray(expected)))[:, -1], axis=-1)
        expected = np.concatenate([expected, next_B[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(generate(model, prompt_BxP, 2 * W, jax.random.key(0), temperature=0.0)),
                                  expected)


def test_the_prompts_draw_and_the_next_have_keys_of_their_own():
    # Every token as likely (a zero table makes every logit 0): two draws with one key are one token in each row.
    model = eqx.tree_at(lambda m: m.embed_VxD, tiny_model(), jnp.zeros((V, 32)))
    new_BxN = np.asarray(generate(model, jnp.ones((64, 3), jnp.int32), 2, jax.random.key(0)))[:, 3:]
    assert np.mean(new_BxN[:, 0] == new_BxN[:, 1]) < 0.5  # 1 / V apart


def test_sampling_draws_from_float32_logits_of_a_bfloat16_model():
    # In bfloat16 (8 bits of mantissa), logits a little apart tie, and a temperature divides their rounding error.
    model = cast_floats(tiny_model(), jnp.bfloat16)
    tokens_BxT, positions_T = jnp.ones((2, 3), jnp.int32), jnp.arange(3)
    logits_BxV, _ = sample._last_logits(model, tokens_BxT, positions_T, model.empty_cache(2))
    assert logits_BxV.shape == (2, V) and logits_BxV.dtype == jnp.float32
    # Summed in float32, not rounded to bfloat16 and then cast: 0.3% off, the ties above.
    x_BxTxD, embed_VxD, _ = model.hidden(tokens_BxT, positions_T=positions_T, cache=model.empty_cache(2))
    exact_BxV = jnp.einsum("bd,vd->bv", x_BxTxD[:, -1].astype(jnp.float32), embed_VxD.astype(jnp.float32))
    np.testing.assert_allclose(logits_BxV, exact_BxV, rtol=1e-5, atol=1e-6)


def test_same_seed_same_samples_and_top_k_1_is_greedy():
    model = tiny_model(seed=1)
    prompt_BxP = jnp.array([[1, 2, 3]] * 4, jnp.int32)
    sample = lambda seed, **kw: np.asarray(generate(model, prompt_BxP, 3 * W, jax.random.key(seed), **kw))
    assert np.array_equal(sample(0), sample(0))
    assert not np.array_equal(sample(0), sample(1))
    assert not np.array_equal(sample(0)[0], sample(0)[1])  # the rows of a batch draw independently
    greedy = sample(0, temperature=0.0)
    assert np.array_equal(sample(5, temperature=1.0, top_k=1), greedy)
    assert np.array_equal(greedy[0], greedy[1])


def test_other_prompts_draw_other_text_with_the_same_seed():
    # Where a model's next-token distributions agree (here uniform: a zero table makes every logit 0), the
    # same draws give the same tokens: keyed by the seed alone, every prompt's continuation was one text.
    model = eqx.tree_at(lambda m: m.embed_VxD, tiny_model(), jnp.zeros((V, 32)))
    text = lambda *prompt: np.asarray(generate(model, jnp.array([prompt], jnp.int32), 2 * W,
                                               prompt_key(0, list(prompt))))[0, 3:]
    assert np.array_equal(text(1, 2, 3), text(1, 2, 3))
    # And each position draws with its own key: one key for all repeated one token, as uniform draws never do.
    assert len(set(text(1, 2, 3).tolist())) > 3
    assert not np.array_equal(text(1, 2, 3), text(4, 5, 6))
    assert not np.array_equal(text(1, 2, 3), text(3, 2, 1))
    # Keyed by the prompt, not by the batch of its copies: the first of --num_samples=3 is --num_samples=1's.
    three = np.asarray(generate(model, jnp.array([[1, 2, 3]] * 3, jnp.int32), 2 * W, prompt_key(0, [1, 2, 3])))
    assert np.array_equal(three[0, 3:], text(1, 2, 3))


@pytest.mark.parametrize("max_new_tokens, decoded", [(1, []), (2, [1]), (20, [19]), (70, [64, 64])])
def test_a_sample_decodes_no_more_positions_than_it_needs(max_new_tokens, decoded, monkeypatch):
    # The first new token comes with the prompt's forward pass, the others in chunks of at most 64 positions.
    steps = []
    decode = sample._decode
    monkeypatch.setattr(sample, "_decode", lambda *args, **kw: steps.append(args[5]) or decode(*args, **kw))
    new = list(generate_chunks(tiny_model(), jnp.array([[1, 2, 3]], jnp.int32), max_new_tokens, jax.random.key(0)))
    assert sum(n.shape[1] for n in new) == max_new_tokens and steps == decoded


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 7, 3 * W + 1])
def test_chunks_of_any_size_make_the_same_text(max_new_tokens):
    # sample.py shows one sample chunk by chunk: each token's draw is keyed by its position, not by its chunk.
    model = tiny_model(seed=2)
    prompt_BxP = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
    by_chunk = {chunk: list(generate_chunks(model, prompt_BxP, max_new_tokens, jax.random.key(0), chunk=chunk))
                for chunk in (1, 3, 64)}
    for chunk, pieces in by_chunk.items():
        assert all(0 < p.shape[1] <= chunk and p.shape[0] == 2 for p in pieces)
    whole = [np.concatenate(pieces, axis=1) if pieces else np.zeros((2, 0), np.int32) for pieces in by_chunk.values()]
    assert all(w.shape == (2, max_new_tokens) and np.array_equal(w, whole[0]) for w in whole)
    if max_new_tokens > W:  # a chunk's draws, not a repeat of one: the rows and positions differ
        assert len(set(whole[0][0].tolist())) > 1 and not np.array_equal(whole[0][0], whole[0][1])


def test_a_prompt_past_block_size_or_a_negative_length_is_refused_at_the_call():
    # Not at the first next(): a negative length generated one token, a long prompt failed later.
    model = tiny_model()
    with pytest.raises(ValueError, match="the prompt must fit block_size"):
        generate_chunks(model, jnp.ones((1, model.config.block_size + 1), jnp.int32), 1, jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, not -1"):
        generate_chunks(model, jnp.ones((1, 2), jnp.int32), -1, jax.random.key(0))


@pytest.mark.parametrize("num_samples, said", [(1, "1 sample of 101 tokens does"), (3, "3 samples of 101 tokens do")])
def test_samples_past_the_memory_are_one_line_and_other_runtime_errors_are_not(num_samples, said):
    fits = rf"^{said} not fit the device's memory; lower --num_samples or --max_new_tokens$"
    with pytest.raises(MidgptError, match=fits), fitting_memory(num_samples, 101):
        jnp.zeros((2**40,), jnp.float32).block_until_ready()  # 4 TiB: XLA refuses the allocation at once
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: not a lack of memory"), fitting_memory(1, 101):
        raise jax.errors.JaxRuntimeError("INTERNAL: not a lack of memory")  # a bug to see whole, not to lower sizes


def test_a_character_split_over_tokens_is_shown_once_whole():
    meta = {"tokenizer": "gpt2"}
    ids = tokenizer.encode(meta, "a robot 🤖 and 日本語.")  # " 🤖" is 3 tokens, each a part of its bytes
    pieces = list(tokenizer.decode_pieces(meta, ([i] for i in ids)))
    assert "".join(pieces) == tokenizer.decode(meta, ids) and not any("\ufffd" in p for p in pieces)
    assert " 🤖" in pieces and len(pieces) < len(ids)
    cut = list(tokenizer.decode_pieces(meta, [ids[:3], ids[3:4]]))  # ends within it: as decode says it
    assert "".join(cut) == tokenizer.decode(meta, ids[:4]) and cut[-1].endswith("\ufffd")


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_a_temperature_draws_in_proportion_to_the_softmax_of_the_logits_over_it(temperature):
    logits_V = jnp.array([0.0, 1.0, 2.0, -1.0])
    drawn_N = np.asarray(sample_token(jnp.tile(logits_V, (40000, 1)), jax.random.key(0), temperature, None))
    np.testing.assert_allclose(np.bincount(drawn_N, minlength=4) / len(drawn_N),
                               jax.nn.softmax(logits_V / temperature), atol=0.01)


def test_top_k_draws_from_exactly_the_k_most_likely_tokens_in_proportion():
    probs_V = np.array([0.1, 0.3, 0.05, 0.4, 0.15])
    logits_NxV = jnp.log(jnp.tile(jnp.asarray(probs_V, jnp.float32), (20000, 1)))
    drawn_N = np.asarray(sample_token(logits_NxV, jax.random.key(0), 1.0, top_k=3))
    assert set(np.unique(drawn_N)) == {1, 3, 4}
    kept = probs_V[[1, 3, 4]] / probs_V[[1, 3, 4]].sum()
    np.testing.assert_allclose(np.bincount(drawn_N, minlength=5)[[1, 3, 4]] / len(drawn_N), kept, atol=0.015)


def test_a_top_k_of_the_whole_vocabulary_draws_as_no_top_k():
    logits_NxV = jax.random.normal(jax.random.key(1), (50, 5))
    drawn = lambda top_k, vocab=None: np.asarray(sample_token(logits_NxV, jax.random.key(2), 1.0, top_k, vocab))
    assert all(np.array_equal(drawn(k), drawn(None)) for k in (5, 6, 1000))
    assert np.array_equal(drawn(4, vocab=4), drawn(None, vocab=4))  # the tokenizer's vocabulary, not the table's
    assert not np.array_equal(drawn(4), drawn(None))  # fewer than all: another draw


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    logits_NxV = jnp.tile(jnp.array([0.0, 1.0, 1.0, 1.0, 0.5]), (2000, 1))
    for k in (1, 2):
        drawn_N = np.asarray(sample_token(logits_NxV, jax.random.key(k), 1.0, top_k=k))
        assert len(np.unique(drawn_N)) == k and set(np.unique(drawn_N)) <= {1, 2, 3}


@pytest.mark.parametrize("temperature", [1e-39, 1e-37, 1e-30])
def test_a_tiny_temperature_is_greedy(temperature):
    # Divided as they are, these logits overflow to three tied infs (1e-39 is flushed to 0 in float32).
    logits_2xV = jnp.array([[100.0, 300.0, 200.0, -50.0], [30.0, 10.0, 20.0, 29.0]])
    for seed in range(5):
        np.testing.assert_array_equal(sample_token(logits_2xV, jax.random.key(seed), temperature, None), [1, 0])


@pytest.mark.parametrize("temperature", [1e38, 3e38, 1e39, 1e308])
def test_a_huge_temperature_draws_the_top_k_evenly_without_a_warning(temperature):
    logits_NxV = jnp.tile(jnp.array([0.0, 5.0, 4.0, -3.0, 1.0]), (4000, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # past float32's largest, the cast warned of its overflow
        drawn_N = np.asarray(sample_token(logits_NxV, jax.random.key(0), temperature, top_k=2))
    np.testing.assert_allclose(np.bincount(drawn_N, minlength=5) / len(drawn_N), [0, 0.5, 0.5, 0, 0], atol=0.03)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=2.0, top_k=V), dict(temperature=0.0),
                                      dict(temperature=2.0, top_k=3)])  # a top_k below vocab: its cut runs too
def test_samples_only_the_tokenizers_ids_of_a_padded_table(sampling):
    # openwebtext's table has 50304 rows for GPT-2's 50257 ids: the rest decode to nothing.
    model, vocab = tiny_model(seed=2), 7
    prompt_BxP = jnp.array([[1, 2, 3]] * 4, jnp.int32)
    sample = lambda **kw: np.asarray(generate(model, prompt_BxP, 4 * W, jax.random.key(0), **sampling, **kw))
    if sampling["temperature"] > 0:  # the test's premise: unrestricted, padded ids come up
        assert sample().max() >= vocab
    assert sample(vocab=vocab).max() < vocab


def test_the_prompt_pass_makes_the_logits_of_its_last_position_only():
    # A large vocabulary and a long prompt: all P positions' float32 logits would be 128 MiB here.
    B, P, vocab = 4, 512, 16384
    model = GPT(ModelConfig(vocab_size=vocab, block_size=P, n_layer=1, n_head=2, n_embd=32), key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    sample = jax.jit(lambda params, prompt, key: generate(eqx.combine(params, static), prompt, 2, key))
    compiled = sample.lower(params, jnp.zeros((B, P), jnp.int32), jax.random.key(0)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < B * P * vocab * 4 / 4


def test_sampling_reads_the_parameters_only(shakespeare_data_dir, tmp_path):
    """A checkpoint whose optimiser state this version could not restore still samples: only the model is read."""
    config = apply_overrides(load_config("shakespeare_char_cpu"), [
        "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", f"--data_dir={shakespeare_data_dir}"])
    state = fresh_state(config, make_optimizer(config))
    params = eqx.filter(state.model, eqx.is_array)
    state = eqx.tree_at(lambda s: (s.opt_state, s.step), state, (optax.sgd(0.1, momentum=0.9).init(params),
                                                                 jnp.int32(7)))  # saved as step 7's
    rundir = str(tmp_path / "run")
    write_config(config, rundir, data.meta_bytes(config.data_dir))
    manager = checkpoint.make_manager(rundir, config)
    checkpoint.save(manager, 7, state, config)
    checkpoint.wait(manager)
    manager.close()
    loaded_config, model = load_model(rundir)
    assert loaded_config == config
    for a, b in zip(jax.tree.leaves(eqx.filter(model, eqx.is_array)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("step", [None, 7])
def test_a_checkpoint_that_training_removes_as_it_is_read_gives_way_to_the_newer_one(shakespeare_data_dir, tmp_path,
                                                                                     monkeypatch, step):
    # sample.py beside a run in training: its newest checkpoint was removed (a newer one committed, keep_checkpoints)
    # while orbax read it, and a traceback or "does not restore ... the run's only one" came out.
    config = apply_overrides(load_config("shakespeare_char_cpu"), [
        "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", f"--data_dir={shakespeare_data_dir}"])
    state = fresh_state(config, make_optimizer(config))
    rundir, later = tmp_path / "run", tmp_path / "later"  # later: the trainer's save of step 9, put in place below
    for where, saved in [(rundir, 7), (later, 9)]:
        write_config(config, str(where), data.meta_bytes(config.data_dir))
        manager = checkpoint.make_manager(str(where), config)
        checkpoint.save(manager, saved, eqx.tree_at(lambda s: s.step, state, jnp.int32(saved)), config)
        checkpoint.wait(manager)
        manager.close()
    restore = sample.restore_on_one_device

    def as_training_saves_and_removes(rundir_, config_, chosen, like):
        if chosen == 7:  # the trainer's save of step 9 commits, and step 7 goes
            shutil.copytree(later / "checkpoints" / "9", rundir / "checkpoints" / "9")
            shutil.rmtree(rundir / "checkpoints" / "7")
        return restore(rundir_, config_, chosen, like)

    monkeypatch.setattr(sample, "restore_on_one_device", as_training_saves_and_removes)
    if step is not None:  # asked for: it is gone
        with pytest.raises(MidgptError, match=f"checkpoint 7 of {rundir} was removed as it was read .*the newest 3.*"
                                              "pass a newer --step, or none"):
            load_model(str(rundir), step)
        return
    _, model = load_model(str(rundir))
    leaves = lambda model: jax.tree.leaves(eqx.filter(model, eqx.is_array))
    for a, b in zip(leaves(model), leaves(state.model), strict=True):
        np.testing.assert_array_equal(a, b)


def sample_from_prompt_file(tmp_path, data: bytes) -> subprocess.CompletedProcess:
    """sample.py with --start=FILE: of a file holding data; the file is read before the run, so none is needed."""
    (tmp_path / "prompt.txt").write_bytes(data)
    return subprocess.run([sys.executable, "sample.py", f"--rundir={tmp_path / 'no_run'}",
                           f"--start=FILE:{tmp_path / 'prompt.txt'}"], cwd=REPO_ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("data, advice", [
    ("ROMEO:\n".encode("utf-16"), "UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; convert it, "
     "e.g. iconv -f utf-16 -t utf-8"),
    (codecs.BOM_UTF16_BE + "ROMEO:\n".encode("utf-16-be"), "UTF-16 text (it starts with a UTF-16 byte-order mark), "
     "not UTF-8; convert it, e.g. iconv -f utf-16 -t utf-8"),
    ("ROMEO:\n".encode("utf-32"), "UTF-32 text (it starts with a UTF-32 byte-order mark), not UTF-8; convert it, "
     "e.g. iconv -f utf-32 -t utf-8"),
    ("Café\n".encode("latin-1"), "not UTF-8 text (invalid continuation byte at byte 3); convert it, "
     "e.g. iconv -f latin1 -t utf-8"),
], ids=["utf-16", "utf-16-be", "utf-32", "latin-1"])
def test_a_prompt_file_not_in_utf8_is_one_line_naming_it_and_how_to_convert_it(tmp_path, data, advice):
    # It was the decoder's own words, without the file's name or what to do.
    result = sample_from_prompt_file(tmp_path, data)
    assert result.returncode == 1 and result.stderr == (
        f"error: cannot read the prompt file {tmp_path / 'prompt.txt'}: {advice}\n"), result.stderr


@pytest.mark.parametrize("text, encoding", [("ROMEO:\n", "utf-16le"), ("ROMEO:\n", "utf-16be"),
                                            ("Café\n", "utf-16le")])
def test_a_prompt_file_in_utf16_without_a_byte_order_mark_is_one_line_naming_it_and_how_to_convert_it(tmp_path, text,
                                                                                                      encoding):
    # Its ASCII is valid UTF-8, a NUL beside each letter: a character run called them unknown characters to leave
    # out, and a GPT-2 run took them as the prompt. Not all ASCII, it was told to convert from latin1: NULs again.
    result = sample_from_prompt_file(tmp_path, text.encode(encoding))
    assert result.returncode == 1 and result.stderr == (
        f"error: cannot read the prompt file {tmp_path / 'prompt.txt'}: holds NUL characters, as UTF-16 text without a "
        f"byte-order mark does when read as UTF-8; convert it to UTF-8, e.g. iconv -f {encoding} -t utf-8\n"), \
        result.stderr


@pytest.mark.parametrize("unroll", [1, 4])
def test_a_decoded_token_writes_its_keys_and_values_into_the_cache_in_place(unroll):
    # Not a new copy of the cache per token (a scan's stacked output, as it was): it held the cache twice or more,
    # and moved all of it at each token.
    cfg = ModelConfig(vocab_size=11, block_size=64, n_layer=4, n_head=2, n_embd=32, scan_unroll=unroll)
    model = GPT(cfg, key=jax.random.key(0))
    cache = model.empty_cache(16)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))

    def one_token(cache, token_B):
        return model.hidden(token_B[:, None], positions_T=jnp.array([5]), cache=cache)[2]

    compiled = jax.jit(one_token, donate_argnums=0).lower(cache, jnp.zeros(16, jnp.int32)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes / 2, compiled.memory_analysis()


def test_a_chunk_of_decoding_takes_over_the_memory_of_the_cache_it_is_given():
    # Not donated, XLA copied the cache into the chunk's loop: its memory twice (10,000 samples of
    # shakespeare_char_cpu peaked at 3.6 GB, 2.3-2.4 GB donated, for a 1.3 GB cache).
    model = tiny_model()
    cache = model.empty_cache(16)
    args = (model, cache, jnp.zeros(16, jnp.int32), jnp.int32(1), jax.random.key(0), 4)
    sampling = dict(temperature=1.0, top_k=None, vocab=None)
    analysis = sample._decode.lower(*args, **sampling).compile().memory_analysis()
    assert analysis.alias_size_in_bytes >= sum(x.nbytes for x in jax.tree.leaves(cache)), analysis
    sample._decode(*args, **sampling)
    assert all(x.is_deleted() for x in jax.tree.leaves(cache))  # so generate_chunks keeps none of them


def test_samples_that_need_more_than_the_memory_are_refused_with_how_many_fit():
    # On a CPU, the kernel killed sample.py without a word once it passed the host's memory.
    model, sampling = tiny_model(), dict(temperature=1.0, top_k=None, vocab=None)
    need = lambda n: sample.sampling_bytes(model, n, prompt_tokens=3, max_new_tokens=20, **sampling)
    available = need(1000) // 2
    with pytest.raises(MidgptError, match=r"^1000 samples of 23 tokens need [\d.]+ MiB of the [\d.]+ MiB of a test's "
                       r"memory; lower --num_samples to \d+ or fewer$") as refused:
        check_samples_fit(model, 1000, 3, 20, available, "a test's memory", **sampling)
    fit = int(str(refused.value).split(" to ")[1].split()[0])
    assert need(fit) <= 0.9 * available and need(2 * fit) > available  # fits, with room to spare, and not far fewer
    check_samples_fit(model, fit, 3, 20, available, "a test's memory", **sampling)
    check_samples_fit(model, 1000, 3, 20, need(1000), "a test's memory", **sampling)  # exactly enough
    one = need(1)
    # One sample asked for is not told what "one alone" needs: that is the first number.
    for n, said in [(1, r"1 sample of 23 tokens needs [\d.]+ MiB of the [\d.]+ MiB of a test's memory"),
                    (5, r"5 samples of 23 tokens need .*; one alone needs [\d.]+ MiB")]:
        with pytest.raises(MidgptError, match=rf"^{said}: sample on a machine with more memory$"):
            check_samples_fit(model, n, 3, 20, one - 1, "a test's memory", **sampling)


def test_a_prompt_file_that_cannot_be_read_is_one_line_naming_it_and_why(tmp_path):
    # Not a usage error: it ended "(see python sample.py --help)", which does not help.
    for path, why in [(tmp_path / "missing.txt", "No such file or directory"), (tmp_path, "Is a directory")]:
        result = subprocess.run([sys.executable, "sample.py", f"--rundir={tmp_path / 'no_run'}",
                                 f"--start=FILE:{path}"], cwd=REPO_ROOT, capture_output=True, text=True)
        assert result.returncode == 1 and result.stderr == f"error: cannot read the prompt file {path}: {why}\n", \
            result.stderr


def test_a_prompt_file_past_64_mib_is_refused_without_reading_it_whole(tmp_path):
    # --start=FILE:/dev/zero read until the memory was full.
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: no disk taken
    for path in [huge, "/dev/zero"]:
        result = subprocess.run(["bash", "-c", 'ulimit -v 4000000 && exec "$@"', "bash", sys.executable, "sample.py",
                                 f"--rundir={tmp_path / 'no_run'}", f"--start=FILE:{path}"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and result.stderr == (
            f"error: cannot read the prompt file {path}: holds more than 64 MiB; the model sees only a prompt's end "
            f"(its last block_size tokens): give that, e.g. tail -c 100000 {path} > end.txt\n"), result.stderr


def test_a_long_prompt_whose_attention_outgrows_the_caches_is_refused_too():
    # The check skipped its compiles below 16 caches a sample: a 512-token prompt's scores, 8 MiB a sample in one
    # layer, are 32 of its caches, and 4 samples that needed twice the memory went on to the kernel's kill.
    model = GPT(ModelConfig(vocab_size=V, block_size=512, n_layer=1, n_head=8, n_embd=64), key=jax.random.key(0))
    sampling = dict(temperature=1.0, top_k=None, vocab=None)
    need = sample.sampling_bytes(model, 4, prompt_tokens=512, max_new_tokens=2, **sampling)
    with pytest.raises(MidgptError, match=r"^4 samples of 514 tokens need .* of a test's memory; "):
        check_samples_fit(model, 4, 512, 2, need // 2, "a test's memory", **sampling)


def test_samples_of_no_new_tokens_are_not_refused_for_the_programs_they_do_not_run():
    # The prompt pass was counted, though generate returns the prompt without it: one sample was refused.
    model, sampling = tiny_model(), dict(temperature=1.0, top_k=None, vocab=None)
    check_samples_fit(model, 1, 3, 0, 1, "a test's memory", **sampling)
    assert list(generate_chunks(model, jnp.ones((1, 3), jnp.int32), 0, jax.random.key(0))) == []


def test_samples_of_which_one_fits_are_told_to_lower_num_samples_to_one():
    # One sample within the memory but past its nine tenths was "one alone needs X: sample on a machine with more
    # memory", though --num_samples=1 runs.
    model, sampling = tiny_model(), dict(temperature=1.0, top_k=None, vocab=None)
    one = sample.sampling_bytes(model, 1, prompt_tokens=3, max_new_tokens=20, **sampling)
    with pytest.raises(MidgptError, match=r"^5 samples of 23 tokens need .* memory; lower --num_samples to 1$"):
        check_samples_fit(model, 5, 3, 20, one, "a test's memory", **sampling)
    check_samples_fit(model, 1, 3, 20, one, "a test's memory", **sampling)


def test_long_samples_whose_tokens_outgrow_the_memory_are_refused():
    # XLA's count has a chunk's tokens only: 1000 samples of 100,000 tokens hold 0.4 GB of them, twice over.
    model, sampling = tiny_model(), dict(temperature=1.0, top_k=None, vocab=None)
    with pytest.raises(MidgptError, match=r"^1000 samples of 100003 tokens need 7\d\d.\d\d MiB of the 512.00 MiB of a "
                       r"test's memory; lower --num_samples to \d+ or fewer$"):
        check_samples_fit(model, 1000, 3, 100_000, 1 << 29, "a test's memory", **sampling)


def test_the_memory_counted_for_samples_is_of_the_prompt_pass_and_the_decoding_that_sampling_runs():
    # A long prompt's pass and a chunk of decoding each hold the cache with memory of their own: the check counts
    # the larger, of the programs that generate runs (chunks of 64 positions, fewer for a shorter sample), else
    # samples it lets through can pass the host's memory, where the kernel kills sample.py without a word.
    model, sampling = tiny_model(), dict(temperature=1.0, top_k=None, vocab=None)
    # The programs' count alone: the tokens' is tested apart.
    need = lambda prompt, new: sample.sampling_bytes(model, 1000, prompt_tokens=prompt, max_new_tokens=new,
                                                     **sampling) - sample.token_bytes(1000, prompt + new)
    assert need(W, 1) > need(1, 1)  # a prompt of W tokens: its activations in the prompt pass
    assert need(1, 1000) == need(1, 65) > need(1, 33) > need(1, 1)  # chunks of 64, 32 and no decoding
    # The chunk takes over the cache it is given (donated): counted once, not as an argument and again as an output.
    cache = jax.eval_shape(lambda: model.empty_cache(1000))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert need(1, 65) - need(1, 1) < cache_bytes / 2


def test_the_advice_counts_the_models_own_memory_once_not_in_each_sample():
    # The memory beyond one sample's grows with each more; the model's own does not. Spread over all 20 samples
    # of a model whose parameters take most of it, the advice said 6 where 13 fit: a large model on a small
    # host was told to draw far fewer than it could.
    model, sampling = tiny_model(), dict(temperature=1.0, top_k=None, vocab=None)
    need = lambda n: sample.sampling_bytes(model, n, prompt_tokens=3, max_new_tokens=20, **sampling)
    available = int(0.95 * need(20))
    with pytest.raises(MidgptError, match=r"; lower --num_samples to \d+ or fewer$") as refused:
        check_samples_fit(model, 20, 3, 20, available, "a test's memory", **sampling)
    fit = int(str(refused.value).split(" to ")[1].split()[0])
    assert need(fit) <= 0.9 * available and need(2 * fit) > available  # fits, with room to spare, and not far fewer


def test_a_long_bpe_prompt_is_cut_at_the_start_of_a_character():
    # GPT-2 BPE spells an emoji in 3 tokens: the last 32 of twelve parrots' 36 began mid-character, "\ufffd\ufffd".
    meta = {"tokenizer": "gpt2", "vocab_size": 50257}
    ids = tokenizer.encode(meta, "\U0001f99c" * 12)
    kept = tokenizer.last_tokens(meta, ids, 32)
    assert kept == ids[-len(kept):] and 32 - 3 < len(kept) <= 32
    assert tokenizer.decode(meta, kept) == "\U0001f99c" * (len(kept) // 3)
