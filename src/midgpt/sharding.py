"""Device mesh (replica, fsdp) and the rules that place parameters and batches on it.

Parameters, gradients and optimiser state are sharded over the fsdp axis (FSDP);
batches are split over both axes, so replica is pure data parallelism. Inside the
jitted step, the model gathers the parameters of one scan iteration's layers at a
time (the layers run under lax.scan, model.scan_unroll of them an iteration, and
gather_params marks the spot) and XLA sums their gradients back into the shards.
"""

import functools
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from midgpt.config import Config
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
            if fitting == divisors:
                where = f"({_either(fitting)})"
            elif fitting:
                where = f"and that mesh_shape={given} fits ({_either(fitting)}), or pass another --mesh_shape"
            else:
                where = f"({_either(divisors)}) with another --mesh_shape, e.g. --mesh_shape=1,-1"
            raise MidgptError(f"this run's batch_size={B} does not split over the {n} devices of the mesh; "
                              f"resume it on a device count that divides {B} {where}")
        near = [b for b in (B // n * n, B // n * n + n) if b]
        # Below the global batch, more accumulation of the smaller micro-batch can keep it; above, nothing can.
        rows = B * config.g_accum_iters
        keep = f"; g_accum_iters can keep the global batch near {rows} rows" if near[0] < rows else ""
        raise MidgptError(f"batch_size={B} does not split over the {n} devices of the mesh; use a multiple of {n} "
                          f"({' or '.join(f'--batch_size={b}' for b in near)}{keep})")
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

    return jax.tree.map_with_path(sharding, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = DATA_AXES
    return NamedSharding(mesh, P(*spec))


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
