"""Files a kill cannot tear: each is written beside its path, then renamed over it."""

import os


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace path's contents with data; a reader sees the old file whole or the new one whole."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic on POSIX within one file system
