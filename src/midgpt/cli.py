"""Command-line plumbing: input errors are one line, output survives a closed pipe, signals ask for a stop; the
malloc settings, compilation cache and device start that the entry points share."""

import argparse
import contextlib
import ctypes
import errno
import glob
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

from tqdm import tqdm

from midgpt.config import config_names, nearest
from midgpt.errors import MidgptError


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring's usage lines as written, and each option's default unless its help already says it."""

    def _get_help_string(self, action):
        help = action.help or ""
        if any(action.default is unsaid for unsaid in (None, False, argparse.SUPPRESS)) or "(default" in help:
            return help
        return f"{help} (default: %(default)s)".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are MidgptError, so they print as one line like every other, naming close options."""

    def __init__(self, **kwargs):
        # The script as typed (benchmarks/train_throughput.py, not its base name): "see python PROG --help" then runs.
        kwargs.setdefault("prog", sys.argv[0])
        # No abbreviations: --step would be --steps in one script and a config typo in the next.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(formatter_class=_HelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self.typed = sys.argv[1:] if args is None else list(args)  # for error(): its flags
        return super().parse_known_args(args, namespace)

    def error(self, message):
        # argparse finds a required option missing before it looks at the options it does not know.
        if message.startswith("the following arguments are required: "):
            missing = message.removeprefix("the following arguments are required: ").split(", ")
            flags = [a.partition("=")[0] for a in getattr(self, "typed", ()) if a.startswith("--")]
            slips = [flag for flag in flags if flag not in self._option_string_actions and nearest(flag, missing)]
            if slips:  # --rundri=DIR: "--rundir is required" would not say what was wrong
                message = f"unrecognized arguments: {slips[0]}"
        if message.startswith("unrecognized arguments: "):
            flag = message.removeprefix("unrecognized arguments: ").split()[0].partition("=")[0]
            options = [o for o in self._option_string_actions if o.startswith("--") and o != "--help"]
            close = nearest(flag, options)
            message += (f"; did you mean {' or '.join(close)}?" if close else
                        f"; the options are {', '.join(options)}")
        raise MidgptError(f"{message} (see python {self.prog} --help)")


def add_config_option(parser: argparse.ArgumentParser, help: str = "", **kwargs) -> None:
    """--config, as launch.py and the benchmarks of a config take it, its help naming the configs."""
    parser.add_argument("--config", help=f"{help}{'; ' * bool(help)}a config of midgpt.configs: "
                        f"{', '.join(config_names())}", **kwargs)


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        n = int(text)
    except ValueError:  # argparse would say "invalid positive_int value"
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return n


def run(main) -> None:
    """Call main(argv); a MidgptError becomes one line on stderr and exit status 1."""
    # orbax's background threads log each failure with a traceback, and their first line would do:
    # a failed save is raised again at the next save or wait, and becomes one line here.
    logging.getLogger("absl").addFilter(_one_line)
    sys.unraisablehook = _ignoring_abandoned_io(sys.unraisablehook)
    logging.getLogger("asyncio").addFilter(_drop_never_retrieved)
    # As _drop_never_retrieved says: a coroutine of orbax's, abandoned with a failed read, warned of as it is collected.
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
    keep_freed_memory()
    try:
        main(sys.argv[1:])
    except MidgptError as e:
        exit_in_one_line(str(e))


def exit_in_one_line(message: str) -> None:
    """Write "error: message" as stderr's last line and end the process, from any thread, with status 1."""
    with contextlib.suppress(OSError):  # a closed pipe, a hung-up terminal
        sys.stdout.flush()
        sys.stderr.flush()
    # Other threads are silenced before the line is written: orbax's abandoned reads of a damaged
    # checkpoint print tracebacks as they are collected, in some runs just after it.
    stderr = os.dup(sys.stderr.fileno())
    _discard(sys.stderr)
    with contextlib.suppress(OSError):
        # surrogateescape: a path given in bytes that are not UTF-8 is written back as it came
        os.write(stderr, f"error: {message}\n".encode(errors="surrogateescape"))
    # Not the interpreter's teardown: jax.distributed's exit barrier waits for processes that may
    # never come. Files are closed and saves finished before an error gets here.
    os._exit(1)


def keep_freed_memory(keep: int = 1 << 30) -> None:
    """Have glibc's malloc keep up to `keep` bytes of freed memory for reuse, not hand them back to the kernel."""
    # XLA:CPU allocates a step's buffers and frees them each step. glibc gave the freed top of its
    # heaps back, or unmapped buffers it had mapped alone, and the kernel zero-filled those pages
    # again at the next step. Its own thresholds move as buffers come and go (evaluations moved
    # them, and the steps faulted again); fixed ones do not. 300 steps of `launch.py
    # --config=shakespeare_char_cpu --compute_dtype=float32 --eval_interval=100 --eval_iters=10`
    # took 2.6M page faults (9.4 s of system time, 42 s wall) and 0.19M with the trim threshold and
    # the pad (1.2 s, 36 s); with the mmap threshold too, one later run took 0.16M (1.4 s).
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators are their own
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # malloc.h
    # Buffers under this come from the heaps, not from a mapping of their own; glibc before 2.35 takes at most 32 MiB.
    mallopt(M_MMAP_THRESHOLD, keep) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, keep)  # give memory back only once this much is free at a heap's top,
    mallopt(M_TOP_PAD, keep)  # and then keep this much


def cache_compiled_programs(max_bytes: int = 2 << 30) -> None:
    """Keep every program XLA compiles in ~/.cache/midgpt/xla: a rerun or a resume loads them, not compiles them."""
    import jax  # here, not at the top: the arguments' errors come before its import

    # JAX's own variables win: JAX_COMPILATION_CACHE_DIR for another directory,
    # JAX_ENABLE_COMPILATION_CACHE=false for none, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS for fewer programs.
    if not jax.config.jax_enable_compilation_cache:
        return
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "midgpt", "xla")
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError:  # a home that is not ours to write: every compile as before, without a warning
            return
        if not os.access(cache, os.W_OK):
            return
        jax.config.update("jax_compilation_cache_dir", cache)
    # A size limit makes JAX lock each entry as it reads or writes it: unlocked, an entry is written in
    # place, and another process on this machine (of this run, or another run) could read it half-written.
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", max_bytes)
    # JAX keeps only programs that took a second to compile; reading one back takes milliseconds. A small
    # model's evaluation (0.9 s) and a save's fingerprints (nine programs of 0.07 s) compiled at every launch.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if cache := jax.config.jax_compilation_cache_dir:
        warnings.showwarning = _dropping_unreadable_entries(warnings.showwarning, cache)


def start_devices() -> None:
    """Start JAX's devices now, so that a JAX_PLATFORMS or XLA_FLAGS they cannot start with stops in one line."""
    import jax

    try:
        jax.devices()
    # AssertionError: JAX_PLATFORMS=cuda where no CUDA plugin is installed (jax 0.10 asserts, unsaid why).
    except (RuntimeError, AssertionError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no platform it names is installed"
        platforms = os.environ.get("JAX_PLATFORMS", "")
        raise MidgptError(f"JAX could not start its devices ({detail}); fix or unset "
                          + (f"JAX_PLATFORMS={platforms!r} and " if platforms else "")
                          + "XLA_FLAGS, or install that platform's JAX plugin (see README.md's GPU and TPU: pip "
                            "install -e '.[cuda12]', say)") from None


def _dropping_unreadable_entries(show, cache: str):
    """A warnings.showwarning that removes the cache's entries of a program JAX could not read, and says so."""
    def drop(message, category, *args, **kwargs):
        found = re.match(r"Error reading persistent compilation cache entry for '([^']+)': (.*)", str(message), re.S)
        if not found:
            return show(message, category, *args, **kwargs)
        # JAX compiles the program again, but never writes over an entry (one cut short by a full disk, or
        # a kill as it was written): every later run warned again. Its entries are named for the program.
        for path in Path(cache).glob(glob.escape(found[1]) + "-*"):
            path.unlink(missing_ok=True)
        tqdm.write(f"note: the compiled program {found[1]} in {cache} could not be read "
                   f"({found[2].strip().splitlines()[0]}): compiled again, and cached anew", file=sys.stderr)
    return drop


def _one_line(record: logging.LogRecord, longest: int = 300) -> bool:
    """A logging filter that keeps a record's message on one line, less its traceback and any tensorstore spec."""
    # tensorstore ends each of its errors with the whole spec of what failed: a kilobyte of JSON.
    # orbax quotes a damaged _CHECKPOINT_METADATA whole, however many lines, and restores without it.
    with contextlib.suppress(Exception):  # a malformed record: its handler reports it, as before, not its caller
        message = " ".join(re.sub(r" \[tensorstore_spec='[^']*'\]", "", record.getMessage()).split())
        record.msg, record.args = message if len(message) <= longest else message[:longest] + " ...", ()
    record.exc_info, record.exc_text = None, None
    return True


def _abandoned_by_orbax(exc: BaseException) -> bool:
    """Whether exc ended a read or write that orbax gave up on, whose failure its call raised already."""
    # A damaged checkpoint's restore, or a failed save, raises once, in the call. What it abandoned ends
    # when collected, in some runs before or after the error's line, a traceback each: tensorstore calls
    # back into orbax's closed event loop, or orbax's coroutines and tasks raise their own copies.
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    return any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


def _ignoring_abandoned_io(hook):
    """An unraisable-exception hook that drops _abandoned_by_orbax's exceptions and passes the rest to hook."""
    def ignore(unraisable):
        if unraisable.exc_value is None or not _abandoned_by_orbax(unraisable.exc_value):
            hook(unraisable)
    return ignore


def _drop_never_retrieved(record: logging.LogRecord) -> bool:
    """A logging filter that drops asyncio's "Task (or Future) exception was never retrieved"."""
    # midgpt runs no asyncio of its own: such a task or future is one that orbax or tensorstore
    # abandoned, whose failure was raised once already (a tensorstore future's has no frames to tell).
    return not record.getMessage().partition("\n")[0].endswith("exception was never retrieved")


def named_steps(steps: range) -> str:
    """"step 5" or "steps 5-7", for the lines that say what some steps did."""
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def say(line: str, end: str = "\n") -> bool:
    """Print a line above the progress bar, now; a closed stdout (`| tee` ended by Ctrl-C) stops no run.

    False if this line found stdout's reader gone (later lines go to /dev/null)."""
    stdout = PipeSafe(sys.stdout)
    tqdm.write(line, file=stdout, end=end)
    stdout.flush()
    return not stdout.gone


def _discard(stream) -> None:
    """Point a stream whose reader is gone at /dev/null: later writes, and Python's flush at exit, go nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _reader_gone(e: OSError) -> bool:
    """Whether a write failed because nothing reads the stream any more: a closed pipe, a hung-up terminal."""
    return isinstance(e, BrokenPipeError) or e.errno == errno.EIO


class PipeSafe:
    """A stream for the progress bar that survives its reader's end (`2>&1 | tee log` ended by Ctrl-C, a closed ssh)."""

    def __init__(self, stream):
        self.stream = stream
        self.gone = False  # whether a write found the reader gone

    def write(self, text: str) -> int:
        with self._unless_gone():
            return self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        with self._unless_gone():
            self.stream.flush()

    @contextlib.contextmanager
    def _unless_gone(self):
        """Raise the block's OSError, unless its reader is gone: then later writes go to /dev/null."""
        try:
            yield
        except OSError as e:
            if not _reader_gone(e):
                raise
            _discard(self.stream)
            self.gone = True

    def __getattr__(self, name):  # isatty, fileno, encoding: the stream's own
        return getattr(self.stream, name)

    def __eq__(self, other):  # tqdm.write clears the bars on sys.stdout/sys.stderr, found by ==
        return self.stream == getattr(other, "stream", other)

    def __hash__(self):
        return hash(self.stream)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP ask for a stop where the loop next can (`speak`'s when); a second stops at once."""

    # SIGHUP is a closed terminal or ssh session, which would otherwise end the run without a checkpoint
    # (under nohup, which ignores it, the run goes on).
    # Python runs a handler only when the main thread is back from C++ (a compile, a wait for the
    # device: seconds, or minutes), and takes two signals that came meanwhile for one. But the
    # interpreter writes a byte for each signal to its wakeup fd: a thread counts them there and,
    # once told how (`speak`), says the first one's notice at once.

    def __init__(self):
        self.received, self.noticed = None, False
        self.say, self.when, self.saving = None, "after this step", True
        self.noticing = threading.Lock()  # the thread and the main loop: one of them says the notice

    def speak(self, say, when: str, saving: bool = True) -> None:
        """From now on, say the first signal's notice at once with say (None: say nothing).

        The stop comes `when`, with a checkpoint if saving (not --debug's).
        """
        self.say, self.when, self.saving = say, when, saving
        if say and (notice := self.notice()):  # a signal that came before
            say(notice)

    def __enter__(self):
        read_fd, self.write_fd = os.pipe()
        threading.Thread(target=self._count, args=(read_fd,), daemon=True).start()
        os.set_blocking(self.write_fd, False)  # as set_wakeup_fd requires
        self.previous_fd = signal.set_wakeup_fd(self.write_fd)
        self.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        self.listen()
        return self

    def listen(self) -> None:
        """Take the stop signals (again: jax.distributed.initialize installs a SIGTERM handler of its own).

        Not one the process was started ignoring: nohup's SIGHUP, SIGINT in a script's background job.
        """
        for sig in self._heard():
            signal.signal(sig, self.handle)

    def _heard(self) -> list[int]:
        return [sig for sig, before in self.previous.items() if before != signal.SIG_IGN]

    @contextlib.contextmanager
    def unheard(self):
        """Let stop signals kill the process in the block (a wait in C++, no Python handler runs there); then listen."""
        for sig in self._heard():
            signal.signal(sig, signal.SIG_DFL)
        try:
            yield
        finally:
            self.listen()

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self.previous_fd)
        os.close(self.write_fd)  # the thread reads the end of the pipe, and ends

    def handle(self, signum, frame):
        # Only records: printing here could re-enter a write it interrupted. The thread counts.
        self.received = self.received or signal.Signals(signum).name

    def _count(self, read_fd: int):
        first = None
        with open(read_fd, "rb", buffering=0) as wakeups:
            while byte := wakeups.read(1):
                if byte[0] not in STOP_SIGNALS:  # a signal another library handles
                    continue
                if first is None:
                    first = time.monotonic()
                    self.received = self.received or signal.Signals(byte[0]).name
                    if self.say and (notice := self.notice()):
                        # Not here: a write to a stalled pipe would keep this thread from the second signal.
                        threading.Thread(target=self.say, args=(notice,), daemon=True).start()
                # One Ctrl-C can come twice: from the terminal, and from a wrapper that passes it on.
                elif time.monotonic() - first > 0.1:
                    with contextlib.suppress(OSError):  # os.write: unbuffered, no buffer shared with the main thread
                        os.write(sys.stderr.fileno(), f"\n{signal.Signals(byte[0]).name} again: stopping now, "
                                 "without a checkpoint\n".encode())
                    os._exit(128 + byte[0])

    def notice(self) -> str | None:
        """What to say, once, after the first signal (where the thread did not hear it, the main loop says it)."""
        with self.noticing:
            if self.received and not self.noticed:
                self.noticed = True
                return (f"{self.received}: stopping {self.when}{', with a checkpoint' if self.saving else ''} "
                        "(again to stop at once)")
        return None
