"""Files a kill cannot tear (each written beside its path, then renamed over it); the run's .lock and other locks;
a failed write as one line."""

import contextlib
import errno
import fcntl
import os

from midgpt.errors import MidgptError


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace path's contents with data; a reader sees the old file whole or the new one whole."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            # On disk before the rename, which a power cut could otherwise keep without the data.
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except OSError:  # a full disk: leave no half-written file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def writing_to(rundir: str, then: str | None = None):
    """Turn an OSError (a read-only or full disk, a file in the way) into one line naming the run directory.

    then: what to do once the cause is fixed (default: pass another --rundir).
    """
    try:
        yield
    except OSError as e:
        cause = {errno.ENOSPC: "free space", errno.EDQUOT: "free space",
                 errno.EFBIG: "raise the file size limit (ulimit -f)"}.get(e.errno, "fix that")
        advice = f"{cause} and {then}" if then else f"{cause}, or pass a --rundir you can write to"
        raise MidgptError(f"cannot write to {rundir} ({e}); {advice}") from None


LOCK = ".lock"  # in the run directory, held by the launch.py that trains it


def lock_run(rundir: str):
    """Open RUNDIR/.lock holding an exclusive lock, released when it is closed or the process ends."""
    # Two copies of one run (a job requeued while it still runs) would write the same files, and
    # the second's rewind would drop the first's metrics. flock dies with its process: no stale lock.
    os.makedirs(rundir, exist_ok=True)
    f = open(os.path.join(rundir, LOCK), "a")  # written by its holder alone: a refused start changes no file
    try:
        _lock(f, _training(rundir))
    except MidgptError:
        f.close()
        raise
    return f


def check_run_free(rundir: str) -> None:
    """Raise MidgptError if a launch.py holds the lock of the run in rundir; take none."""
    # Shared, and let go at once: the processes of one job, checking together, do not refuse each other.
    try:
        f = open(os.path.join(rundir, LOCK), "rb")  # read: a shared lock over NFS is a POSIX read lock
    except OSError:  # none: no launch holds it (each makes it); unreadable: the run's own checks say so
        return
    with f:
        _lock(f, _training(rundir), fcntl.LOCK_SH)


def _training(rundir: str) -> str:
    return (f"another launch.py is training the run in {rundir}; wait for it to end (or stop it), "
            "or pass another --rundir")


def lock_directory(path: str | os.PathLike, busy: str) -> int:
    """An open descriptor of the directory, exclusively locked until closed or the process ends (no lock file in it).

    busy: the refusal if another process holds it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _lock(fd, busy)
    except MidgptError:
        os.close(fd)
        raise
    return fd


def _lock(file, busy: str, kind: int = fcntl.LOCK_EX) -> None:
    """flock an open file or descriptor (exclusively unless told); MidgptError(busy) if another process holds it."""
    try:
        fcntl.flock(file, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MidgptError(busy) from None
    except OSError:  # a filesystem without locks: go on unguarded, as before
        pass


def read_or_none(path: str | os.PathLike) -> bytes | None:
    """The file's bytes, or None where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
