"""Train a GPT: python launch.py --config=NAME [--rundir=DIR] [--debug] [--FIELD=VALUE ...]"""

import argparse
import sys
import time

from midgpt.config import apply_overrides, check_config, load_config
from midgpt.errors import MidgptError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other input error
        raise MidgptError(f"{message}; usage: {self.format_usage().strip().removeprefix('usage: ')}")


def main(argv: list[str]) -> None:
    parser = _Parser(description=__doc__, allow_abbrev=False)
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
    try:
        main(sys.argv[1:])
    except MidgptError as e:
        sys.exit(f"error: {e}")
