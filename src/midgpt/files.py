"""Files a kill cannot tear: each is written beside its path, then renamed over it."""

import contextlib
import os

from midgpt.errors import MidgptError


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace path's contents with data; a reader sees the old file whole or the new one whole."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except OSError:  # a full disk: leave no half-written file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def writing_to(rundir: str, fix: str = "free space, or pass a --rundir you can write to"):
    """Turn an OSError (a read-only or full disk, a file in the way) into one line naming the run directory."""
    try:
        yield
    except OSError as e:
        raise MidgptError(f"cannot write to {rundir} ({e}); {fix}") from None
