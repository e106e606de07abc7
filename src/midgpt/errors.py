"""The one exception type for bad user input."""


class MidgptError(Exception):
    """Bad input (config, data, run directory); entry points print it as one line and exit 1."""
