"""Device mesh (replica, fsdp) and the rules that place parameters and batches on it.

Parameters, gradients and optimiser state are sharded over the fsdp axis (FSDP);
batches are split over both axes, so replica is pure data parallelism. Inside the
jitted step, the model gathers one layer's parameters at a time (the layers run
under lax.scan, and gather_params marks the spot) and XLA sums their gradients
back into the shards.
"""

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from midgpt.config import Config, leaves
from midgpt.errors import MidgptError

REPLICA, FSDP = "replica", "fsdp"
DATA_AXES = (REPLICA, FSDP)  # a batch's rows are split over every device


def make_mesh(config: Config, resuming: bool = False) -> Mesh:
    """The (replica, fsdp) mesh over all devices of all processes; -1 takes the rest.

    Also checks that every device gets a whole number of each batch's rows.
    """
    n, given = jax.device_count(), ",".join(map(str, config.mesh_shape))
    if (shape := _resolve(config.mesh_shape, n)) is None:
        raise MidgptError(
            f"mesh_shape={given} does not fit the {n} device{'s' * (n > 1)}; "
            f"use sizes whose product is {n}, e.g. --mesh_shape=1,-1"
        )
    if (B := config.batch_size) % n:
        if resuming:  # a resumed run keeps its batch, so the devices must change instead
            divisors = [d for d in range(1, B + 1) if B % d == 0]
            fitting = [d for d in divisors if _resolve(config.mesh_shape, d)]
            where = (f"({_either(fitting)})" if fitting == divisors else
                     f"and that mesh_shape={given} fits ({_either(fitting)}), or pass another --mesh_shape" if fitting
                     else f"({_either(divisors)}) with another --mesh_shape, e.g. --mesh_shape=1,-1")
            raise MidgptError(f"this run's batch_size={B} does not split over the {n} devices of the mesh; "
                              f"resume it on a device count that divides {B} {where}")
        near = " or ".join(f"--batch_size={b}" for b in (B // n * n, B // n * n + n) if b)
        raise MidgptError(f"batch_size={B} does not split over the {n} devices of the mesh; use a multiple of {n} "
                          f"({near}; g_accum_iters can keep the global batch near {B * config.g_accum_iters} rows)")
    # Auto axes: XLA propagates shardings from the declared inputs and outputs.
    return jax.make_mesh(shape, DATA_AXES, axis_types=(AxisType.Auto,) * 2)


def _resolve(mesh_shape: tuple[int, int], n: int) -> tuple[int, int] | None:
    """The mesh of this shape (one size may be -1, the rest) over exactly n devices, or None if there is none."""
    fixed = math.prod(size for size in mesh_shape if size != -1)
    if n % fixed or (-1 not in mesh_shape and n != fixed):
        return None
    return tuple(n // fixed if size == -1 else size for size in mesh_shape)


def _either(counts: list[int]) -> str:
    *rest, last = map(str, counts)
    return f"{', '.join(rest)} or {last}" if rest else last


def is_abstract(x) -> bool:
    """Whether x is an array's shape and dtype alone, as eqx.filter_eval_shape leaves the arrays of a pytree."""
    return isinstance(x, jax.ShapeDtypeStruct)


def on_cpu(mesh: Mesh) -> bool:
    """Whether the mesh is of CPU devices (a host's, or several faked by XLA_FLAGS)."""
    return mesh.devices.flat[0].platform == "cpu"


def param_spec(x, stacked: bool, config: Config, fsdp_size: int) -> P:
    """Shard the largest dimension that fsdp divides, never a stacked layer axis; small arrays are replicated."""
    if not config.shard_model or fsdp_size == 1 or x.size < config.fsdp_min_size:
        return P()
    # Not the layer axis: lax.scan reads one layer per iteration, which must be spread over all devices.
    dims = [i for i in range(int(stacked), x.ndim) if x.shape[i] % fsdp_size == 0]
    if not dims:
        return P()
    axis = max(dims, key=lambda i: x.shape[i])
    return P(*[FSDP if i == axis else None for i in range(x.ndim)])


def state_shardings(tree, mesh: Mesh, config: Config):
    """NamedSharding for every array of a pytree of parameters or optimiser state.

    Adam's moments have their parameters' paths below their root, so they get their parameters' shardings.
    """
    fsdp_size = mesh.shape[FSDP]

    def sharding(path, x):
        stacked = any(getattr(k, "name", None) == "blocks" for k in path)
        return NamedSharding(mesh, param_spec(x, stacked, config, fsdp_size))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = DATA_AXES
    return NamedSharding(mesh, P(*spec))


def check_same_arguments(config: Config, rundir: str, debug: bool, resume: bool, compute_dtype: str) -> None:
    """Raise MidgptError, naming what differs, unless every process runs this config in this run directory alike."""
    # A process with other arguments hangs the others at its first collective (another --rundir:
    # at the first save, in orbax's commit), or trains a run that config.json does not record.
    if jax.process_count() == 1:
        return
    check_devices_alike()
    fields = {f"--{name}": value for name, value in leaves(config).items() if name != "name"}
    # What a command names first, first: another --config differs in many fields too, which would hide it.
    arguments = {"--config": config.name, "--rundir (as an absolute path)": os.path.abspath(rundir),
                 "--debug": debug, **fields, "files in --rundir (it must be on a filesystem every host sees)": resume,
                 "compute_dtype auto (CPUs of other kinds: pass --compute_dtype)": compute_dtype}
    digests = [hashlib.sha256(json.dumps(value).encode()).digest()[:4] for value in arguments.values()]
    gathered = multihost_utils.process_allgather(np.frombuffer(b"".join(digests), np.int32))  # processes x arguments
    if differ := [name for name, column in zip(arguments, gathered.T) if len(set(column.tolist())) > 1]:
        shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise MidgptError(f"the processes differ in {shown}; start every process with the same arguments")


def check_devices_alike() -> None:
    """Raise MidgptError unless every process has as many devices: the processes' gathers need it."""
    # Each process sees the total and its own share, so each stops alone: none waits for another.
    if jax.local_device_count() * jax.process_count() != jax.device_count():
        # Process 0 hosts JAX's coordination service, and its exit aborts the others with a C++ stack:
        # it waits for them to say their own line first (under load, one had not yet).
        if jax.process_index() == 0:
            time.sleep(2)
        raise MidgptError(f"the processes have different numbers of devices ({jax.local_device_count()} in this one, "
                          f"{jax.device_count()} in all {jax.process_count()}); give every process as many")


@contextlib.contextmanager
def failing_together():
    """Run the block on every process; an error it raises on any process is raised on all as it ends.

    Where one process alone raised (process 0 writing the run's files), the others would wait for
    it at their next collective, then abort with a C++ stack.
    """
    error = None
    try:
        yield
    except Exception as e:  # a bug's too: the raising process keeps its traceback, the others get its line
        error = e
    if jax.process_count() > 1:  # each process's error line, as UTF-8 bytes
        line = "" if error is None else str(error)
        if error is not None and not isinstance(error, MidgptError):  # a bug's: name its type, as a traceback would
            line = f"{type(error).__name__}: {line}"
        line_bytes = line.encode(errors="backslashreplace")[:1024].ljust(1024, b"\0")  # a path may not be UTF-8
        lines = multihost_utils.process_allgather(np.frombuffer(line_bytes, np.uint8))  # (processes, 1024)
        if error is None and (met := [i for i, row in enumerate(lines) if row.any()]):
            text = bytes(lines[met[0]]).rstrip(b"\0").decode(errors="replace")
            error = MidgptError(f"process {met[0]}: {text}")
    if error is not None:
        raise error


def failed_collective(error: BaseException) -> bool:
    """Whether error is a collective of several processes that failed, as one that stopped leaves the others."""
    # JAX raises it as a JaxRuntimeError, or from some dispatches as a ValueError; the library says which.
    return (jax.process_count() > 1 and isinstance(error, (jax.errors.JaxRuntimeError, ValueError))
            and re.search(r"\b(Gloo|NCCL)\b", str(error)) is not None)


def collective_error(error: BaseException, step: int, fix: str) -> MidgptError:
    """The line for a step whose collective failed: most likely another process stopped."""
    # XLA repeats its prefix once for each nested dispatch.
    what = re.sub(r"(Error dispatching computation: )+", "", str(error).splitlines()[0])
    return MidgptError(f"training stopped at step {step}: a collective across the {jax.process_count()} processes "
                       f"failed ({what}); another process has most likely stopped (see its output); {fix}")


@functools.cache  # the same function for the same mesh: jitted callers take it as a static argument
def gather_params(mesh: Mesh):
    """A function that replicates a pytree of parameters over the mesh, inside jit: FSDP's all-gather.

    The model applies it to each layer's parameters just before their use.
    """
    # Left to itself, XLA keeps the weights sharded and moves activations instead: on 8 devices,
    # openwebtext's step all-gathered the whole batch's tokens and all-reduced [B, T, D] activations per layer.
    replicated = NamedSharding(mesh, P())
    return lambda params: jax.lax.with_sharding_constraint(params, replicated)


@functools.cache  # asked for every batch; the answer never changes during a run
def process_rows(sharding: NamedSharding, shape: tuple[int, ...], batch_axis: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, in order (a mesh may interleave processes)."""
    rows_B = np.arange(shape[batch_axis])
    held = [rows_B[index[batch_axis]] for index in sharding.addressable_devices_indices_map(shape).values()]
    return np.unique(np.concatenate(held))
