"""What the processes of a multi-host run agree on: joining in time, the same arguments and devices, their errors.

JAX's multi-controller model runs the same program on every process; a process that stops alone, or runs
another config, leaves the others waiting at their next collective. These checks make them stop together.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from midgpt.cli import exit_in_one_line
from midgpt.config import Config, leaves
from midgpt.errors import MidgptError
from midgpt.files import LOCK, read_or_none, writing_to
from midgpt.prepare import DATA_IDENTITY


def check_port_free(coordinator_address: str) -> None:
    """Refuse a --coordinator_address whose port process 0 cannot listen on (another program's, or root's alone)."""
    port = int(coordinator_address.rpartition(":")[2])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):  # the coordinator listens on [::]
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the coordinator's server binds it
            try:
                probe.bind((host, port))
                return
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    why = ("another program holds it, or another process 0 (give each --process_id to one process); "
                           "pick a free port")
                elif e.errno == errno.EACCES:  # a port this user may not take, held or not
                    why = ("ports below 1024 need root; pick a free port of 1024 or more" if port < 1024 else
                           "this user may not listen on it; pick another free port")
                else:  # no IPv6 here: try IPv4; neither (a sandbox): let JAX try
                    continue
                raise MidgptError(f"--coordinator_address={coordinator_address}: process 0 cannot listen on port "
                                  f"{port} ({e.strerror}): {why}, the same for every process") from None


def initialize_within(cluster: dict, timeout: int, fix: str) -> None:
    """jax.distributed.initialize(**cluster); if the others have not all joined in timeout s, one line and exit 1."""
    # JAX's own timeout ends in a C++ abort and a stack trace (that "another task died"): this one comes
    # first. initialize releases the GIL as it waits, so the timer's thread runs.
    returned, deciding = threading.Event(), threading.Lock()  # no process whose initialize returned is stopped

    def give_up():
        with deciding:
            if not returned.is_set():
                exit_in_one_line(f"not every process joined within {timeout} s (one that stopped says why in its "
                                 f"own output); {fix}, or give them longer (--join_timeout)")

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(**cluster, initialization_timeout=timeout + 60)
    finally:  # returned, or raised its own error
        with deciding:
            returned.set()
        timer.cancel()


def check_same_arguments(config: Config, rundir: str, debug: bool, resume: bool, compute_dtype: str) -> None:
    """Raise MidgptError, naming what differs, unless every process runs this config in this run directory alike."""
    # A process with other arguments hangs the others at its first collective (another --rundir:
    # at the first save, in orbax's commit), or trains a run that config.json does not record.
    if jax.process_count() == 1:
        return
    check_devices_alike()
    fields = {f"--{name}": value for name, value in leaves(config).items() if name != "name"}
    # What a command names first, first: another --config differs in many fields too, which would hide it.
    arguments = {"--config": config.name, "--rundir (as an absolute path)": os.path.abspath(rundir),
                 "--debug": debug, **fields, "files in --rundir (it must be on a filesystem every host sees)": resume,
                 "compute_dtype auto (CPUs of other kinds: pass --compute_dtype)": compute_dtype}
    if differ := differing({name: json.dumps(value).encode() for name, value in arguments.items()}):
        shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise MidgptError(f"the processes differ in {shown}; start every process with the same arguments")


def check_same_data(data_dir: str, meta: bytes) -> None:
    """Raise MidgptError unless every process's data is the same (meta.json's vocabulary, sizes and checksums)."""
    # Each host reads its own data_dir: another copy's token ids trained the run, silently, on two vocabularies.
    if jax.process_count() == 1:
        return
    saved = json.loads(meta)  # load_splits has read it
    if differ := differing({key: json.dumps(saved.get(key)).encode() for key in DATA_IDENTITY}):
        raise MidgptError(f"{data_dir} holds other data on some hosts ({', '.join(differ)} in its meta.json differ "
                          "between processes); prepare the same data on every host (copy one host's), or put it "
                          "where every host sees it")


def differing(values: dict[str, bytes]) -> list[str]:
    """The names whose values are not the same on every process (a collective: every process calls it)."""
    digests = [hashlib.sha256(value).digest()[:4] for value in values.values()]
    gathered = multihost_utils.process_allgather(np.frombuffer(b"".join(digests), np.int32))  # processes x values
    return [name for name, column in zip(values, gathered.T) if len(set(column.tolist())) > 1]


def check_same_rundir(rundir: str) -> None:
    """Raise MidgptError unless every process sees what process 0 writes in rundir (process 0 holds its lock)."""
    # orbax commits a checkpoint once every process's part is in its folder: a new run whose --rundir was each
    # host's own disk trained to its end, then waited for ever, no save committed.
    if jax.process_count() == 1:
        return
    token = np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(16), np.uint8))).tobytes()
    path = os.path.join(rundir, LOCK)  # its holder alone writes it; other launches only open it to try the lock
    with failing_together(), writing_to(rundir):
        if jax.process_index() == 0:
            with open(path, "wb") as f:
                f.write(token)
    with failing_together():
        if jax.process_index() != 0 and read_or_none(path) != token:
            raise MidgptError(f"{rundir} is not the directory process 0 writes in (its {LOCK} is missing or "
                              "another's): --rundir must be on a filesystem every host sees")


def check_devices_alike() -> None:
    """Raise MidgptError unless every process has as many devices: the processes' gathers need it."""
    # Each process sees the total and its own share, so each stops alone: none waits for another.
    if jax.local_device_count() * jax.process_count() != jax.device_count():
        # Process 0 hosts JAX's coordination service, and its exit aborts the others with a C++ stack:
        # it waits for them to say their own line first (under load, one had not yet).
        if jax.process_index() == 0:
            time.sleep(2)
        raise MidgptError(f"the processes have different numbers of devices ({jax.local_device_count()} in this one, "
                          f"{jax.device_count()} in all {jax.process_count()}); give every process as many")


@contextlib.contextmanager
def failing_together():
    """Run the block on every process; an error it raises on any process is raised on all as it ends."""
    # Where one process alone raised (process 0 writing the run's files), the others would wait for
    # it at their next collective, then abort with a C++ stack.
    error = None
    try:
        yield
    except Exception as e:  # a bug's too: the raising process keeps its traceback, the others get its line
        error = e
    if jax.process_count() > 1:  # each process's error line, as UTF-8 bytes
        line = "" if error is None else str(error)
        # A bug's, or an error without a message (which the others would take for none): name its type, as a
        # traceback would.
        if error is not None and not (isinstance(error, MidgptError) and line):
            line = f"{type(error).__name__}: {line}"
        line_bytes = line.encode(errors="backslashreplace")[:1024].ljust(1024, b"\0")  # a path may not be UTF-8
        try:
            lines = multihost_utils.process_allgather(np.frombuffer(line_bytes, np.uint8))  # (processes, 1024)
        except Exception as e:  # a process that stopped before it (a host's own error, outside such a block)
            if error is not None and not failed_collective(error):
                pass  # this process's own error, raised below, says more
            elif failed_collective(e):  # not a traceback, then JAX's abort as it waits for that process at exit
                raise collective_error(e, "once every process has stopped, fix what stopped the other and run the "
                                          "same command again") from None
            else:
                raise
        if error is None and (met := [i for i, row in enumerate(lines) if row.any()]):
            text = bytes(lines[met[0]]).rstrip(b"\0").decode(errors="replace")
            error = MidgptError(f"process {met[0]}: {text}")
    if error is not None:
        raise error


def compile_together(lowered: jax.stages.Lowered) -> None:
    """Compile a program on every process, then wait for all to have: none runs its first collective alone."""
    # Gloo gives the processes 30 s to meet at the first collective of a group of devices (its deadline
    # to connect them, which XLA does not let be set), and the first step's gathers are: one process
    # that compiled the step that much longer (a loaded host, or the only one to miss the compilation
    # cache) failed both. check_same_arguments' gather connected the processes already, and a wait in a
    # connected group has no such deadline (200 s, tried).
    lowered.compile()  # jax.jit's call finds it in its cache
    multihost_utils.sync_global_devices("midgpt: compiled")


class LostProcess(MidgptError):
    """A collective of several processes failed, as one that stopped leaves the others; `what` is JAX's word."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


def failed_collective(error: BaseException) -> bool:
    """Whether error is a collective of several processes that failed, as one that stopped leaves the others."""
    # JAX raises it as a JaxRuntimeError, or from some dispatches as a ValueError; the library says which.
    return isinstance(error, LostProcess) or (
        jax.process_count() > 1 and isinstance(error, (jax.errors.JaxRuntimeError, ValueError))
        and re.search(r"\b(Gloo|NCCL)\b", str(error)) is not None)


def collective_error(error: BaseException, fix: str, step: int | None = None) -> LostProcess:
    """The line for a collective that failed (a step's, if step is given): most likely another process stopped."""
    # XLA repeats its prefix once for each nested dispatch.
    what = error.what if isinstance(error, LostProcess) else re.sub(
        r"(Error dispatching computation: )+", "", str(error).splitlines()[0])
    return LostProcess(("" if step is None else f"training stopped at step {step}: ") + f"a collective across the "
                       f"{jax.process_count()} processes failed ({what}); another process has most likely stopped "
                       f"(see its output); {fix}", what)
