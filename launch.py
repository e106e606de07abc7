"""Train a GPT: python launch.py --config=NAME [--rundir=DIR] [--debug] [--FIELD=VALUE ...]"""

import time

from midgpt.cli import ArgumentParser, run
from midgpt.config import apply_overrides, check_config, load_config


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", required=True, help="a module of midgpt.configs, e.g. shakespeare_char")
    parser.add_argument("--rundir", default=None, help="run directory (default: outputs/<timestamp>)")
    parser.add_argument("--debug", action="store_true", help="write a profiler trace of a few steps")
    args, overrides = parser.parse_known_args(argv)
    config = apply_overrides(load_config(args.config), overrides)
    check_config(config)
    rundir = args.rundir or time.strftime("outputs/%Y-%m-%d_%H-%M-%S")
    from midgpt.train import train  # imports JAX: only once the arguments are good

    train(config, rundir, debug=args.debug)


if __name__ == "__main__":
    run(main)
