"""What checkpoints cost: size on disk, blocking and total save time, and the slowdown of training.

python benchmarks/checkpoint_cost.py --config=shakespeare_char [--steps=300] [--interval=100] [--FIELD=VALUE ...]
prints one JSON line. Training uses random tokens and runs steps_per_call to a call, as in launch.py
(--interval is the config's checkpoint_interval, which a call's steps divide; --steps rounds up to whole
calls); the loops with and without checkpoints run after the compile, alternating, in the same process,
so their ratio is what to quote. --steps=0 measures the checkpoint alone.
"""

import itertools
import json
import os
import statistics
import tempfile
import time

from midgpt.cli import ArgumentParser, add_config_option, positive_int, run, say
from train_throughput import calls_for, check_device, checked_config, setup, steps_in, time_steps


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
    config = checked_config(args.config, [*overrides, f"--checkpoint_interval={args.interval}",
                                          "--keep_checkpoints=1000000"], list(vars(args)))

    import equinox as eqx
    import jax  # only once the arguments are good

    from midgpt import checkpoint
    from midgpt.memory import tree_bytes

    check_device(config)
    state, train_step, batches = setup(config)
    state, _ = time_steps(train_step, state, batches, 1)  # compile
    per_call = steps_in(batches[0])
    calls_done = itertools.count(1)

    def train(steps: int, manager=None) -> tuple[float, list[float]]:
        nonlocal state
        blocking = []
        start = time.perf_counter()
        for i in range(1, calls_for(steps, batches) + 1):
            x = batches[i % len(batches)]
            state, metrics = train_step(state, x, x)
            step = per_call * next(calls_done)  # distinct across rounds, as in a run
            if manager and i * per_call % args.interval == 0:
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
    say(json.dumps({
        "config": args.config, "overrides": overrides, "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind, "parameters_and_state_bytes":
            tree_bytes(eqx.filter(state, eqx.is_array)),
        # The first save sets orbax up: apart, or the median of a few saves was mostly it (0.47 s against 0.04 s).
        "checkpoint_bytes": size, "first_save_blocking_s": first_blocking,
        "save_blocking_s_median": statistics.median(blocking or [first_blocking]),
        "save_total_s": total_save, "steps": per_call * calls_for(args.steps, batches),
        "steps_per_call": per_call, "interval": args.interval, "saves_per_round": len(blocking) // args.rounds,
        "rounds": args.rounds, "train_s_without": min(plain, default=None),
        "train_s_with": min(with_checkpoints, default=None),
        "slowdown": min(with_checkpoints) / min(plain) - 1 if plain else None,
        # What the figures above were taken from: how far the rounds spread says how far to trust them.
        "train_s_without_rounds": plain, "train_s_with_rounds": with_checkpoints, "save_blocking_s": blocking,
    }))


if __name__ == "__main__":
    run(main)
