"""The one exception type the entry points print in one line: bad input, or a run that cannot go on."""


class MidgptError(Exception):
    """What the user must act on: bad input (config, data, run directory) or a run that cannot go on (out of memory,
    a failed save, a lost process); entry points print it as one line and exit 1."""
