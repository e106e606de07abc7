"""Command-line plumbing shared by launch.py and sample.py: input errors are one line."""

import argparse
import sys

from midgpt.errors import MidgptError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are MidgptError, so they print as one line like every other."""

    def error(self, message):
        raise MidgptError(f"{message} (see python {self.prog} --help)")


def run(main) -> None:
    """Call main(argv); a MidgptError becomes one line on stderr and exit status 1."""
    try:
        main(sys.argv[1:])
    except MidgptError as e:
        sys.exit(f"error: {e}")
