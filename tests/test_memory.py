"""The memory estimate: exact for the state on any mesh, close for activations, and a stop before an over-large run."""

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midgpt import memory
from midgpt.config import Config, ModelConfig, apply_overrides, load_config, steps_a_call
from midgpt.errors import MidgptError
from midgpt.optimizer import make_optimizer
from midgpt.sharding import DATA_AXES, make_mesh
from midgpt.step import fresh_state, init_state, loss_chunks, make_train_step, pieces_per_micro_batch, state_layout
from conftest import REPO_ROOT
from test_launch import assert_one_line_error, run
from test_sharding import on_devices


def estimate(config, pieces: int = 1):
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    shardings, _ = state_layout(config, optimizer, mesh)
    return memory.estimate(config, mesh, eqx.filter_eval_shape(fresh_state, config, optimizer), shardings, pieces)


@pytest.mark.parametrize("devices", [1, 8])
def test_state_estimate_is_the_bytes_of_the_sharded_arrays(devices):
    out = on_devices(devices, """
        from midgpt import memory
        from test_memory import estimate
        config, optimizer = CONFIG, make_optimizer(CONFIG)
        state = init_state(config, optimizer, make_mesh(config))
        def on_first_device(tree):
            arrays = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
            return sum(s.data.nbytes for x in arrays for s in x.addressable_shards if s.device == jax.devices()[0])
        parts = estimate(config)
        print(json.dumps({"estimated": [parts["parameters"], parts["optimizer"]],
                          "actual": [on_first_device(state.model), on_first_device(state.opt_state)],
                          "whole": sum(x.nbytes for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_array)))}))
    """)
    assert out["estimated"] == out["actual"]
    if devices == 8:  # every matrix is sharded, so a device holds little more than an eighth
        assert out["actual"][0] < out["whole"] / 6


# Unrolled, remat saves nothing: the layers of one iteration keep their internals; two layers of
# four a scan iteration, or the whole stack of two.
@pytest.mark.parametrize("remat, unroll, n_layer", [("full", 1, 2), ("dots", 1, 2), ("none", 1, 2), ("full", 2, 2),
                                                    ("none", 2, 2), ("none", 2, 4)])
# On this lone CPU device: 1 piece of 1024 tokens, or 2 of 2048; with dropout, and without, where the
# layers' own float32 copies (norms, GELU) outweigh the rest: an estimate that missed them was 0.45 of XLA's.
@pytest.mark.parametrize("batch_size, dropout", [(8, 0.1), (32, 0.1), (32, 0.0)])
def test_activation_estimate_is_close_to_what_xla_allocates(remat, unroll, n_layer, batch_size, dropout):
    config = Config(data_dir="unused", batch_size=batch_size, compute_dtype="bfloat16", model=ModelConfig(
        vocab_size=256, block_size=128, n_layer=n_layer, n_head=4, n_embd=128, dropout=dropout, remat=remat,
        scan_unroll=unroll))
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    state = init_state(config, optimizer, mesh)
    batch_1xBxT = jax.ShapeDtypeStruct((1, config.batch_size, config.model.block_size), jnp.int32)
    compiled = make_train_step(config, optimizer, mesh).lower(state, batch_1xBxT, batch_1xBxT).compile()
    xla_bytes = compiled.memory_analysis().temp_size_in_bytes
    pieces = pieces_per_micro_batch(config, mesh)
    assert pieces == {8: 1, 32: 2}[batch_size]
    # XLA fuses and reuses buffers as it likes, and differently on each backend: close, not exact,
    # and over, not under (1.08-1.44 here): least_needed takes it as at most ACTIVATIONS_HIGH_BY over.
    assert 1.0 < (ratio := memory.activation_bytes(config, mesh, pieces)
                           / xla_bytes) < memory.ACTIVATIONS_HIGH_BY, ratio


def test_the_loss_in_slices_bounds_the_logits_memory_and_the_estimate_follows():
    # A large vocabulary, whose float32 logits (128 MiB here) outweigh everything else.
    config = Config(data_dir="unused", batch_size=16, compute_dtype="bfloat16", model=ModelConfig(
        vocab_size=16384, block_size=128, n_layer=2, n_head=4, n_embd=128))
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    state, batch_1xBxT = init_state(config, optimizer, mesh), jax.ShapeDtypeStruct((1, 16, 128), jnp.int32)
    xla_bytes = {chunks: make_train_step(config, optimizer, mesh, pieces=1, chunks=chunks).lower(
        state, batch_1xBxT, batch_1xBxT).compile().memory_analysis().temp_size_in_bytes for chunks in (1, 8)}
    logits_bytes = 16 * 128 * 16384 * 4
    # Measured: 289 MB -> 68 MB. Slices save more than a whole float32 copy of the logits.
    assert xla_bytes[1] - xla_bytes[8] > logits_bytes
    for chunks, xla in xla_bytes.items():
        assert 0.85 < memory.activation_bytes(config, mesh, 1, chunks) / xla < memory.ACTIVATIONS_HIGH_BY


@pytest.mark.parametrize("batch_size, pieces, chunks", [(128, 1, 8), (16, 1, 1), (128, 16, 1), (2**15, 1, 1024)])
def test_the_loss_makes_at_most_4_gib_of_float32_logits_at_once(batch_size, pieces, chunks):
    # openwebtext's own 128 x 1024-token micro-batch on one GPU: 8 slices of 4 GiB or less;
    # one slice in 16 rows; and with more rows than the budget, single positions.
    config = apply_overrides(load_config("openwebtext"), [f"--batch_size={batch_size}"])
    lone_device = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), DATA_AXES)
    assert loss_chunks(config, lone_device, pieces) == chunks


def test_fsdp_estimate_counts_the_gathered_parameters():
    # Parameters outweigh activations here, so what each device gathers decides its memory:
    # without the gathered part the estimate was half of XLA's (0.3 of it with remat none). A scan
    # iteration of several layers gathers them all: counted as one layer, 0.81 of XLA's with two
    # (remat full), 1.37 unrolled whole (remat none).
    out = on_devices(8, """
        from test_memory import estimate
        ratios = {}
        for remat, unroll in [("full", 1), ("none", 1), ("full", 2), ("full", 4), ("none", 4)]:
            config = dataclasses.replace(CONFIG, compute_dtype="bfloat16", g_accum_iters=1, fsdp_min_size=2**16,
                                         model=ModelConfig(2048, 32, 4, 8, 512, remat=remat, scan_unroll=unroll))
            optimizer, mesh = make_optimizer(config), make_mesh(config)
            x = np.zeros((1, 8, 32), np.int32)
            xla = make_train_step(config, optimizer, mesh, pieces=1).lower(
                init_state(config, optimizer, mesh), x, x).compile().memory_analysis()
            ratios[f"{remat}, {unroll} a scan iteration"] = estimate(config)["total"] / (
                xla.temp_size_in_bytes + xla.argument_size_in_bytes)
        print(json.dumps(ratios))
    """)
    assert all(0.8 < ratio < 1.25 for ratio in out.values()), out


@pytest.mark.parametrize("remat", ["full", "none"])
def test_flash_attention_activations_grow_with_tokens_not_with_each_rows_length(remat):
    def activations(attention, batch_size, block_size):
        config = apply_overrides(load_config("openwebtext"), [
            f"--batch_size={batch_size}", f"--model.block_size={block_size}",
            f"--model.attention={attention}", f"--model.remat={remat}"])
        return memory.activation_bytes(config, make_mesh(config))

    # The same 16,384 tokens in rows twice as long: only the einsum path's T x T scores grow, twice as large.
    assert activations("cudnn", 16, 1024) == activations("cudnn", 32, 512)
    scores = {T: activations("einsum", 16384 // T, T) - activations("cudnn", 16384 // T, T) for T in (512, 1024)}
    assert scores[512] > 0 and scores[1024] == pytest.approx(2 * scores[512], rel=0.01)


def test_an_over_large_run_suggests_the_largest_micro_batch_that_fits_and_keeps_the_global_batch():
    config = load_config("openwebtext_xl")
    parts = estimate(config)
    available = 40 * 2**30  # 1024 rows need 1.3 TiB
    with pytest.raises(MidgptError) as error:
        memory.check_fits(config, make_mesh(config), available, estimate)
    suggestion = re.search(r"--batch_size=\d+ --g_accum_iters=\d+", str(error.value)).group(0)
    smaller = apply_overrides(config, suggestion.split())
    assert smaller.batch_size * smaller.g_accum_iters == config.batch_size * config.g_accum_iters
    assert estimate(smaller)["total"] <= available < parts["total"]
    # The largest that fits: twice the rows (still a divisor of 1024) does not.
    twice = [f"--batch_size={2 * smaller.batch_size}", f"--g_accum_iters={smaller.g_accum_iters // 2}"]
    assert estimate(apply_overrides(config, twice))["total"] > available
    memory.check_fits(config, make_mesh(config), parts["total"], estimate)  # just fits: no error
    with pytest.raises(MidgptError):  # a byte less does not
        memory.check_fits(config, make_mesh(config), parts["total"] - 1, estimate)
    # A resume keeps its batch (rundir.FIXED_ON_RESUME): another batch is another run.
    with pytest.raises(MidgptError) as error:
        memory.check_fits(config, make_mesh(config), available, estimate, resuming=True)
    assert str(error.value).endswith(f"; or, in a new --rundir, a smaller batch with more accumulation ({suggestion})")


def test_the_compute_copy_is_counted_only_where_the_parameters_are_cast():
    config = load_config("shakespeare_char")
    parts = {dtype: estimate(dataclasses.replace(config, compute_dtype=dtype)) for dtype in ("bfloat16", "float32")}
    assert parts["bfloat16"]["compute copy"] == parts["bfloat16"]["parameters"] // 2  # float32 parameters
    assert parts["float32"]["compute copy"] == 0  # astype to the parameters' own dtype copies nothing


def test_gradients_are_counted_twice_where_micro_batches_or_their_pieces_are_summed():
    config = load_config("shakespeare_char")
    alone, pieces = estimate(config), estimate(config, pieces=4)
    accumulated = estimate(dataclasses.replace(config, g_accum_iters=4))
    assert alone["gradients"] == alone["parameters"]
    assert pieces["gradients"] == accumulated["gradients"] == 2 * alone["parameters"]  # and their running sum


def test_a_gpu_tries_a_run_the_estimate_may_overstate_and_a_host_does_not(monkeypatch):
    # A GPU's allocator refuses past its memory, in one line (runs_out below); a host swaps or kills.
    config = load_config("openwebtext")
    parts = estimate(config)
    least = memory.least_needed(parts)  # the activations / ACTIVATIONS_HIGH_BY: below XLA's (-k close)
    assert parts["total"] - parts["activations"] < least < parts["total"]  # the state's bytes are exact
    assert least == parts["total"] - parts["activations"] + int(parts["activations"] / 1.5)  # the 1.5x it says
    assert memory.device_memory()[2] is False  # this CPU's memory (or its cgroup's): a run past it is refused

    def plan(available, hard_limit):
        """What memory.plan says after its estimate, with device_memory's word as given."""
        monkeypatch.setattr(memory, "device_memory", lambda: (available, "a device's memory", hard_limit))
        said = []
        try:
            memory.plan(config, make_mesh(config), estimate, said.append, resuming=False)
        except MidgptError as e:
            said.append(f"stopped: {e}")
        assert said[0].startswith("memory per device") and f"of {memory.readable(available)}" in said[0]
        return said[1:]

    between = (least + parts["total"]) // 2
    assert plan(between, hard_limit=True) == [
        f"the estimate, {memory.readable(parts['total'])}, exceeds a device's {memory.readable(between)}, but its "
        f"activations may be overstated by up to 1.5x (at least {memory.readable(least)} needed): trying; if XLA "
        "runs out of memory, the run stops with what to change"]
    assert plan(between, hard_limit=False)[0].startswith("stopped: this run needs about")  # a host's memory
    assert plan(least - 1, hard_limit=True)[0].startswith("stopped: this run needs about")  # past the margin
    assert plan(parts["total"], hard_limit=True) == []


def test_running_out_of_memory_is_told_to_take_a_smaller_batch_only_where_the_run_may(monkeypatch):
    config = apply_overrides(load_config("shakespeare_char_cpu"), ["--model.remat=none"])
    error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 5 bytes.")
    assert memory.ran_out(error) and memory.ran_out(jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 155.01GiB."))
    # A CPU's, as a computation is dispatched (sample.py's 300,000 samples in 8 GB): a traceback, it was.
    dispatched = jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation: Error dispatching computation: "
                                            "Out of memory allocating 4915200000 bytes.")
    assert memory.ran_out(dispatched) and memory.OUT_OF_MEMORY.search(str(dispatched))[1] == (
        "Out of memory allocating 4915200000 bytes.")
    assert not any(memory.ran_out(jax.errors.JaxRuntimeError(text)) for text in (
        "INTERNAL: no", "INTERNAL: Error dispatching computation: no",
        "RESOURCE_EXHAUSTED: Received message larger than max (5000 vs. 4194304)"))
    said = {fixed: memory.out_of_memory(error, config, make_mesh(config), estimate, fixed, "run X with one of them")
            for fixed in (False, True)}
    smaller, remat = "a smaller batch with more accumulation (--batch_size=6 --g_accum_iters=2)", (
        "full remat, one layer at a time (--model.remat=full --model.scan_unroll=1)")
    assert said[False].startswith("XLA ran out of device memory (Out of memory allocating 5 bytes.) where about ")
    assert said[False].endswith(f"; use {smaller}, or {remat}, or more devices, and run X with one of them")
    # Once a checkpoint holds the run's batch, the same run can only change how it runs.
    assert said[True].endswith(f"; use {remat}, or more devices, and run X with one of them; or, in a new "
                               f"--rundir, {smaller}")
    # A run tried on a GPU past its estimate (check_fits's warning): a smaller batch must fit the device too.
    available = estimate(config)["total"] // 3
    monkeypatch.setattr(memory, "device_memory", lambda: (available, "a device's memory", True))
    suggested = re.search(r"--batch_size=\d+ --g_accum_iters=\d+", memory.out_of_memory(
        error, config, make_mesh(config), estimate, False, "run X")).group(0)
    assert estimate(apply_overrides(config, suggested.split()))["total"] <= available


def test_a_run_whose_state_alone_outgrows_the_device_is_told_to_shrink_the_model_not_its_activations():
    # openwebtext_xl's 20 GiB of parameters, gradients and optimiser state alone outgrow 16 GiB: remat
    # (once the first advice, here where it is not yet full) or a smaller batch would save a few percent.
    config = apply_overrides(load_config("openwebtext_xl"), ["--model.remat=dots"])
    with pytest.raises(MidgptError) as error:
        memory.check_fits(config, make_mesh(config), 16 * 2**30, estimate)
    assert str(error.value).endswith(
        "; use more devices, or a smaller model (fewer --model.n_layer, a smaller --model.n_embd)"), error.value


def test_the_batches_in_flight_are_the_steps_a_call_runs_not_steps_per_call():
    # steps_per_call=4 runs 2 a call here (4 does not divide log_interval=10): the estimate counts the 2.
    config = load_config("shakespeare_char_cpu")
    runs_2, asks_4 = (apply_overrides(config, [f"--steps_per_call={n}"]) for n in (2, 4))
    assert steps_a_call(asks_4) == 2
    assert estimate(asks_4)["batches"] == estimate(runs_2)["batches"]
    assert estimate(asks_4)["batches"] > estimate(apply_overrides(config, ["--steps_per_call=1"]))["batches"]
    # A call of more steps than the run has never comes: 10**6 steps' batches were estimated at 29 GiB, and refused.
    short = ["--max_steps=20", "--log_interval=1000000", "--eval_interval=1000000", "--checkpoint_interval=1000000"]
    assert (estimate(apply_overrides(config, [*short, "--steps_per_call=1000000"]))["batches"]
            == estimate(apply_overrides(config, [*short, "--steps_per_call=1"]))["batches"])


def test_a_batch_whose_tokens_alone_outgrow_the_device_is_told_to_have_fewer():
    # A batch of 10M rows: the host ran out of memory cutting it, in a traceback, after the plan said 0.05 GiB.
    config = apply_overrides(load_config("shakespeare_char_cpu"), ["--batch_size=10000000", "--eval_iters=1"])
    parts = estimate(config)
    # A call's steps twice (the next call's are prefetched) and the evaluation's, one more token a row.
    tokens = (2 * steps_a_call(config) + 1) * 10_000_000 * 65
    # x and y in int32; on a CPU also the int64 offsets and int32 windows that they are cut from
    assert parts["batches"] == tokens * (8 + 12)
    with pytest.raises(MidgptError) as error:
        memory.check_fits(config, make_mesh(config), 16 * 2**30, estimate)
    # Its ten steps a call stack ten steps' tokens: fewer a call is a fix too.
    assert ("use fewer tokens at once (a smaller --batch_size, --g_accum_iters, --steps_per_call or --eval_iters)"
            in str(error.value))


def test_rows_too_long_for_the_device_are_estimated_without_memory_and_told_to_shorten():
    # A block_size of 100,000: the estimate made a 9 GiB attention mask on the host, and the kernel killed the run.
    import tracemalloc

    long_rows = lambda T: apply_overrides(load_config("shakespeare_char_cpu"), [f"--model.block_size={T}"])
    tracemalloc.start()  # numpy's allocations are traced; a 20000 x 20000 mask would be 400 MB
    try:
        assert estimate(long_rows(20000))["activations"] > 100 * 2**30
        assert tracemalloc.get_traced_memory()[1] < 50 * 2**20
    finally:
        tracemalloc.stop()
    # Neither remat, which leaves each row's 100000 x 100000 scores, nor devices, which split rows, not a row.
    config = long_rows(100000)
    for resuming, advice in ((False, "use shorter rows (a smaller --model.block_size)"),
                             (True, "in a new --rundir, use shorter rows (a smaller --model.block_size)")):
        with pytest.raises(MidgptError) as error:
            memory.check_fits(config, make_mesh(config), 16 * 2**30, estimate, resuming=resuming)
        assert str(error.value).endswith(f"; {advice}"), error.value


def test_fixed_parts_that_outgrow_the_device_are_not_told_to_shorten_rows():
    # The state fits, the state and its compute copy do not: a row's activations are not the cause.
    GiB = 2**30

    def estimate_for(c):
        parts = {"parameters": 10 * GiB, "gradients": 10 * GiB, "optimizer": 20 * GiB, "compute copy": 6 * GiB,
                 "gathered": 0, "activations": c.batch_size * GiB // 10, "batches": 0}
        return {**parts, "total": sum(parts.values())}

    config = load_config("shakespeare_char_cpu")
    same, new = memory.fixes(config, make_mesh(config), 45 * GiB, estimate_for)
    assert same and not any("block_size" in fix for fix in same + new), (same, new)


@pytest.mark.parametrize("overrides, mesh_shape, advice", [
    ([], (1, 2), "more devices"),  # already all on the fsdp axis
    ([], (2, 1), "all devices on the fsdp axis (--mesh_shape=1,-1)"),
    (["--shard_model=false"], (1, 2), "sharded parameters (--shard_model=true)"),
    # Parameters are sharded over the fsdp axis alone: --shard_model=true by itself changed nothing here.
    (["--shard_model=false"], (2, 1), "all devices on the fsdp axis, with sharded parameters (--shard_model=true "
                                      "--mesh_shape=1,-1)"),
    (["--shard_model=false"], (1, 1), "more devices, with sharded parameters (--shard_model=true)"),
])
def test_an_over_large_run_is_told_what_would_shrink_it(overrides, mesh_shape, advice):
    config = apply_overrides(load_config("openwebtext_xl"), overrides)
    mesh = jax.sharding.AbstractMesh(mesh_shape, DATA_AXES)  # check_fits reads only its shape
    with pytest.raises(MidgptError) as error:
        memory.check_fits(config, mesh, 16 * 2**30, estimate)
    assert f"; use {advice}" in str(error.value) and "--model.remat" not in str(error.value)  # remat full already
    assert str(error.value).count("--shard_model=true") <= 1, error.value


@pytest.mark.parametrize("available_gib, same, new", [
    # Either fits alone: a smaller batch, or full remat (the state 4 GiB, a row's activations 1 or 1/8 GiB).
    (6, ["full remat, one layer at a time (--model.remat=full --model.scan_unroll=1)"],
     ["a smaller batch with more accumulation (--batch_size=2 --g_accum_iters=6)"]),
    # Neither alone: full remat was offered all the same, and refused again when followed.
    (4.5, [], ["full remat, one layer at a time, with a smaller batch (--model.remat=full --model.scan_unroll=1 "
               "--batch_size=4 --g_accum_iters=3)"]),
])
def test_full_remat_is_offered_where_it_fits_alone_or_with_a_smaller_batch(available_gib, same, new):
    GiB = 2**30

    def estimate_for(c):
        row = GiB // 8 if c.model.remat == "full" else GiB
        parts = {"parameters": GiB, "gradients": GiB, "optimizer": 2 * GiB, "activations": c.batch_size * row}
        return {**parts, "batches": 0, "total": sum(parts.values())}

    config = apply_overrides(load_config("shakespeare_char_cpu"), ["--model.remat=none"])  # 12 rows
    lone = jax.sharding.AbstractMesh((1, 1), DATA_AXES)
    fixes = memory.fixes(config, lone, int(available_gib * GiB), estimate_for, resuming=True)
    assert fixes == ([*same, "more devices"], new)


def test_launch_stops_an_over_large_model_before_compiling_and_writes_nothing(shakespeare_data_dir, tmp_path):
    # 1.3B parameters and a batch of 1024 sequences: far beyond this host's memory.
    result = run("launch.py", "--config=openwebtext_xl", f"--rundir={tmp_path}/run",
                 f"--data_dir={shakespeare_data_dir}")
    assert_one_line_error(result, "per device", "more devices")  # and a smaller batch, where one would fit
    assert "parameters 4.88 GiB" in result.stderr  # 1.31B float32 parameters
    assert not (tmp_path / "run").exists()


# launch.py with its address space capped 2 GiB above what the process holds once XLA has started: an
# allocation past it fails as one past a GPU's memory does, after the estimate said the run would fit.
CAPPED = """
import resource, runpy, sys
import jax, jax.numpy as jnp
jax.jit(lambda x: x @ x)(jnp.ones((256, 256))).block_until_ready()  # XLA's threads, before the cap
held = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (held + 2 * 2**30, resource.RLIM_INFINITY))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(sys.platform != "linux" or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") < 16 * 2**30,
                    reason="the cap is Linux's RLIMIT_AS, and the plan must fit 4 GiB a device in the host's memory")
def test_a_step_that_runs_out_of_device_memory_stops_in_one_line_and_keeps_the_checkpoint(shakespeare_data_dir,
                                                                                          tmp_path):
    rundir = tmp_path / "run"
    args = ["--config=shakespeare_char_cpu", f"--rundir={rundir}", f"--data_dir={shakespeare_data_dir}",
            "--batch_size=1024", "--eval_iters=1"]
    # Two devices, so no step cuts the micro-batch in pieces; few malloc arenas, whose reservations count.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "MALLOC_ARENA_MAX": "2"}
    first = run("launch.py", *args, "--max_steps=1", env=env)
    assert first.returncode == 0, first.stderr
    saved = {p: p.read_bytes() for p in sorted((rundir / "checkpoints").rglob("*")) if p.is_file()}
    # Resumed without remat, each device's step asks XLA:CPU for 3.9 GB at once: over the cap.
    result = subprocess.run([sys.executable, "-c", CAPPED, str(REPO_ROOT / "launch.py"), *args, "--max_steps=2",
                             "--model.remat=none"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    assert re.fullmatch(
        r"error: at step 2, XLA ran out of device memory \(Out of memory allocating \d+ bytes\.\) where about "
        r"[\d.]+ GiB per device was estimated; use full remat, one layer at a time \(--model.remat=full "
        r"--model.scan_unroll=1\), or more devices, and run the same command with one of them to resume from "
        r"checkpoint 1; or, in a new --rundir, a smaller batch with more accumulation \(--batch_size=512 "
        r"--g_accum_iters=2\)", errors[0]), errors[0]
    assert {p: p.read_bytes() for p in sorted((rundir / "checkpoints").rglob("*")) if p.is_file()} == saved


def test_step_memory_benchmark_prints_xla_beside_the_estimate_for_each_slicing():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "step_memory.py"), "--config=shakespeare_char_cpu",
         "--model.vocab_size=4096", "--model.n_layer=1", "--chunks=1,4", "--pieces=1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    whole, sliced = (json.loads(line) for line in result.stdout.strip().splitlines())
    assert (whole["chunks"], sliced["chunks"], whole["pieces"]) == (1, 4, 1)
    assert sliced["xla_temp_bytes"] < whole["xla_temp_bytes"]  # 12 x 64 x 4096 float32 logits, in 4 slices
    assert sliced["estimate_bytes"]["activations"] < whole["estimate_bytes"]["activations"]
    assert whole["xla_argument_bytes"] == sliced["xla_argument_bytes"] > whole["estimate_bytes"]["parameters"]


def test_step_memory_benchmark_compiles_the_program_that_runs_several_steps_a_call():
    # It compiled the one-step program where launch.py runs shakespeare_char_cpu's ten steps a call.
    def arguments(*flags: str) -> int:
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "benchmarks" / "step_memory.py"), "--config=shakespeare_char_cpu",
             "--model.n_layer=1", *flags], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["xla_argument_bytes"]

    # x and y: 9 more steps' 12 x 64 int32 tokens each.
    assert arguments() - arguments("--steps_per_call=1") == 2 * 9 * 12 * 64 * 4


def test_sizes_below_a_gib_are_shown_in_mib():
    # The small configs' whole plan read "0.00 GiB" term by term.
    sizes = (3_187_000, 2**30, 5 * 2**30 // 2)
    assert [memory.readable(n) for n in sizes] == ["3.04 MiB", "1.00 GiB", "2.50 GiB"]


def test_the_memory_limit_of_a_cgroup_above_the_process_is_its_lowest_that_is_set(tmp_path):
    # A SLURM job's --mem, a container's limit: on a larger host the run was checked against the host's memory,
    # then killed by the kernel without a word.
    calls = iter(range(100))

    def limit(proc: str | bytes, files: dict[str, str]) -> int | None:
        folder = tmp_path / str(next(calls))  # each its own: no file of another case read
        (folder / "fs").mkdir(parents=True)
        (folder / "proc").write_bytes(proc if isinstance(proc, bytes) else proc.encode())
        for path, text in files.items():
            (folder / "fs" / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / "fs" / path).write_text(text + "\n")
        return memory.cgroup_memory_limit(str(folder / "proc"), str(folder / "fs"))

    # v2: the job's step has none of its own ("max"), the job has one, and a group above it a larger one
    assert limit("0::/slurm/job_7/step_0\n", {"slurm/memory.max": str(8 << 30), "slurm/job_7/memory.max": str(2 << 30),
                                              "slurm/job_7/step_0/memory.max": "max"}) == 2 << 30
    # v1, beside other controllers; its root's "no limit" is a number near 2**63
    v1_root = {"memory/memory.limit_in_bytes": "9223372036854771712"}
    assert limit("5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n",
                 {**v1_root, "memory/docker/abc/memory.limit_in_bytes": str(3 << 30)}) == 3 << 30
    assert limit("4:memory:/docker/abc\n", v1_root) is None
    assert limit("0::/user.slice\n", {}) is None  # nothing mounted where the hierarchy says: no limit known
    assert limit("0::/\n", {"memory.max": "max"}) is None
    # Lines no kernel writes, a path above the namespace's root: read past, never outside the mount
    assert limit("\ngarbage\n0::/../../job\n", {"job/memory.max": str(1 << 30)}) == 1 << 30
    assert limit("1:x\n0::/job\n", {"job/memory.max": str(1 << 30)}) == 1 << 30  # one colon: no fields to read
    # In a container the hierarchy says "/": the mount's own limit is the container's
    assert limit("0::/\n", {"memory.max": str(1 << 30)}) == 1 << 30
    # A group's name is not always UTF-8: the groups above it are still read
    assert limit(b"0::/caf\xe9/job\n", {"memory.max": str(1 << 30)}) == 1 << 30
    # A controller named like memory is not memory, and a large limit is still one (v1's "none" is near 2**63)
    assert limit("3:name=memorylike:/x\n0::/\n", {"memory/memory.limit_in_bytes": str(1 << 20),
                                                    "memory.max": str(3 << 40)}) == 3 << 40


def test_a_cpu_device_has_the_cgroup_memory_limit_where_it_is_below_the_hosts(monkeypatch):
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(memory, "cgroup_memory_limit", lambda: 600 << 20)
    assert memory.device_memory() == (600 << 20, "the cgroup memory limit of this container or job", False)
    monkeypatch.setattr(memory, "cgroup_memory_limit", lambda: 2 * host)
    assert memory.device_memory() == (host, "host memory", False)
    # Several CPU devices share it: each may use its share
    monkeypatch.undo()
    whole, source, _ = memory.device_memory()
    out = on_devices(2, """
        from midgpt import memory
        print(json.dumps(memory.device_memory()))
    """)
    assert out == [whole // 2, f"{source} / 2 devices", False]


def test_a_run_larger_than_its_cgroup_memory_limit_is_refused_in_one_line(shakespeare_data_dir, tmp_path):
    # Real cgroups, where this test may make one (as root on Linux): the run's check, not the function alone.
    line = next((line for line in open("/proc/self/cgroup").read().splitlines() if ":memory:" in line or
                 line.startswith("0::")), "") if os.path.exists("/proc/self/cgroup") else ""
    v1 = ":memory:" in line
    parent = f"/sys/fs/cgroup{'/memory' if v1 else ''}{line.split(':', 2)[-1]}".rstrip("/")
    group = f"{parent}/midgpt-test-{os.getpid()}"
    try:
        os.mkdir(group)
        with open(f"{group}/{'memory.limit_in_bytes' if v1 else 'memory.max'}", "w") as f:
            f.write(str(600 << 20))  # shakespeare_char's estimate is 734 MiB; its process needs 180 MiB to say so
        joined = subprocess.run(["sh", "-c", f"echo $$ > {group}/cgroup.procs"], capture_output=True, text=True)
        if joined.returncode:  # cgroup v2 lets no process into a group whose parent delegates it no memory
            raise OSError(joined.stderr.strip())
    except OSError as e:
        if os.path.isdir(group):
            os.rmdir(group)
        pytest.skip(f"cannot make a cgroup with a memory limit here ({e})")
    try:
        result = subprocess.run(  # the shell joins the group, then becomes launch.py
            ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", sys.executable,
             str(REPO_ROOT / "launch.py"), "--config=shakespeare_char", f"--rundir={tmp_path / 'run'}",
             f"--data_dir={shakespeare_data_dir}"], capture_output=True, text=True, timeout=600,
            env={**os.environ, "JAX_PLATFORMS": "cpu"})  # a GPU's own memory would be checked instead
    finally:
        with contextlib.suppress(OSError):  # busy while a killed launch.py leaves it: not this test's error
            os.rmdir(group)
    assert_one_line_error(result, "but a device has 600.00 MiB; use a smaller batch")
    assert " of 600.00 MiB (the cgroup memory limit of this container or job)\n" in result.stdout, result.stdout
    assert not (tmp_path / "run").exists()
