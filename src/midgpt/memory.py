"""Per-device memory a run needs, estimated from the config and mesh before anything is allocated."""

import dataclasses
import functools
import math
import os
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from midgpt.config import Config, ModelConfig, steps_a_call
from midgpt.errors import MidgptError
from midgpt.model import REMAT_POLICIES, Block, attention_implementation, cast_floats
from midgpt.precision import compute_dtype
from midgpt.sharding import FSDP, REPLICA, is_abstract, on_cpu


def with_shardings(arrays_like, shardings):
    """(abstract array, its sharding) for each array of a pytree."""
    arrays = jax.tree.leaves(eqx.filter(arrays_like, is_abstract))
    return zip(arrays, jax.tree.leaves(shardings), strict=True)


def tree_bytes(arrays_like) -> int:
    """Bytes of a pytree of arrays, abstract or not, whole."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(arrays_like))


def sharded_bytes(arrays_like, shardings) -> int:
    """Bytes one device holds of a pytree of abstract arrays placed with these shardings."""
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in with_shardings(arrays_like, shardings))


def compute_itemsize(config: Config) -> int:
    """Bytes of one element in the compute dtype that config.compute_dtype runs as."""
    return np.dtype(compute_dtype(config.compute_dtype)).itemsize


def training_attention(config: Config) -> str:
    """The attention implementation that the training step runs (model.attention_implementation)."""
    m = config.model
    return attention_implementation(m.attention, compute_dtype(config.compute_dtype), m.dropout > 0, m.head_dim)


def kept_bytes(m: ModelConfig, dtype: str, remat: str, rows: int) -> int:
    """Bytes that one layer keeps for its backward pass on rows x block_size tokens, as JAX traces it.

    m.attention: "einsum" or "xla", as training_attention resolves it (cuDNN's traces only on a GPU).
    """
    T = m.block_size
    key = jax.random.key(0) if m.dropout > 0 else None  # training draws dropout masks, which remat keeps

    def backward(block, x_BxTxD, sin_TxC, cos_TxC):
        # Traced, as training's are, never made: a block_size of 100,000 made a 9 GiB mask on the host.
        mask_TxS = jnp.tril(jnp.ones((T, T), bool))
        layer = lambda block, x_BxTxD: block(x_BxTxD, sin_TxC, cos_TxC, mask_TxS, key=key)[0]
        if remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat])
        # The function jax.vjp returns holds the residuals: its leaves are what the backward pass reads.
        return jax.vjp(layer, block, x_BxTxD)[1]

    block = eqx.filter_eval_shape(lambda: cast_floats(Block(m, key=jax.random.key(0)), dtype))
    x_BxTxD = jax.ShapeDtypeStruct((rows, T, m.n_embd), dtype)
    table_TxC = jax.ShapeDtypeStruct((T, m.head_dim), np.float32)  # rotary_tables's sin and cos
    return tree_bytes(jax.eval_shape(backward, block, x_BxTxD, table_TxC, table_TxC))


@functools.lru_cache(maxsize=64)  # traced once per model and policy, not once per batch size tried
def layer_bytes_per_row(m: ModelConfig, dtype: str, remat: str, attention: str) -> int:
    """Bytes that one layer keeps for its backward pass per row of block_size tokens, under the remat policy.

    attention: the implementation training runs (training_attention).
    """
    flash = attention == "cudnn"  # keeps no T x T scores, and its trace needs a GPU: the einsum path's, less them
    m = dataclasses.replace(m, attention="einsum" if flash else attention)
    # Two rows less one: the weights, the rotary tables and the mask, which every row shares, cancel.
    row_bytes = lambda cfg: kept_bytes(cfg, dtype, remat, 2) - kept_bytes(cfg, dtype, remat, 1)
    T = m.block_size
    if not flash or T < 2:
        return row_bytes(m)
    # Per row, a layer keeps a T + b T^2 bytes, the T^2 part the scores: solved from T and T / 2.
    t = T // 2
    at_T, at_t = row_bytes(m), row_bytes(dataclasses.replace(m, block_size=t))
    scores = (at_T / T - at_t / t) / (T - t) * T * T
    return round(at_T - scores)


# The most activation_bytes errs high: it came to 1.08-1.44 times what XLA:CPU allocated, for the small
# models that tests/test_memory.py -k close holds to this bound, and to 1.24 times an H200's, once.
ACTIVATIONS_HIGH_BY = 1.5


def activation_bytes(config: Config, mesh: Mesh, pieces: int = 1, chunks: int = 1) -> int:
    """One device's activation memory in a step, with remat as configured, for one of the `pieces` at a time.

    Per layer what remat saved, the internals of the layers in one scan iteration, one loss slice's logits.
    """
    m = config.model
    b = config.batch_size // mesh.size // pieces  # a piece's rows on one device: the batch is split over every device
    T, D, V = m.block_size, m.n_embd, m.vocab_size
    s = compute_itemsize(config)
    dtype, attention = compute_dtype(config.compute_dtype), training_attention(config)
    # Traced, not counted: without remat, a layer keeps float32 copies inside the norms and the GELU
    # too (168 bytes per token and feature at width 128; XLA:CPU allocated 187).
    internals = b * layer_bytes_per_row(m, dtype, "none", attention)
    # A slice's float32 logits and their gradient in the compute dtype (XLA computes the
    # exponentials inside both); the loss's gradients, for the hidden states and the table.
    logits = b * T // chunks * V * (4 + s) + b * T * D * s + V * D * (4 + s)
    if m.scan_unroll >= m.n_layer:
        # No loop: XLA:CPU sees the whole stack and keeps what it likes, the same buffers whatever
        # the remat policy, and fewer than the trace of every layer (0.7 to 0.85 of it).
        return m.n_layer * internals + logits
    # The backward pass makes one scan iteration's internals at a time, all its layers' at once,
    # whatever the remat policy: XLA:CPU held 0.6 to 1.3 times one layer's with a layer an
    # iteration, 1.6 times with two.
    saved = b * layer_bytes_per_row(m, dtype, m.remat, attention)
    return m.n_layer * saved + m.scan_unroll * internals + logits


def gathered_bytes(config: Config, mesh: Mesh, state_like, state_shardings) -> int:
    """Bytes of the sharded parameters that FSDP gathers onto each device, at the most at once."""
    # The embedding (forward to backward), and the layers of two scan iterations (the one running
    # and the next, or its gradient; unrolled whole, each layer's forward gather and the one its
    # recompute makes). Without remat, every layer besides: backward keeps each one's gathered weights,
    # which is all, unrolled whole. On 8 CPU devices: 1.05-1.19 times XLA's, 1 to 8 layers an iteration.
    elements = lambda like, shardings: sum(x.size for x, s in with_shardings(like, shardings)
                                           if not s.is_fully_replicated)
    model, shardings, m = state_like.model, state_shardings.model, config.model
    per_iteration = min(m.scan_unroll, m.n_layer)
    looped = per_iteration < m.n_layer
    layers = m.n_layer + 2 * per_iteration * looped if m.remat == "none" else 2 * per_iteration
    # XLA:CPU runs bf16 collectives in float32; GPUs and TPUs gather the compute dtype.
    itemsize = 4 if on_cpu(mesh) else compute_itemsize(config)
    return (layers * elements(model.blocks, shardings.blocks) // m.n_layer
            + elements(model.embed_VxD, shardings.embed_VxD)) * itemsize


def estimate(config: Config, mesh: Mesh, state_like, state_shardings, pieces: int = 1,
             chunks: int = 1) -> dict[str, int]:
    """Per-device bytes of parameters, gradients, optimiser state, the compute copy, activations, gathered parameters
    and batches, and their total.

    pieces and chunks: as the step cuts micro-batches (step.pieces_per_micro_batch) and logits (step.loss_chunks).
    """
    params = sharded_bytes(state_like.model, state_shardings.model)
    itemsize, param_itemsize = compute_itemsize(config), np.dtype(config.param_dtype).itemsize
    # A cast to the parameters' own dtype copies nothing.
    compute_copy = 0 if itemsize == param_itemsize else params * itemsize // param_itemsize
    # The micro-batches' tokens, x and y in int32: a call's twice (the next is prefetched), an
    # evaluation's; on CPU also the int64 offsets and int32 windows that data.get_batch cuts them from.
    rows, steps = config.batch_size // mesh.size, steps_a_call(config)
    steps = steps if steps <= config.max_steps else 1  # a call of more steps than the run has never comes
    tokens = (2 * steps * config.g_accum_iters + config.eval_iters) * rows * (config.model.block_size + 1)
    batches = tokens * (8 + 12 * on_cpu(mesh))
    parts = {
        "parameters": params,
        # Gradients, plus their running sum when micro-batches (or their pieces) are accumulated.
        "gradients": params * (2 if config.g_accum_iters * pieces > 1 else 1),
        "optimizer": sharded_bytes(state_like.opt_state, state_shardings.opt_state),
        "compute copy": compute_copy,  # the parameters cast for the step's matmuls
        "activations": activation_bytes(config, mesh, pieces, chunks),
        "gathered": gathered_bytes(config, mesh, state_like, state_shardings),
        "batches": batches,
    }
    return {**parts, "total": sum(parts.values())}


def device_memory() -> tuple[int | None, str, bool]:
    """(bytes one device may use, or None where nothing says; where that number comes from; whether its
    allocator refuses past them)."""
    # A GPU's or TPU's allocator refuses, which train.py reports in one line; past a host's memory, a run
    # swaps or is killed.
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"], f"{device.device_kind} memory", True
    if device.platform == "cpu":  # CPU devices share the host's memory, or their container's or job's
        host, source = host_memory()
        return host // jax.local_device_count(), source + (
            f" / {jax.local_device_count()} devices" if jax.local_device_count() > 1 else ""), False
    return None, "unknown", False


def host_memory() -> tuple[int, str]:
    """(bytes of the host's memory, or of its container's or job's limit where lower; which of the two)."""
    host, source = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory"
    if (limit := cgroup_memory_limit()) is not None and limit < host:
        return limit, "the cgroup memory limit of this container or job"
    return host, source


def cgroup_memory_limit(proc: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup") -> int | None:
    """The lowest memory limit of this process's cgroup and those above it (v1 or v2), or None where none is set."""
    # A SLURM job's --mem or a container's limit, on a host with more: past it the kernel kills the run, unwarned.
    try:
        with open(proc, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:  # not Linux
        return None
    limits = []
    for line in lines:
        if line.count(":") < 2:  # not "id:controllers:path", as no kernel writes: nothing to read
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: one hierarchy
            root, name = mount, "memory.max"
        elif "memory" in controllers.split(","):
            root, name = os.path.join(mount, "memory"), "memory.limit_in_bytes"
        else:
            continue
        # The group, then each one above it, whose limits hold too. In a container the mount is its own group.
        groups = [group for group in path.split("/") if group not in ("", ".", "..")]  # never above the mount
        for depth in range(len(groups), -1, -1):
            try:
                with open(os.path.join(root, *groups[:depth], name), encoding="utf-8") as f:
                    text = f.read().strip()
            except (OSError, ValueError):  # not mounted there, no memory controller
                continue
            # v2 writes "max" for no limit, v1 a number near 2**63
            limits += [int(text)] if text.isdigit() and int(text) < 2**62 else []
    return min(limits, default=None)


def peak_in_use() -> int | None:
    """The most bytes a local device has held so far, where the runtime reports it."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def readable(n: int) -> str:
    """Bytes as GiB, or as MiB below one GiB: a small model's memory is not all 0.00 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def smaller_batch(config: Config, mesh: Mesh, available: int, estimate_for) -> Config | None:
    """The run with the largest smaller micro-batch that estimate_for fits in available bytes, or None.

    Its batch divides batch_size, keeps whole rows on every device and the global batch.
    """
    B, devices = config.batch_size, mesh.size
    smaller = lambda b: dataclasses.replace(config, batch_size=b, g_accum_iters=config.g_accum_iters * B // b)
    if B % devices or B == devices or estimate_for(smaller(devices))["total"] > available:
        return None  # not even the smallest fits: the search would try every divisor
    for k in range(2, B // devices + 1):  # b = B / k, from the largest
        if B % k == 0 and B // k % devices == 0 and estimate_for(smaller(B // k))["total"] <= available:
            return smaller(B // k)
    return None


def fixes(config: Config, mesh: Mesh, available: int, estimate_for,
          resuming: bool = False) -> tuple[list[str], list[str]]:
    """(what would bring the run within available bytes a device, what would only in a new run), as flags.

    The batch and remat fixes are those that estimate_for fits; more devices, or sharding, a direction.
    resuming: the run's batch and model are fixed (rundir.FIXED_ON_RESUME); else all are the run's own.
    """
    parts, same, new = estimate_for(config), [], []
    new_run = new if resuming else same
    # Where the parameters, their gradients and Adam's moments alone do not fit, fewer activations cannot help.
    state_fits = parts["parameters"] + parts["gradients"] + parts["optimizer"] < available
    full_remat = dataclasses.replace(config.model, remat="full", scan_unroll=1)
    if state_fits:
        # The fewest activations this run's rows can have: one row a device, each layer recomputed.
        fewest = estimate_for(dataclasses.replace(config, model=full_remat, batch_size=mesh.size))
        rest = fewest["total"] - fewest["activations"] - fewest["batches"]  # fewer tokens is another fix
        if rest <= available < rest + fewest["activations"]:  # devices split rows, never one row
            new_run.append("shorter rows (a smaller --model.block_size)")
            return same, new
    if state_fits and parts["batches"] > available // 2:  # the tokens themselves: only fewer of them help
        per_call = ["--steps_per_call"] if steps_a_call(config) > 1 else []  # a call's steps' batches are stacked
        if resuming:
            same.append(f"fewer tokens at once (a smaller {' or '.join([*per_call, '--eval_iters'])})")
            new.append("fewer tokens at once (a smaller --batch_size or --g_accum_iters)")
        else:
            flags = ["--batch_size", "--g_accum_iters", *per_call, "--eval_iters"]
            same.append(f"fewer tokens at once (a smaller {', '.join(flags[:-1])} or {flags[-1]})")
    smaller = smaller_batch(config, mesh, available, estimate_for) if state_fits else None
    if smaller:
        new_run.append(f"a smaller batch with more accumulation (--batch_size={smaller.batch_size} "
                       f"--g_accum_iters={smaller.g_accum_iters})")
    if state_fits and config.model != full_remat:
        remat = dataclasses.replace(config, model=full_remat)
        if estimate_for(remat)["total"] <= available:
            same.append("full remat, one layer at a time (--model.remat=full --model.scan_unroll=1)")
        elif not smaller and (both := smaller_batch(remat, mesh, available, estimate_for)):  # neither alone fits
            new_run.append("full remat, one layer at a time, with a smaller batch (--model.remat=full --model."
                           f"scan_unroll=1 --batch_size={both.batch_size} --g_accum_iters={both.g_accum_iters})")
    # The devices' own advice, which the estimate cannot check: its state's layout is this mesh's. Parameters
    # are sharded over the fsdp axis alone, so --shard_model=true helps only where that axis has several devices.
    shard = "" if config.shard_model else ", with sharded parameters (--shard_model=true)"
    if shard and mesh.shape[FSDP] > 1:
        same.append("sharded parameters (--shard_model=true)")
    elif mesh.shape[REPLICA] > 1:
        same.append("all devices on the fsdp axis" + (
            ", with sharded parameters (--shard_model=true --mesh_shape=1,-1)" if shard else " (--mesh_shape=1,-1)"))
    else:
        same.append("more devices" + shard)
    if not state_fits:
        new_run.append("a smaller model (fewer --model.n_layer, a smaller --model.n_embd)")
    return same, new


def advice(same: list[str], new: list[str], again: str = "") -> str:
    """fixes' two lists as a clause: "use A, or B[ and AGAIN]; or, in a new --rundir, C"."""
    if not same:  # nothing resumes this run
        return "in a new --rundir, use " + ", or ".join(new)
    clause = "use " + ", or ".join(same) + (f", and {again}" if again else "")
    return clause + (f"; or, in a new --rundir, {', or '.join(new)}" if new else "")


def least_needed(parts: dict[str, int]) -> int:
    """The least a run with these estimated parts may need: its activations ACTIVATIONS_HIGH_BY times smaller.

    The state's bytes are exact; the gathered parameters and the batches are kept whole.
    """
    return parts["total"] - parts["activations"] + int(parts["activations"] / ACTIVATIONS_HIGH_BY)


def check_fits(config: Config, mesh: Mesh, available: int | None, estimate_for, resuming: bool = False,
               hard_limit: bool = False) -> str | None:
    """None if estimate_for(config) (this module's parts) fits in available bytes a device; else raise
    MidgptError, with what to change, or return a warning where hard_limit (device_memory) lets the run try."""
    # With hard_limit the allocator refuses past available: a run that may fit all the same, the estimate
    # being high, is then tried.
    parts = estimate_for(config)
    if available is None or parts["total"] <= available:
        return None
    if hard_limit and (least := least_needed(parts)) <= available:
        return (f"the estimate, {readable(parts['total'])}, exceeds a device's {readable(available)}, but its "
                f"activations may be overstated by up to {ACTIVATIONS_HIGH_BY}x (at least {readable(least)} needed): "
                "trying; if XLA runs out of memory, the run stops with what to change")
    needs = ", ".join(f"{k} {readable(v)}" for k, v in parts.items() if k != "total" and v)
    raise MidgptError(f"this run needs about {readable(parts['total'])} per device ({needs}) but a device has "
                      f"{readable(available)}; " + advice(*fixes(config, mesh, available, estimate_for, resuming)))


# XLA's words for a failed allocation: "Out of memory allocating" (CPU), "... while trying to allocate"
# (GPU), "Ran out of memory in memory space hbm" (TPU), "Failed to allocate request"; not gRPC's
# RESOURCE_EXHAUSTED "message larger than max". A CPU allocation that fails as a computation is dispatched
# comes as "INTERNAL: Error dispatching computation: Out of memory allocating ...".
OUT_OF_MEMORY = re.compile(r"(?:RESOURCE_EXHAUSTED: |INTERNAL: (?:Error dispatching computation: )+)"
                           r"([^\n]*(?:memory|allocat)[^\n]*)", re.IGNORECASE)


def plan(config: Config, mesh: Mesh, estimate_for, say, resuming: bool) -> None:
    """Say the per-device memory estimate; stop before compiling if it cannot fit, warn if it may not."""
    parts = estimate_for(config)
    available, source, hard_limit = device_memory()
    say(f"memory per device, estimated ({compute_dtype(config.compute_dtype)} compute, remat "
        f"{config.model.remat}, attention {training_attention(config)}): "
        + ", ".join(f"{k} {readable(v)}" for k, v in parts.items() if v)
        + (f" of {readable(available)} ({source})" if available else ""))
    warning = check_fits(config, mesh, available, estimate_for, resuming, hard_limit)
    if warning:
        say(warning)


def ran_out(e: BaseException) -> bool:
    """Whether e is XLA's failure to allocate a device's memory (at a compile or a step)."""
    return isinstance(e, jax.errors.JaxRuntimeError) and OUT_OF_MEMORY.search(str(e)) is not None


def out_of_memory(e: BaseException, config: Config, mesh: Mesh, estimate_for, resuming: bool, again: str) -> str:
    """What to say when XLA ran out of device memory: XLA's words, the fixes, and again (how to run once fixed)."""
    detail = OUT_OF_MEMORY.search(str(e))[1].strip()[:160]
    total, available = estimate_for(config)["total"], device_memory()[0]
    # Fixes that need less than was estimated, and than the device has (a run check_fits let try).
    same, new = fixes(config, mesh, min(total, available or total) - 1, estimate_for, resuming)
    return (f"XLA ran out of device memory ({detail}) where about {readable(total)} per device was estimated; "
            + advice(same, new, again))
