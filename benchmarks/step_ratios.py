"""Step time of several variants of a config, as ratios to the first, timed in interleaved rounds.

python benchmarks/step_ratios.py --config=shakespeare_char [--rounds=3] [--steps=3] -- "" "--model.remat=full" ...
Each variant after -- (a string of --FIELD=VALUE overrides and --xla_NAME=VALUE compile options for
XLA, which override XLA_FLAGS for its step alone; "" is the config as it is) compiles once;
then each round times `steps` steps of every variant in turn, so that a machine whose speed
drifts slows them alike. Prints one JSON line a variant: its median step time each round
and the median of those over the first variant's.
"""

import json
import statistics

from midgpt.cli import ArgumentParser, add_config_option, positive_int, run, say
from midgpt.config import abbreviated
from midgpt.errors import MidgptError
from train_throughput import calls_for, check_device, checked_config, setup, time_steps


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__)
    add_config_option(parser, required=True)
    parser.add_argument("--rounds", type=positive_int, default=3, help="rounds of every variant in turn")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per variant and round (whole calls)")
    parser.add_argument("variants", nargs="+")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # an override before --, where argparse takes it for an option of the script's own
        flag = unknown[0].partition("=")[0]
        # Or one of the script's own, shortened (--round): only those, since config fields are near them by ratio.
        if meant := abbreviated(flag, [f"--{name}" for name in vars(args) if name != "variants"]):
            raise MidgptError(f"unrecognized arguments: {' '.join(unknown)}; did you mean {meant[0]}?")
        raise MidgptError(f"unrecognized arguments: {' '.join(unknown)}; variants go after --, each one quoted: "
                          f'-- "" "{unknown[0]}"')
    # Every variant is checked before the first compiles: a typo in the last should not cost minutes.
    # What needs no devices is checked first, before JAX's import.
    configs, options = [], []
    for variant in args.variants:
        xla = [item for item in variant.split() if item.startswith("--xla_")]
        try:
            if malformed := [item for item in xla if "=" not in item]:
                raise MidgptError(f"{malformed[0]} is not --xla_NAME=VALUE")
            pairs = [item.removeprefix("--").split("=", 1) for item in xla]
            # XLA_FLAGS's true and false: as compile options, XLA takes Python's bools, or "True", not these
            options.append({name: {"true": True, "false": False}.get(value, value) for name, value in pairs})
            configs.append(checked_config(args.config, [item for item in variant.split() if item not in xla]))
        except MidgptError as e:
            raise MidgptError(f"variant {variant!r}: {e}") from None

    import jax  # only once the arguments are good

    from midgpt.sharding import make_mesh

    for variant, config, xla_options in zip(args.variants, configs, options):
        try:
            if xla_options:  # XLA knows each name and value
                jax.jit(lambda: 0).lower().compile(compiler_options=xla_options)
            check_device(config)
            make_mesh(config)  # its batch must split over the devices
        except (MidgptError, jax.errors.JaxRuntimeError) as e:
            raise MidgptError(f"variant {variant!r}: {e}") from None
    records = []
    for variant, config, xla_options in zip(args.variants, configs, options):
        state, train_step, batches = setup(config, xla_options)
        state, _ = time_steps(train_step, state, batches, 2)  # the compile, and a warm-up
        records.append({"variant": variant, "state": state, "step": train_step, "batches": batches, "step_ms": []})
    for _ in range(args.rounds):
        for record in records:
            record["state"], times = time_steps(record["step"], record["state"], record["batches"],
                                                calls_for(args.steps, record["batches"]))
            record["step_ms"].append(1000 * statistics.median(times))
    first = statistics.median(records[0]["step_ms"])
    for record in records:  # the ratio of unrounded times: a 1 ms step's, rounded to 0.1 ms first, was 10% off
        say(json.dumps({
            "config": args.config, "variant": record["variant"], "backend": jax.default_backend(),
            "step_ms_per_round": [round(ms, 2) for ms in record["step_ms"]],
            "ratio": round(statistics.median(record["step_ms"]) / first, 3),
        }))


if __name__ == "__main__":
    run(main)
