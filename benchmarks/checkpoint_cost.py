"""What checkpoints cost: size on disk, blocking and total save time, and the slowdown of training.

python benchmarks/checkpoint_cost.py --config=shakespeare_char [--steps=300] [--interval=100] [--FIELD=VALUE ...]
prints one JSON line. Training uses random tokens; the loops with and without checkpoints
run after the compile, alternating, in the same process, so their ratio is what to quote.
--steps=0 measures the checkpoint alone.
"""

import itertools
import json
import os
import statistics
import tempfile
import time

import equinox as eqx
import jax
import numpy as np

from midgpt import checkpoint
from midgpt.cli import ArgumentParser, add_config_option, positive_int, run
from midgpt.optimizer import make_optimizer
from midgpt.sharding import make_mesh
from midgpt.step import init_state, make_train_step
from train_throughput import checked_config


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__)
    add_config_option(parser, required=True)
    parser.add_argument("--steps", type=int, default=300, help="training steps a loop; 0 times one save only")
    parser.add_argument("--interval", type=positive_int, default=100, help="steps between checkpoints")
    parser.add_argument("--rounds", type=positive_int, default=2, help="loops of each kind, alternating")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 0:
        parser.error(f"--steps must be 0 or more, got {args.steps}")
    if 0 < args.steps < args.interval:  # the loop with checkpoints would save none
        parser.error(f"--interval={args.interval} saves no checkpoint in --steps={args.steps}; "
                     "use an interval of at most --steps")
    config = checked_config(args.config, [*overrides, "--keep_checkpoints=1000000"], list(vars(args)))
    optimizer, mesh = make_optimizer(config), make_mesh(config)
    state = init_state(config, optimizer, mesh)
    train_step = make_train_step(config, optimizer, mesh)
    shape = (config.g_accum_iters, config.batch_size, config.model.block_size)
    x = np.random.default_rng(0).integers(0, config.model.vocab_size, shape, dtype=np.int32)
    state, _ = train_step(state, x, x)  # compile
    jax.block_until_ready(state)
    steps_done = itertools.count(2)

    def train(steps: int, manager=None) -> tuple[float, list[float]]:
        nonlocal state
        blocking = []
        start = time.perf_counter()
        for i in range(1, steps + 1):
            state, metrics = train_step(state, x, x)
            step = next(steps_done)  # distinct across rounds, as in a run
            if manager and i % args.interval == 0:
                float(metrics["loss"])  # as the training loop does before each save
                t = time.perf_counter()
                checkpoint.save(manager, step, state, config)
                blocking.append(time.perf_counter() - t)
        jax.block_until_ready(state)
        if manager:
            manager.wait_until_finished()
        return time.perf_counter() - start, blocking

    with tempfile.TemporaryDirectory() as rundir:
        manager = checkpoint.make_manager(rundir, config)
        t = time.perf_counter()
        checkpoint.save(manager, 0, state, config)
        first_blocking = time.perf_counter() - t
        manager.wait_until_finished()
        total_save = time.perf_counter() - t
        size = directory_bytes(os.path.join(checkpoint.directory(rundir), "0"))
        # Alternate the two loops and keep each one's best time: this machine's noise only adds.
        plain, with_checkpoints, blocking = [], [], []
        for _ in range(args.rounds if args.steps else 0):
            plain.append(train(args.steps)[0])
            seconds, blocked = train(args.steps, manager)
            with_checkpoints.append(seconds)
            blocking += blocked
        manager.close()
    print(json.dumps({
        "config": args.config, "overrides": overrides, "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind, "parameters_and_state_bytes": sum(
            x.nbytes for x in jax.tree.leaves(eqx.filter(state, eqx.is_array))),
        # The first save sets orbax up: apart, or the median of a few saves was mostly it (0.47 s against 0.04 s).
        "checkpoint_bytes": size, "first_save_blocking_s": first_blocking,
        "save_blocking_s_median": statistics.median(blocking or [first_blocking]),
        "save_total_s": total_save, "steps": args.steps, "interval": args.interval,
        "rounds": args.rounds, "train_s_without": min(plain, default=None),
        "train_s_with": min(with_checkpoints, default=None),
        "slowdown": min(with_checkpoints) / min(plain) - 1 if plain else None,
    }))


if __name__ == "__main__":
    run(main)
