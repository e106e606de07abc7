"""Step time of several variants of a config, as ratios to the first, timed in interleaved rounds.

python benchmarks/step_ratios.py --config=shakespeare_char [--rounds=3] [--steps=3] -- "" "--model.remat=full" ...
Each variant after -- (a string of --FIELD=VALUE overrides; "" is the config as it is) compiles once;
then each round times `steps` steps of every variant in turn, so that a machine whose speed
drifts slows them alike. Prints one JSON line a variant: its median step time each round
and the median of those over the first variant's.
"""

import argparse
import json
import statistics

import jax

from train_throughput import setup, time_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each variant per round")
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args()
    runs = []
    for variant in args.variants:
        _, state, train_step, batches = setup(args.config, variant.split())
        state, _ = time_steps(train_step, state, batches, 2)  # the compile, and a warm-up
        runs.append({"variant": variant, "state": state, "step": train_step, "batches": batches, "step_ms": []})
    for _ in range(args.rounds):
        for run in runs:
            run["state"], times = time_steps(run["step"], run["state"], run["batches"], args.steps)
            run["step_ms"].append(round(1000 * statistics.median(times), 1))
    first = statistics.median(runs[0]["step_ms"])
    for run in runs:
        print(json.dumps({
            "config": args.config, "variant": run["variant"], "backend": jax.default_backend(),
            "step_ms_per_round": run["step_ms"], "ratio": round(statistics.median(run["step_ms"]) / first, 3),
        }))


if __name__ == "__main__":
    main()
