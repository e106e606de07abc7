"""FSDP and data parallelism: same numbers on any mesh, 1/fsdp of the state per device,
and real multi-process training through jax.distributed."""

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO_ROOT, small_files, this_tree_env
from midgpt import mfu
from midgpt.config import Config, ModelConfig
from midgpt.errors import MidgptError
from midgpt.optimizer import make_optimizer
from midgpt.prepare import DATA_IDENTITY
from midgpt.sharding import FSDP, make_mesh, param_spec
from midgpt.step import init_state, make_train_step

# Width 64 and fsdp_min_size 1024: every matrix is sharded, the norm gains are not.
CONFIG = Config(data_dir="unused", model=ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=64),
                batch_size=8, g_accum_iters=2, compute_dtype="float32", fsdp_min_size=1024)
PREAMBLE = """
import dataclasses, json, sys
import equinox as eqx, jax, numpy as np
from midgpt.config import Config, ModelConfig
from midgpt.optimizer import make_optimizer
from midgpt.sharding import make_mesh
from midgpt.step import init_state, make_train_step
CONFIG = {config!r}
"""


def on_devices(n: int, code: str, **env) -> dict:
    """Run code in a fresh Python with n CPU devices; return the JSON it prints last."""
    source = PREAMBLE.format(config=CONFIG) + textwrap.dedent(code)
    # This tree's src/ first: an installed midgpt (another checkout's) must not answer for it.
    path = os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    # Compiled as the tests' own programs are (conftest): without LLVM's optimisations, in half the time.
    # Uncached too, as the tests' own: a program read from a cache has no memory analysis or HLO dump of its compile.
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "PYTHONPATH": path,
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "JAX_ENABLE_COMPILATION_CACHE": "false", **env}
    result = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def batch():
    rng = np.random.default_rng(0)
    return tuple(rng.integers(0, 64, (2, 8, 16), dtype=np.int32) for _ in range(2))


def one_step_params(config, chunks=None):
    """(loss and gradient norm, the updated parameters, the step's layout: mesh, batch rows and embedding rows
    a device)."""
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    state = init_state(config, optimizer, mesh)
    step = make_train_step(config, optimizer, mesh, chunks=chunks).lower(state, *batch()).compile()
    (state_sharding, x_sharding, _), _ = step.input_shardings
    layout = {"mesh": dict(mesh.shape), "batch_rows": x_sharding.shard_shape(batch()[0].shape)[1],
              "embed_rows": state_sharding.model.embed_VxD.shard_shape(state.model.embed_VxD.shape)[0]}
    state, metrics = step(state, *batch())
    # The gradient's norm as well: Adam's first update is about sign(g), blind to a gradient off by a factor.
    return ([float(metrics["loss"]), float(metrics["grad_norm"])],
            [np.asarray(x) for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_array))], layout)


MESHES = [((1, 8), None), ((2, 4), None), ((8, 1), None), ((1, 8), 4)]  # (shape, loss slices)


def test_one_step_on_every_mesh_matches_one_device(tmp_path):
    out = on_devices(8, f"""
        from test_sharding import MESHES, one_step_params
        from midgpt import mfu
        out, layouts = {{}}, {{}}
        for shape, chunks in MESHES:
            loss_and_norm, leaves, layout = one_step_params(dataclasses.replace(CONFIG, mesh_shape=shape), chunks)
            key = f"{{shape}}/{{chunks}}"
            out.update({{f"{{key}}/loss_and_norm": loss_and_norm}},
                       **{{f"{{key}}/{{i}}": x for i, x in enumerate(leaves)}})
            layouts[key] = layout
        np.savez("{tmp_path}/meshes.npz", **out)
        print(json.dumps({{"mfu": mfu.utilisation(CONFIG.model, 1000.0, 1e12), "layouts": layouts}}))
    """)
    # MFU divides by the peak of all 8 devices, not of one.
    assert out["mfu"] == pytest.approx(mfu.flops_per_token(CONFIG.model) * 1000.0 / (8 * 1e12), rel=1e-12)
    for (replica, fsdp), chunks in MESHES:
        # The mesh asked for; the batch split over both axes (8 rows, one a device: replicas are data
        # parallel, not copies of one another's work); the parameters over fsdp alone.
        assert out["layouts"][f"{(replica, fsdp)}/{chunks}"] == {
            "mesh": {"replica": replica, "fsdp": fsdp}, "batch_rows": 1, "embed_rows": CONFIG.model.vocab_size // fsdp}
    loss_and_norm, leaves, _ = one_step_params(CONFIG)
    meshes = np.load(tmp_path / "meshes.npz")
    for shape, chunks in MESHES:
        key = f"{shape}/{chunks}"
        np.testing.assert_allclose(meshes[f"{key}/loss_and_norm"][0], loss_and_norm[0], rtol=1e-6)
        np.testing.assert_allclose(meshes[f"{key}/loss_and_norm"][1], loss_and_norm[1], rtol=1e-5)
        for i, leaf in enumerate(leaves):
            np.testing.assert_allclose(meshes[f"{key}/{i}"], leaf, rtol=1e-5, atol=1e-6, err_msg=f"{key} leaf {i}")


def test_fsdp_shards_the_largest_dimension_it_divides_but_never_the_layer_axis():
    config = dataclasses.replace(CONFIG, fsdp_min_size=1)
    spec = lambda shape, stacked: param_spec(jax.ShapeDtypeStruct(shape, jnp.float32), stacked, config, 8)
    assert spec((64, 8, 16), stacked=True) == P(None, None, FSDP)  # 64 layers: each layer spread, not one a device
    assert spec((64, 8, 16), stacked=False) == P(FSDP, None, None)
    assert spec((2, 12, 32, 16), stacked=True) == P(None, None, FSDP, None)  # 12 does not divide by 8
    assert spec((2, 12, 6), stacked=True) == P()  # nothing divides: replicated
    assert param_spec(jax.ShapeDtypeStruct((64, 8), jnp.float32), False, CONFIG, 8) == P()  # under fsdp_min_size
    assert param_spec(jax.ShapeDtypeStruct((128, 8), jnp.float32), False, CONFIG, 8) == P(FSDP, None)  # at it
    assert param_spec(jax.ShapeDtypeStruct((64, 8), jnp.float32), False, config, 1) == P()  # one device


@pytest.mark.parametrize("fsdp, shard_model", [(8, False), (6, True)])
def test_the_state_is_whole_on_each_device_unless_fsdp_may_split_it(fsdp, shard_model):
    # --shard_model=false replicates everything; openwebtext_xl's 24 stacked layers are the only dimension of its
    # blocks that 6 divides, and lax.scan reads one layer at a time from all devices: whole, not a layer a device.
    from jax.sharding import AbstractMesh

    from midgpt.config import load_config
    from midgpt.sharding import state_shardings
    from midgpt.step import fresh_state

    config = dataclasses.replace(load_config("openwebtext_xl"), shard_model=shard_model)
    like = eqx.filter_eval_shape(fresh_state, config, make_optimizer(config))
    specs = {jax.tree_util.keystr(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(
        state_shardings(like, AbstractMesh((1, fsdp), ("replica", FSDP)), config))}
    assert len(specs) > 3 * 8 and "blocks" in "".join(specs)
    sharded = {path for path, spec in specs.items() if spec != P()}
    assert sharded == (set() if not shard_model else {f".{part}embed_VxD" for part in ("model.", "opt_state[1].mu.",
                                                                                         "opt_state[1].nu.")})


def test_fsdp_divides_a_dimension_by_the_fsdp_axis_alone_not_by_every_device():
    # On a (2, 4) mesh a dimension of 100 divides by fsdp's 4, not by all 8 devices: sharded 4 ways, not left whole.
    from jax.sharding import AbstractMesh

    from midgpt.sharding import state_shardings

    config = dataclasses.replace(CONFIG, fsdp_min_size=1)
    tree = {"w": jax.ShapeDtypeStruct((100, 3), jnp.float32), "v": jax.ShapeDtypeStruct((6, 10), jnp.float32)}
    specs = jax.tree.map(lambda s: s.spec, state_shardings(tree, AbstractMesh((2, 4), ("replica", FSDP)), config))
    assert specs == {"w": P(FSDP, None), "v": P()}


def test_every_evaluation_calls_the_program_the_first_compiled(caplog):
    # gather_params(mesh) is a static argument of eval_loss: a new function at each call would compile it again.
    from midgpt.train import evaluate

    config = dataclasses.replace(CONFIG, batch_size=2, eval_iters=1)
    mesh = make_mesh(config)
    state = init_state(config, make_optimizer(config), mesh)
    tokens = np.arange(200, dtype=np.uint16) % 64
    losses = []
    with jax.log_compiles():
        for _ in range(3):
            caplog.clear()
            losses.append(evaluate(state.model, tokens, config, mesh, stream=1))
            compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
            assert bool(compiled) == (len(losses) == 1), compiled
    assert losses[0] == losses[1] == losses[2] > 0


def test_fsdp_holds_one_eighth_of_each_large_parameter_and_its_adam_moments():
    shards = on_devices(8, """
        config = dataclasses.replace(CONFIG, mesh_shape=(1, 8))
        state = init_state(config, make_optimizer(config), make_mesh(config))
        rows = []
        for path, x in jax.tree_util.tree_leaves_with_path(eqx.filter(state, eqx.is_array)):
            shard_sizes = {s.data.size for s in x.addressable_shards}
            rows.append([jax.tree_util.keystr(path), x.size, sorted(shard_sizes), len(x.addressable_shards)])
        print(json.dumps(rows))
    """)
    large = [r for r in shards if r[1] >= CONFIG.fsdp_min_size]
    # Parameters, and Adam's mu and nu for each.
    assert len(large) == 3 * (1 + 6)  # the embedding and six stacked matrices per block stack
    assert sum(".mu." in r[0] for r in large) == sum(".nu." in r[0] for r in large) == 7
    for path, size, shard_sizes, n_shards in large:
        assert n_shards == 8 and shard_sizes == [size // 8], path
    for path, size, shard_sizes, _ in shards:
        if size < CONFIG.fsdp_min_size:
            assert shard_sizes == [size], path  # small arrays stay whole on every device


def test_compiled_step_never_holds_more_than_a_few_layers_of_parameters():
    # Parameters dominate activations here, so temporaries show what the step gathers.
    memory = on_devices(8, """
        config = dataclasses.replace(CONFIG, model=ModelConfig(64, 8, 8, 4, 256), g_accum_iters=1, mesh_shape=(1, 8))
        optimizer, mesh = make_optimizer(config), make_mesh(config)
        state = init_state(config, optimizer, mesh)
        x = np.zeros((1, 8, 8), np.int32)
        analysis = make_train_step(config, optimizer, mesh).lower(state, x, x).compile().memory_analysis()
        params = sum(a.nbytes for a in jax.tree.leaves(eqx.filter(state.model, eqx.is_array)))
        print(json.dumps({"params": params, "temp": analysis.temp_size_in_bytes,
                          "args": analysis.argument_size_in_bytes}))
    """)
    layer = memory["params"] / 8  # 8 layers hold nearly all parameters
    assert memory["args"] < 1.1 * 3 * memory["params"] / 8  # params, mu, nu: an eighth of each
    # A layer gathered for the forward pass, again for the backward, its gradient before and
    # after the sum over devices (XLA:CPU all-reduces it whole): under half the model's 8 layers.
    assert memory["temp"] < 4 * layer, memory


def test_fsdp_moves_weights_between_devices_never_activations():
    # The batch's activations (64 x 128 tokens x width 32, per layer) outnumber every parameter of
    # the model together: a collective larger than the model moves activations (or the tokens).
    out = on_devices(8, """
        import math, re
        from midgpt.model import count_params
        from midgpt.step import eval_loss
        from midgpt.sharding import batch_sharding, gather_params
        config = dataclasses.replace(CONFIG, model=ModelConfig(64, 128, 2, 2, 32), batch_size=64, g_accum_iters=1)
        optimizer, mesh = make_optimizer(config), make_mesh(config)
        state = init_state(config, optimizer, mesh)
        x = jax.device_put(np.zeros((1, 64, 128), np.int32), batch_sharding(mesh, ndim=3, batch_axis=1))
        step = make_train_step(config, optimizer, mesh).lower(state, x, x).compile().as_text()
        evaluation = eval_loss.lower(state.model, x, x, "float32", 1, gather_params(mesh)).compile().compiled.as_text()
        ops = r"= (\\S.*?) (?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\\("
        sizes = lambda hlo: [sum(math.prod(int(d) for d in dims.split(",") if d)
                                 for dims in re.findall(r"\\[([\\d,]*)\\]", shape))
                             for shape in re.findall(ops, hlo)]
        print(json.dumps({"params": count_params(state.model), "step": sizes(step), "eval": sizes(evaluation),
                          "step_shapes": re.findall(ops, step)}))
    """)
    assert out["step"] and max(out["step"]) <= out["params"], out
    # The tokens (64 x 128, fewer than the parameters) stay split too: a device given the whole batch gathers them.
    assert not [shape for shape in out["step_shapes"] if "s32[" in shape or "u32[" in shape], out["step_shapes"]
    assert max(out["eval"], default=0) <= out["params"], out


def test_fsdp_gathers_bfloat16_weights_and_sums_float32_gradients(tmp_path):
    # Read after XLA's SPMD partitioner, which every backend runs: later, XLA:CPU alone turns
    # bf16 collectives into f32 ones. Gathering f32 weights would move twice the bytes (the
    # evaluation gathered the float32 embedding); summing bf16 gradients over devices (or over
    # a batch's tokens) would lose precision.
    flags = (f"--xla_force_host_platform_device_count=8 --xla_dump_to={tmp_path} "
             f"--xla_dump_hlo_pass_re=spmd-partitioning")
    on_devices(8, """
        from midgpt.train import evaluate
        config = dataclasses.replace(CONFIG, compute_dtype="bfloat16", g_accum_iters=1, eval_iters=1)
        optimizer, mesh = make_optimizer(config), make_mesh(config)
        x = np.zeros((1, 8, 16), np.int32)
        state = init_state(config, optimizer, mesh)
        evaluate(state.model, np.arange(100, dtype=np.uint16) % 64, config, mesh, 1)
        make_train_step(config, optimizer, mesh).lower(state, x, x).compile()
        print("{}")
    """, XLA_FLAGS=flags)
    collectives = lambda program: re.findall(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter)\(",
                                             program.read_text())
    [step] = tmp_path.glob("*jit_step*after_spmd-partitioning*.txt")
    gathers = {dtype for dtype, _, op in collectives(step) if op == "all-gather"}
    sums = {dtype for dtype, dims, op in collectives(step) if op != "all-gather" and dims}  # not the scalar metrics
    assert gathers == {"bf16"} and sums == {"f32"}, collectives(step)
    [evaluation] = tmp_path.glob("*jit_eval_loss*after_spmd-partitioning*.txt")
    assert {dtype for dtype, _, op in collectives(evaluation)
            if op == "all-gather"} == {"bf16"}, collectives(evaluation)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(procs, timeout: float) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr); all are killed if one outlives timeout, not left to slow the later tests."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()  # nothing if it ended


def launch(*args, devices: int, cwd=REPO_ROOT, wrapper=()):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([*wrapper, sys.executable, str(REPO_ROOT / "launch.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def two_processes(*args, extra=([], []), wrappers=((), ()), devices=(4, 4), num_processes=(2, 2),
                  cwds=(REPO_ROOT, REPO_ROOT)):
    """launch.py as processes 0 and 1 of one run, 4 CPU devices each unless told."""
    port = free_port()
    return [launch(*args, *extra[i], "--multihost", f"--coordinator_address=127.0.0.1:{port}",
                   f"--num_processes={num_processes[i]}", f"--process_id={i}", devices=devices[i], wrapper=wrappers[i],
                   cwd=cwds[i])
            for i in range(2)]


def script_as_two_processes(script: str, *args: str, **env: str) -> list[tuple[str, str]]:
    """(stdout, stderr) of `python -c script ADDRESS PROCESS_ID *args` as processes 0 and 1, each ended well."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, f"127.0.0.1:{port}", str(i), *args],
                              env=this_tree_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = outputs(procs, timeout=120)
    assert [p.returncode for p in procs] == [0, 0], results
    return results


INTERLEAVED_BATCH = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh
from midgpt import data, sharding
from midgpt.config import Config, ModelConfig
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
# The processes' devices alternate along the fsdp axis, as a topology-ordered mesh may lay them out.
devices = sorted(jax.devices(), key=lambda d: (d.id % 4, d.process_index))
mesh = Mesh(np.array(devices).reshape(1, 8), sharding.DATA_AXES)
config = Config(data_dir="unused", batch_size=16,
                model=ModelConfig(vocab_size=1000, block_size=8, n_layer=1, n_head=1, n_embd=8))
tokens = np.arange(1000, dtype=np.uint16)  # every window its own
x_GxBxT, _ = data.global_batch(tokens, (0, 5), 3, config, mesh)
want_GxBxT = data.get_batch(tokens, (0, 5), 3 * 16, 8)[0].reshape(3, 16, 8)
print(json.dumps({"rows": sharding.process_rows(x_GxBxT.sharding, (3, 16, 8), 1).tolist(),
                  "same": all(np.array_equal(s.data, want_GxBxT[s.index]) for s in x_GxBxT.addressable_shards)}))
"""


def test_each_process_reads_its_own_rows_when_the_mesh_interleaves_processes():
    results = script_as_two_processes(INTERLEAVED_BATCH, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert rows[0] == {"rows": [0, 1, 4, 5, 8, 9, 12, 13], "same": True}
    assert rows[1] == {"rows": [2, 3, 6, 7, 10, 11, 14, 15], "same": True}


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_eight_devices(shakespeare_data_dir, tmp_path):
    from test_resume import metrics

    # float32: the two runs reduce in different orders, and bf16 would round those differences up.
    # fsdp_min_size=0: every array sharded, so each process's checkpoint files hold only its own shards.
    common = ["--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", "--compute_dtype=float32",
              "--batch_size=16", "--model.n_layer=1",
              "--g_accum_iters=2", "--max_steps=8", "--eval_interval=4", "--eval_iters=2", "--log_interval=2",
              "--fsdp_min_size=0"]
    # One run directory for both, as on a cluster's shared filesystem: orbax's
    # multi-process checkpoints need every process to see the same directory.
    procs = two_processes(*common, f"--rundir={tmp_path}/multi", "--checkpoint_interval=4")
    single = launch(*common, f"--rundir={tmp_path}/single", devices=8)
    for p, (_, stderr) in zip([*procs, single], outputs([*procs, single], timeout=300)):
        assert p.returncode == 0, stderr
    multi = [json.loads(line) for line in open(tmp_path / "multi" / "metrics.jsonl")]
    alone = [json.loads(line) for line in open(tmp_path / "single" / "metrics.jsonl")]
    # Each step once: only process 0 writes.
    assert [r["step"] for r in multi] == [r["step"] for r in alone] == [2, 4, 6, 8]
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["4", "8"]
    for m, a in zip(multi, alone):
        for key in ("loss", "grad_norm", "train_loss", "val_loss"):
            if key in a:
                assert m[key] == pytest.approx(a[key], rel=1e-5), (m["step"], key)

    trained = metrics(tmp_path / "multi")
    # Damaged in process 1's files only: process 0 restores it. Both skip it, alike, to checkpoint 4;
    # orbax's restore had them wait for each other in a barrier that process 1 never came to.
    for f in (tmp_path / "multi" / "checkpoints" / "8" / "state").glob("ocdbt.process_1/d/*"):
        f.write_bytes(f.read_bytes()[:10])
    resumed = two_processes(*common, f"--rundir={tmp_path}/multi", "--checkpoint_interval=4", "--max_steps=10")
    results = outputs(resumed, timeout=120)
    assert [p.returncode for p in resumed] == [0, 0], results
    out = results[0][0]
    damaged = re.search(r"checkpoint 8 is damaged \(process 1: \w+: .*\); moved to \S+\nresuming from checkpoint 4\n",
                        out)
    assert damaged and "Encountered error" not in damaged[0], out  # what orbax's read error wraps, not its wrapper
    assert len(os.listdir(tmp_path / "multi" / "checkpoints_damaged")) == 1
    again = metrics(tmp_path / "multi")
    assert [r["step"] for r in again] == [2, 4, 6, 8, 10]
    assert again[:4] == trained  # steps 5-8 trained again, identically


def test_a_checkpoint_that_one_process_cannot_read_stops_both_in_one_line_and_is_kept(shakespeare_data_dir, tmp_path):
    # Its fingerprints, unreadable on process 1's host alone: orbax's restore of them ended in a barrier
    # that process 1, which had raised before it, never came to; process 0's line said only "Connection
    # reset by peer" of the barrier.
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root, for process 0 to read a file that process 1, "
                    "run by setpriv without that power, cannot")
    common = ["--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", "--batch_size=16",
              "--model.n_layer=1", "--eval_iters=1", "--checkpoint_interval=2", f"--rundir={tmp_path}/run"]
    procs = two_processes(*common, "--max_steps=2")
    trained = outputs(procs, timeout=120)
    assert [p.returncode for p in procs] == [0, 0], trained
    fingerprints = tmp_path / "run" / "checkpoints" / "2" / "fingerprints" / "metadata"
    fingerprints.chmod(0)
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    procs = two_processes(*common, "--max_steps=4", wrappers=((), as_user))
    results = outputs(procs, timeout=120)
    assert [p.returncode for p in procs] == [1, 1], results
    for i, (_, err) in enumerate(results):
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: no checkpoint in {tmp_path}/run/checkpoints restores (checkpoint 2: "
                               f"{'process 1: ' if i == 0 else ''}PermissionError: "), line
        assert line.endswith("nothing was moved or overwritten: fix the cause and run again, or train in a new "
                             "--rundir"), line
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]


@pytest.mark.parametrize("signalled", [0, 1])
def test_a_signalled_process_stops_both_at_the_next_log_step_with_a_checkpoint(shakespeare_data_dir, tmp_path,
                                                                               signalled):
    from test_resume import wait_for_step

    rundir = tmp_path / "run"
    procs = two_processes("--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", "--batch_size=16",
                          "--model.n_layer=1", "--max_steps=100000", "--log_interval=7", f"--rundir={rundir}")
    wait_for_step(rundir, 7, procs[0])
    procs[signalled].send_signal(signal.SIGTERM)  # one process's alone: it tells the other at the next log step
    results = outputs(procs, timeout=120)
    assert [p.returncode for p in procs] == [0, 0], results
    # Said where it was asked, by whom: process 1's first signal went unanswered there.
    notice = "SIGTERM: stopping at the next log step, with a checkpoint (again to stop at once)"
    assert (f"process 1: {notice}" if signalled else notice) in results[signalled][0].splitlines(), results
    out = results[0][0]  # process 0's, which says the rest
    assert "stopped after step " in out and ("another process was signalled" in out) == (signalled == 1), out
    stopped = int(out.split("stopped after step ")[1].split(" ")[0])
    assert stopped % 7 == 0 and os.listdir(rundir / "checkpoints") == [str(stopped)]


def test_a_process_that_comes_to_the_first_step_40_s_after_the_other_trains_with_it(shakespeare_data_dir, tmp_path):
    # Gloo gives processes 30 s to meet at the first collective of a group of devices, which the first step's
    # gathers are: one that compiled the step that much longer (a loaded host, or the only one to miss the
    # compilation cache) failed both, "Gloo context initialization failed".
    procs = two_processes("--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", "--batch_size=16",
                          "--model.n_layer=1", "--max_steps=2", "--eval_iters=1", f"--rundir={tmp_path}/run")
    for line in iter(procs[0].stdout.readline, ""):  # said before the loop, where process 1 is: yet to compile
        if line.startswith("MFU is against"):
            break
    procs[1].send_signal(signal.SIGSTOP)  # a stalled host
    time.sleep(40)
    procs[1].send_signal(signal.SIGCONT)
    results = outputs(procs, timeout=120)
    assert [p.returncode for p in procs] == [0, 0], results
    assert "trained to step 2: " in results[0][0], results


def test_a_debug_run_of_two_processes_finishes_with_process_0s_trace(shakespeare_data_dir, tmp_path):
    # Process 0 alone ran the traced steps one a call, 3 a call the others: at steps 7-9 it waited for ever
    # for process 1 to compile the program of 3, compiled at step 1 on process 1 only.
    procs = two_processes("--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", "--batch_size=16",
                          "--model.n_layer=1", "--max_steps=9", "--steps_per_call=3", "--log_interval=3",
                          "--eval_interval=9", "--checkpoint_interval=9", "--eval_iters=1", "--debug",
                          f"--rundir={tmp_path}/run")
    results = outputs(procs, timeout=120)
    assert [p.returncode for p in procs] == [0, 0], results
    assert "trained to step 9: no checkpoint was written (--debug)" in results[0][0], results
    assert len(list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))) == 1, results  # process 0's alone


def test_a_process_that_dies_mid_run_stops_the_other_in_one_line_that_says_how_to_resume(shakespeare_data_dir,
                                                                                         tmp_path):
    from test_resume import wait_for_step

    rundir = tmp_path / "run"
    procs = two_processes("--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", "--batch_size=16",
                          "--model.n_layer=1", "--max_steps=100000", "--log_interval=5", "--checkpoint_interval=10",
                          f"--rundir={rundir}", devices=(1, 1))
    wait_for_step(rundir, 12, procs[0])
    # Killed as a crashed host is: process 0 waited for it in a collective, and JAX's heartbeat aborted it in C++
    # 100 s later. Stopped first, so that process 0 is in that collective. One device each: with several, one of
    # process 0's devices may notice its peer's end in Gloo while its others wait for that one, and JAX aborts.
    procs[1].send_signal(signal.SIGSTOP)
    time.sleep(2)
    procs[1].kill()
    (_, err), _ = outputs(procs, timeout=60)
    assert procs[0].returncode == 1, err
    saved = sorted(int(step) for step in os.listdir(rundir / "checkpoints"))
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: training stopped at step \d+: a collective across the 2 processes failed \(\w+: "
                        r"Gloo .*\); another process has most likely stopped \(see its output\); once every process "
                        rf"has stopped, run the same command to resume from checkpoint {saved[-1]}", line), line
    assert "Error dispatching computation" not in line and "Traceback" not in err and "Check failure" not in err, err


@pytest.mark.parametrize("other_host", ["no data", "other data"])
def test_a_host_without_the_data_or_with_other_data_stops_every_process_in_one_line(other_host, shakespeare_text,
                                                                                   shakespeare_data_dir, tmp_path):
    # Each host reads --data_dir on its own disk. One without it stopped alone, and the other died of the lost
    # collective in a traceback, then JAX's abort; one with other text trained the run on two vocabularies, silently.
    here = os.path.dirname(shakespeare_data_dir)
    other = tmp_path / "other_host"
    other.mkdir()
    if other_host == "other data":
        text = tmp_path / "half.txt"
        text.write_bytes(open(shakespeare_text, "rb").read()[:300_000])
        subprocess.run([sys.executable, str(REPO_ROOT / "data" / "shakespeare_char" / "prepare.py"), "--input",
                        str(text), "--out_dir", str(other / os.path.basename(shakespeare_data_dir))], check=True,
                       capture_output=True)
    procs = two_processes("--config=shakespeare_char_cpu", f"--data_dir={os.path.basename(shakespeare_data_dir)}",
                          "--model.n_layer=1", "--max_steps=2", f"--rundir={tmp_path}/run", devices=(1, 1),
                          cwds=(here, other))
    results = outputs(procs, timeout=120)
    assert [p.returncode for p in procs] == [1, 1], results
    lines = [err.strip().splitlines()[-1] for _, err in results]
    if other_host == "no data":
        assert lines[1].startswith(f"error: {os.path.basename(shakespeare_data_dir)} not found"), lines
        assert lines[0] == f"error: process 1: {lines[1].removeprefix('error: ')}", lines
    else:
        metas = [json.load(open(os.path.join(d, os.path.basename(shakespeare_data_dir), "meta.json")))
                 for d in (here, other)]
        differ = [key for key in DATA_IDENTITY if metas[0].get(key) != metas[1].get(key)]
        assert "train_tokens" in differ
        assert lines == [f"error: {os.path.basename(shakespeare_data_dir)} holds other data on some hosts "
                         f"({', '.join(differ)} in its meta.json differ between processes); prepare the same data on "
                         "every host (copy one host's), or put it where every host sees it"] * 2, results
    assert not any("Traceback" in err for _, err in results), results
    assert not (tmp_path / "run").exists()


LOST_BEFORE_A_CHECK = """
import os, sys
import jax, numpy as np
from jax.experimental import multihost_utils
from midgpt import multihost
from midgpt.errors import MidgptError
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
multihost_utils.process_allgather(np.int32(0))  # connected, as check_same_arguments leaves them
if jax.process_index() == 1:
    os._exit(3)  # stopped outside failing_together, as a host's own error once did
try:
    with multihost.failing_together():
        pass
except MidgptError as e:
    print(type(e).__name__, e, flush=True)
os._exit(0)
"""


def test_a_process_that_stopped_before_a_shared_check_is_one_line_on_the_others():
    # The others' gather in failing_together failed: a traceback, then JAX's abort as it waited for that process.
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", LOST_BEFORE_A_CHECK, f"127.0.0.1:{port}", str(i)],
                              env=this_tree_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    (said, err), _ = outputs(procs, timeout=120)
    assert [p.returncode for p in procs] == [0, 3], err
    assert re.fullmatch(r"LostProcess a collective across the 2 processes failed \(\w+: .*Gloo.*\); another process "
                        r"has most likely stopped \(see its output\); once every process has stopped, fix what stopped "
                        r"the other and run the same command again", said.splitlines()[-1]), (said, err)


def test_a_runs_lock_checked_before_joining_refuses_a_holder_not_the_jobs_other_processes_checking_too(tmp_path):
    # Each process of a job checks the lock as it starts, at about the same moment: an exclusive probe of one
    # refused another, and the rest waited out --join_timeout for it.
    from midgpt.files import LOCK, check_run_free, lock_run

    check_run_free(str(tmp_path / "none"))  # no run yet
    (tmp_path / LOCK).touch()
    with open(tmp_path / LOCK, "rb") as sibling:  # another process of the job, checking at this moment
        fcntl.flock(sibling, fcntl.LOCK_SH | fcntl.LOCK_NB)
        check_run_free(str(tmp_path))
    with lock_run(str(tmp_path)), pytest.raises(MidgptError, match="another launch.py is training the run in "):
        check_run_free(str(tmp_path))


def test_a_second_copy_of_a_running_job_is_refused_before_it_joins_the_first_copys_processes(shakespeare_data_dir,
                                                                                                tmp_path):
    # A job requeued while its first copy still runs: the copy's process 1 joined the running coordinator, whose
    # JAX aborted process 0 in C++ ("a different incarnation"), its save under way left unfinished.
    from test_resume import wait_for_step

    rundir = tmp_path / "run"
    args = ("--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", "--batch_size=16",
            "--model.n_layer=1", "--max_steps=100000", "--log_interval=5", "--checkpoint_interval=10",
            f"--rundir={rundir}")
    first = two_processes(*args, devices=(1, 1))
    try:
        wait_for_step(rundir, 5, first[0])
        address = next(a for a in first[0].args if a.startswith("--coordinator_address="))
        copy = launch(*args, "--multihost", address, "--num_processes=2", "--process_id=1", devices=1)
        (_, err), = outputs([copy], timeout=60)
        assert copy.returncode == 1 and err.splitlines()[-1] == (
            f"error: another launch.py is training the run in {rundir}; wait for it to end (or stop it), or pass "
            "another --rundir"), err
        wait_for_step(rundir, 25, first[0])  # the first copy trains on, past a save
        assert first[1].poll() is None
    finally:
        for proc in first:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("limit_kib, fix", [
    # At the start, its config.json; then a log step's records.
    (0, "raise the file size limit (ulimit -f), or pass a --rundir you can write to"),
    (4, "raise the file size limit (ulimit -f) and run the same command to start again (no checkpoint yet)"),
])
def test_a_write_that_fails_on_process_0_stops_both_in_one_line(limit_kib, fix, shakespeare_data_dir, tmp_path):
    # The disk fills, played by a file size limit on process 0, which alone writes the run's files;
    # process 1 waited for it at its next collective and died of JAX's heartbeat with a C++ stack.
    rundir = tmp_path / "run"
    procs = two_processes("--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", "--batch_size=16",
                          "--model.n_layer=1", "--log_interval=1", "--max_steps=2000", f"--rundir={rundir}",
                          wrappers=(small_files(limit_kib), ()))
    results = outputs(procs, timeout=300)
    assert [p.returncode for p in procs] == [1, 1], results
    error = f"cannot write to {rundir} ([Errno 27] File too large); {fix}"
    assert results[0][1].strip().splitlines()[-1] == f"error: {error}"
    assert results[1][1].strip().splitlines()[-1] == f"error: process 0: {error}"
    assert not any("Traceback" in err for _, err in results), results
    assert not list(rundir.glob("*.tmp"))  # no half-written file left behind


FAILING_TOGETHER = """
import json, sys
import jax
from midgpt import multihost
from midgpt.errors import MidgptError
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
try:
    with multihost.failing_together():
        if jax.process_index() == 0 and sys.argv[3] == "bug":
            b"\\xff".decode()  # a bug, not a MidgptError
        if jax.process_index() == 0 and sys.argv[3] == "empty":
            raise MidgptError("")
    print(json.dumps("no error"))
except Exception as e:
    print(json.dumps(f"{type(e).__name__}: {e}"))
"""


def test_any_error_on_one_process_stops_the_other_at_the_end_of_the_block():
    # A metrics.jsonl with a byte that is not UTF-8 stopped process 0 with a UnicodeDecodeError,
    # and process 1 waited for it at its next collective.
    results = script_as_two_processes(FAILING_TOGETHER, "bug")
    raised = "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
    assert json.loads(results[0][0].splitlines()[-1]) == f"UnicodeDecodeError: {raised}"  # its own, as raised
    assert json.loads(results[1][0].splitlines()[-1]) == f"MidgptError: process 0: UnicodeDecodeError: {raised}"
    # An error without a message is still one: process 1 had gone on alone, to wait at its next collective.
    results = script_as_two_processes(FAILING_TOGETHER, "empty")
    assert [json.loads(stdout.splitlines()[-1]) for stdout, _ in results] == [
        "MidgptError: ", "MidgptError: process 0: MidgptError: "], results


SEES_RUNDIR = """
import json, os, sys
import jax
from midgpt import multihost
from midgpt.errors import MidgptError
from midgpt.files import lock_run
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
said = []
# The second: each host's own disk, played by a folder of each process's.
for rundir in [f"{sys.argv[3]}/shared", f"{sys.argv[3]}/own_{jax.process_index()}"]:
    os.makedirs(rundir, exist_ok=True)
    if jax.process_index() == 0:
        lock = lock_run(rundir)
    try:
        multihost.check_same_rundir(rundir)
        said.append("alike")
    except MidgptError as e:
        said.append(str(e))
print(json.dumps(said))
"""


def test_a_rundir_that_is_each_hosts_own_is_refused_before_a_new_run_trains_in_it(tmp_path):
    # A new run (nothing to resume, so launch.py's check of the files alike passed) trained to its end, then
    # waited for ever: orbax commits a checkpoint once every process's part is in its folder, and none did.
    results = script_as_two_processes(SEES_RUNDIR, str(tmp_path))
    refusal = (f"{tmp_path}/own_1 is not the directory process 0 writes in (its .lock is missing or another's): "
               "--rundir must be on a filesystem every host sees")
    assert [json.loads(stdout.splitlines()[-1]) for stdout, _ in results] == [
        ["alike", f"process 1: {refusal}"], ["alike", refusal]], results


CHECKED_ALIKE = """
import json, os, sys
import jax
from midgpt import multihost
from midgpt.config import load_config
from midgpt.errors import MidgptError
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
alike = dict(config=load_config("shakespeare_char_cpu"), rundir="run", debug=False, resume=False,
             compute_dtype="bfloat16")
said = []
for name, value in [(None, None), ("debug", True), ("resume", True), ("compute_dtype", "float32"), ("rundir", "run")]:
    if jax.process_index() == 1 and name == "rundir":
        os.chdir(sys.argv[3])  # "run" from another working directory: another run
    try:
        multihost.check_same_arguments(**{**alike, **({name: value} if jax.process_index() == 1 and name else {})})
        said.append("alike")
    except MidgptError as e:
        said.append(str(e))
print(json.dumps(said))
"""


def test_processes_that_differ_in_what_launch_py_read_beside_the_config_are_refused(tmp_path):
    # The launch-based test below covers the config's fields; these came from launch.py's flags, the run
    # directory and the host: processes that differed trained apart, or waited for each other for ever.
    results = script_as_two_processes(CHECKED_ALIKE, str(tmp_path))
    differ = lambda what: f"the processes differ in {what}; start every process with the same arguments"
    expected = ["alike", differ("--debug"), differ("files in --rundir (it must be on a filesystem every host sees)"),
                differ("compute_dtype auto (CPUs of other kinds: pass --compute_dtype)"),
                differ("--rundir (as an absolute path)")]
    assert [json.loads(stdout.splitlines()[-1]) for stdout, _ in results] == [expected, expected], results


def test_a_failed_collective_of_gloo_or_nccl_is_told_apart_from_other_errors(monkeypatch):
    # NCCL's on GPUs, Gloo's on CPUs: the line that says another process most likely stopped, and how to resume.
    from midgpt import multihost

    nccl = jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation: Error dispatching computation: "
                                      "NCCL operation ncclAllReduce failed: unhandled system error")
    assert not multihost.failed_collective(nccl)  # one process: no other to have stopped
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert multihost.failed_collective(nccl) and multihost.failed_collective(ValueError("Gloo: connection closed"))
    assert not multihost.failed_collective(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    assert str(multihost.collective_error(nccl, "run X to resume", 7)) == (
        "training stopped at step 7: a collective across the 2 processes failed (INTERNAL: NCCL operation "
        "ncclAllReduce failed: unhandled system error); another process has most likely stopped (see its output); "
        "run X to resume")


def test_a_process_lost_during_a_save_is_told_as_a_lost_process_not_as_a_failed_save(monkeypatch, tmp_path):
    # A peer killed while orbax's save waited for it in a barrier: the line blamed the save ("fix the cause") and
    # never said that another process had stopped. The run's last save, which the loop's line does not cover too.
    import orbax.checkpoint as ocp

    from midgpt import checkpoint, multihost

    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    gloo = jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: Connection closed by peer [127.0.0.1]:1372")
    with pytest.raises(multihost.LostProcess) as raised, checkpoint.failed_saves_in_one_line(manager, "X"):
        raise gloo
    assert str(raised.value) == (
        "a collective across the 2 processes failed (UNKNOWN: Gloo AllGather failed: Connection closed by peer "
        "[127.0.0.1]:1372); another process has most likely stopped (see its output); once every process has "
        "stopped, run X to start again")
    # In the loop, its line names the step.
    assert str(multihost.collective_error(raised.value, "F", 9)).startswith(
        "training stopped at step 9: a collective across the 2 processes failed (UNKNOWN: Gloo AllGather failed: ")
    with pytest.raises(checkpoint.SaveFailed, match=r"^a checkpoint save failed \(No space left on device\); no "
                       "checkpoint was finished: fix the cause and run again$"):
        with checkpoint.failed_saves_in_one_line(manager, "X"):
            raise OSError("write failed, os_error_code=28")
    manager.close()


def test_a_process_lost_during_a_restore_moves_no_checkpoint_aside_as_damaged(monkeypatch, tmp_path):
    # The read's failure was taken for the checkpoint's damage: with an older one to resume from, the newest
    # would be moved out of checkpoints/.
    from midgpt import checkpoint
    from midgpt.config import load_config

    rundir = str(tmp_path / "run")
    manager = checkpoint.make_manager(rundir, load_config("shakespeare_char_cpu"))
    state = {"step": jnp.int32(20), "w_D": jnp.zeros(3)}
    checkpoint.save(manager, 20, state, load_config("shakespeare_char_cpu"))
    checkpoint.wait(manager)
    gloo = jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: Connection closed by peer [127.0.0.1]:1372")

    def lost(*_):
        raise gloo

    monkeypatch.setattr(checkpoint, "restore", lost)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(jax.errors.JaxRuntimeError) as raised:
        checkpoint.restore_newest(manager, rundir, state, None, say=print)
    assert raised.value is gloo
    assert checkpoint.committed(rundir, 20) and not os.path.exists(os.path.join(rundir, "checkpoints_damaged"))
    manager.close()


@pytest.mark.parametrize("other, differ", [
    ({"extra": [[], ["--max_steps=13"]]}, "the processes differ in --max_steps"),
    ({"extra": [[], ["--rundir=RUN_2"]]}, "the processes differ in --rundir (as an absolute path)"),
    # Named first: after the model's fields it was one of "8 more".
    ({"extra": [[], ["--config=shakespeare_char"]]}, "the processes differ in --config, --model.block_size, "),
    # JAX went on with process 0's count, and process 1's was never checked.
    ({"num_processes": (2, 3)}, "--num_processes=3, but 2 joined; give every process the same"),
    # A traceback from the arguments' gather, which needs as many devices on each.
    ({"devices": (2, 6)}, "the processes have different numbers of devices"),
])
def test_processes_started_with_different_arguments_stop_in_one_line(other, differ, shakespeare_data_dir, tmp_path):
    # Another max_steps on one process used to hang the other at the end; another learning rate
    # trained a run that config.json did not record; another run directory hung both at the first save.
    common = ["--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", "--batch_size=16",
              f"--rundir={tmp_path}/run", "--max_steps=20", "--checkpoint_interval=5"]
    other = {k: [[a.replace("RUN_2", f"{tmp_path}/run_2") for a in e] for e in v] if k == "extra" else v
             for k, v in other.items()}
    procs = two_processes(*common, **other)
    for p, (_, stderr) in zip(procs, outputs(procs, timeout=120)):
        assert p.returncode == 1 and differ in stderr.strip().splitlines()[-1], stderr
        assert "Traceback" not in stderr, stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_coordinator_port_already_taken_is_one_line(tmp_path):
    # JAX's coordinator failed to listen and process 0 died of a segmentation fault; process 1 waited on.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = launch("--config=shakespeare_char_cpu", f"--rundir={tmp_path}/run", "--multihost", "--num_processes=2",
                      "--process_id=0", f"--coordinator_address=127.0.0.1:{port}", devices=2)
        _, stderr = outputs([proc], timeout=60)[0]
    assert proc.returncode == 1 and stderr.strip().splitlines() == [
        f"error: --coordinator_address=127.0.0.1:{port}: process 0 cannot listen on port {port} (Address already in "
        "use): another program holds it, or another process 0 (give each --process_id to one process); pick a free "
        "port, the same for every process"], stderr


def test_a_privileged_coordinator_port_is_one_line_that_says_why(tmp_path):
    # It said "another program holds it" of a port that only root may listen on.
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        if int(f.read()) <= 80:
            pytest.skip("port 80 is not privileged on this host (net.ipv4.ip_unprivileged_port_start)")
    wrapper = []
    if os.geteuid() == 0:  # root may listen on it: launch.py runs without that power
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv, to run launch.py without root's power to listen on ports below 1024")
        wrapper = ["setpriv", "--bounding-set=-net_bind_service"]
    proc = launch("--config=shakespeare_char_cpu", f"--rundir={tmp_path}/run", "--multihost", "--num_processes=2",
                  "--process_id=0", "--coordinator_address=127.0.0.1:80", devices=2, wrapper=wrapper)
    _, stderr = outputs([proc], timeout=60)[0]
    assert proc.returncode == 1 and stderr.strip().splitlines() == [
        "error: --coordinator_address=127.0.0.1:80: process 0 cannot listen on port 80 (Permission denied): ports "
        "below 1024 need root; pick a free port of 1024 or more, the same for every process"], stderr
    assert not (tmp_path / "run").exists()


def process_0_waiting_to_join(rundir, *args, wrapper=()) -> subprocess.Popen:
    """launch.py as process 0 of 2, once it waits for process 1 in jax.distributed.initialize."""
    port = free_port()
    proc = launch("--config=shakespeare_char_cpu", f"--rundir={rundir}", "--multihost", "--num_processes=2",
                  "--process_id=0", f"--coordinator_address=127.0.0.1:{port}", *args, devices=4, wrapper=wrapper)
    deadline = time.monotonic() + 60
    while True:  # into the wait: process 0's coordinator answers
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no coordinator to wait with: {proc.communicate()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc
        time.sleep(0.1)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_stops_a_process_waiting_for_the_others_to_join(tmp_path, stop):
    # jax.distributed.initialize waits in C++ (5 minutes by default), where Python's handler never runs:
    # SIGTERM (scancel, timeout) waited that out, then JAX's C++ abort.
    proc = process_0_waiting_to_join(tmp_path / "run")
    proc.send_signal(stop)
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()  # not left waiting, if the signal was not heard
    assert proc.returncode == -stop
    assert out.startswith("waiting for every process to join (jax.distributed.initialize, at most 300 s"), out


def test_a_process_started_under_nohup_waits_through_a_hangup_to_join(tmp_path):
    # nohup's SIGHUP, ignored from the start: a wait that gave every stop signal back to the default would die of it.
    nohup = ["bash", "-c", 'trap "" HUP && exec "$@"', "bash"]
    proc = process_0_waiting_to_join(tmp_path / "run", "--join_timeout=5", wrapper=nohup)
    proc.send_signal(signal.SIGHUP)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("error: not every process joined within 5 s"), err


GIVEN = "start all 2 processes with the same --coordinator_address and --num_processes, each with its own --process_id"
# What JAX detects of a SLURM job step (its second task), where no flag was given.
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NUM_NODES": "1"}


@pytest.mark.parametrize("cluster, env, fix", [
    (["--num_processes=2", "--process_id=0", "COORDINATOR"], {}, GIVEN),  # the coordinator
    (["--num_processes=2", "--process_id=1", "COORDINATOR"], {}, GIVEN),  # one that finds none
    ([], SLURM, "check that every task of the job started"),
])
def test_a_process_the_others_never_join_gives_up_in_one_line(tmp_path, cluster, env, fix):
    # JAX's own timeout was a C++ abort: a stack trace that said "another task died", status 134.
    start = time.monotonic()
    cluster = [f"--coordinator_address=127.0.0.1:{free_port()}" if a == "COORDINATOR" else a for a in cluster]
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch.py"), "--config=shakespeare_char_cpu",
                             f"--rundir={tmp_path}/run", "--multihost", *cluster, "--join_timeout=3"],
                            cwd=REPO_ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and err == (
        f"error: not every process joined within 3 s (one that stopped says why in its own output); {fix}, "
        f"or give them longer (--join_timeout)\n"), err
    assert out.startswith("waiting for every process to join (jax.distributed.initialize, at most 3 s"), out
    assert time.monotonic() - start < 30 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--mesh_shape=3,-1"], "mesh_shape=3,-1 does not fit the 8 devices"),
    (["--mesh_shape=2,2"], "mesh_shape=2,2 does not fit the 8 devices"),
    (["--batch_size=12"], "batch_size=12 does not split over the 8 devices of the mesh; use a multiple of 8 "
                          "(--batch_size=8 or --batch_size=16; g_accum_iters can keep the global batch near 12 rows)"),
    # Over every device, not the fsdp axis alone, which 12 rows would split over.
    (["--mesh_shape=2,4", "--batch_size=12"], "batch_size=12 does not split over the 8 devices of the mesh"),
    # No batch of 0; and no g_accum_iters brings 8 rows a micro-batch near 5 (with 4096 devices, near 12, it said).
    (["--batch_size=5"], "use a multiple of 8 (--batch_size=8)\n"),
    (["--batch_size=5", "--g_accum_iters=4"], "use a multiple of 8 (--batch_size=8; g_accum_iters can keep the "
                                              "global batch near 20 rows)"),
])
def test_a_mesh_that_does_not_fit_or_a_batch_that_does_not_divide_is_one_line(args, fragment, shakespeare_data_dir,
                                                                              tmp_path):
    p = launch("--config=shakespeare_char_cpu", f"--data_dir={shakespeare_data_dir}", f"--rundir={tmp_path}/run",
               *args, devices=8)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 1
    assert stderr.strip().splitlines() == [stderr.strip()] and fragment in stderr, stderr
    assert not (tmp_path / "run").exists()


def test_openwebtext_xl_state_is_sharded_over_all_devices():
    # The layout only (no allocation): 1.3B parameters do not fit this machine three times over.
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "fsdp_memory.py"),
                             "--config=openwebtext_xl", "--devices=8", "--abstract"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mesh"] == {"replica": 1, "fsdp": 8}
    assert report["parameters"] > 1.3e9
    assert report["per_device_fraction"] < 0.126  # an eighth, plus the replicated norm gains
