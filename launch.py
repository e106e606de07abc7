"""Train a GPT: python launch.py --config=NAME [--rundir=DIR] [--debug] [--multihost] [--FIELD=VALUE ...]

A --rundir that holds checkpoints resumes the run from its newest one, with its saved config.json:
only the --FIELD=VALUE given change it. Where --multihost cannot detect the cluster:
--coordinator_address=HOST:PORT --num_processes=N --process_id=I. Compiled programs are kept for the
next run in ~/.cache/midgpt/xla (JAX_COMPILATION_CACHE_DIR=DIR elsewhere, JAX_ENABLE_COMPILATION_CACHE=false none).
"""

import contextlib
import errno
import itertools
import os
import re
import shutil
import signal
import time

# Until main's StopSignals, in the imports below: a Ctrl-C ends the process quietly (nothing has started),
# not in an import's KeyboardInterrupt traceback. One the process was started ignoring stays ignored.
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from midgpt.cli import (ArgumentParser, StopSignals, add_config_option, cache_compiled_programs, positive_int, run,
                        start_devices)
from midgpt.config import apply_overrides, check_config, leaves, load_config
from midgpt.errors import MidgptError
from midgpt.files import LOCK, check_run_free
from midgpt.metrics import last_step
from midgpt.rundir import (CHECKPOINTS, FIXED_ON_RESUME, FREE_ON_RESUME, check_as_checkpointed, check_saved_config,
                           read_config_json, resume_config, runs_near, saved_steps)

JOIN_TIMEOUT = 300  # seconds a --multihost process waits for the others: JAX's own default
MAX_JOIN_TIMEOUT = 7 * 24 * 3600  # JAX takes C++'s int of seconds: 3e9 was a TypeError, in a traceback


def new_rundir() -> str:
    """outputs/<timestamp>, made now: launches in the same second (a sweep) each get their own."""
    stamp = time.strftime("outputs/%Y-%m-%d_%H-%M-%S")
    for n in itertools.count(1):
        rundir = stamp if n == 1 else f"{stamp}_{n}"
        try:
            os.makedirs(rundir)  # fails if it exists, even if another launch made it a moment ago
            return rundir
        except FileExistsError:
            pass
        except OSError as e:  # outputs/ is a file, or not ours to write
            raise MidgptError(f"cannot make the run directory {rundir} ({e}); "
                              "pass a --rundir you can write to") from None


def holds_nothing(rundir: str) -> bool:
    """Whether rundir holds no more than a run stopped before its config.json leaves: a lock, an empty checkpoints/."""
    checkpoints = os.path.join(rundir, CHECKPOINTS)
    leftovers = {LOCK} | ({CHECKPOINTS} if os.path.isdir(checkpoints) and not os.listdir(checkpoints) else set())
    return not set(os.listdir(rundir)) - leftovers


def check_new_rundir(rundir: str) -> None:
    """Refuse a --rundir where a new run would overwrite files that are not a run's."""
    if os.path.exists(rundir) and not os.path.isdir(rundir):
        raise MidgptError(f"--rundir={rundir} is a file, not a directory; pass a new --rundir")
    if os.path.islink(rundir) and not os.path.exists(rundir):  # os.makedirs would say "File exists"
        try:
            os.stat(rundir)
        except OSError as e:  # a loop of links: the advice below, to make the folder it names, could not fix it
            if e.errno == errno.ELOOP:
                raise MidgptError(f"--rundir={rundir} is a link that leads back to itself; remove it, or pass another "
                                  "--rundir") from None
        raise MidgptError(f"--rundir={rundir} is a link to {os.readlink(rundir)}, which does not exist; make that "
                          "folder, or pass another --rundir")
    if not os.path.isdir(rundir):
        return
    if not holds_nothing(rundir):
        try:
            saved = read_config_json(rundir)
        except MidgptError:  # none, or another program's config.json
            if near := runs_near(rundir, with_step=False, new_run=True):  # a folder of runs, or one of a run's
                raise MidgptError(f"--rundir={rundir} is not a run directory; {near}") from None
            raise MidgptError(f"--rundir={rundir} holds files but no run (no config.json that launch.py wrote), which "
                              "a new run could overwrite; pass a new or empty --rundir") from None
        # A run without checkpoints (--debug's, one killed before its first save) starts afresh, but not
        # one whose logs pass a save it made: its checkpoints/ was removed (every run makes one, --debug's
        # an empty one), and its logs would go too.
        logged = last_step(os.path.join(rundir, "metrics.jsonl"))
        if logged >= saved.checkpoint_interval and not os.path.isdir(os.path.join(rundir, CHECKPOINTS)):
            raise MidgptError(f"--rundir={rundir} logged training up to step {logged} but holds no {CHECKPOINTS}/ "
                              "(removed?); a new run there would overwrite its logs and config.json: pass a new "
                              f"--rundir, or delete {rundir} to train there afresh")


def resumes(rundir: str | None) -> bool:
    """Whether launch resumes the run in rundir (one with a checkpoint, finished or not) rather than start one there."""
    # A run is its checkpoints: a directory without any (--debug's, a run killed before its
    # first save) starts afresh from this command, as its config.json would start at step 0 too.
    return bool(rundir and saved_steps(rundir))


def flag_value(argv: list[str], flag: str) -> str | None:
    """The last value of --flag=VALUE or --flag VALUE in argv, as argparse reads them."""
    found = None
    for arg, value in zip(argv, [*argv[1:], None]):
        found = arg.removeprefix(f"{flag}=") if arg.startswith(f"{flag}=") else value if arg == flag else found
    return found


def fields_help(argv: list[str]) -> str:
    """--help's last lines: every field of the --rundir's run, else of the --config, as the override that keeps it."""
    name, rundir, config = flag_value(argv, "--config"), flag_value(argv, "--rundir"), None
    rundir = rundir and os.path.expanduser(rundir)  # as the parser's type= reads it
    if resumes(rundir):  # else its config.json is written over, and the --config's fields are the new run's
        with contextlib.suppress(MidgptError):  # an unreadable config.json: the resume says so in one line
            config = read_config_json(rundir)
            listed = lambda names: ", ".join(names[:-1]) + " and " + names[-1]
            fixed = [f"model.* ({listed(FREE_ON_RESUME)} may)" if f == "model" else f for f in FIXED_ON_RESUME]
            about = (f"The fields of the run in {rundir}" + (f" (--config={config.name})" if config.name else "")
                     + f", with the values it resumes with; any may follow to change it, but not {listed(fixed)}")
    if config is None:
        try:
            config = load_config(name) if name else None
        except MidgptError:  # an unknown config, a broken file: its run says so in one line, not --help
            pass
        about = f"The fields of --config={name}, with its values; any may follow to change it"
    if config is None:
        return ("Any field of the config may follow as --FIELD=VALUE, e.g. --max_steps=100 --model.n_layer=2;\n"
                "--config=NAME --help lists them, with that config's values (what each means: src/midgpt/config.py).")
    text = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else v
    return (f"{about} (see src/midgpt/config.py):\n"
            + "\n".join(f"  --{k}={text(v)}" for k, v in leaves(config).items() if k != "name"))


def check_cluster_arguments(parser: ArgumentParser, args) -> None:
    """Refuse the --multihost flags that JAX would refuse in a traceback; each may be given alone."""
    if args.num_processes is not None and args.num_processes < 1:  # JAX's word for 0 was about process_id
        parser.error(f"--num_processes must be at least 1, got {args.num_processes}")
    # A process 0 told it is alone waits for no other: it trained the run by itself, and any other process
    # that joined it aborted in C++ ("Unexpected task registered").
    if args.num_processes == 1:
        parser.error("--num_processes=1 with --multihost runs this process alone; give every process the number "
                     "of processes in the run, or drop --multihost for one")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or args.process_id + 1):
        parser.error(f"--process_id must be from 0 to --num_processes - 1, got {args.process_id}")
    if args.coordinator_address is not None and not (
            (port := re.fullmatch(r".+:(\d+)", args.coordinator_address)) and 0 < int(port[1]) < 2**16):
        parser.error(f"--coordinator_address={args.coordinator_address} is not HOST:PORT, a port from 1 to 65535")


def join_processes(args, signals: StopSignals) -> None:
    """Join the other --multihost processes (jax.distributed.initialize), then start and check the devices."""
    import jax

    from midgpt import multihost

    # Before joining: a requeued copy's process joined the running copy's coordinator, and JAX aborted that copy.
    check_run_free(args.rundir)
    if args.process_id == 0 and args.coordinator_address:  # JAX's coordinator would crash on a taken port
        multihost.check_port_free(args.coordinator_address)
    # Said first: a process that never comes leaves the others silent until the timeout.
    timeout = args.join_timeout or JOIN_TIMEOUT
    print(f"waiting for every process to join (jax.distributed.initialize, at most {timeout} s; "
          "Ctrl-C stops it)", flush=True)
    every = f"all {args.num_processes} processes" if args.num_processes else "every process"
    fix = (f"start {every} with the same --coordinator_address and --num_processes, each with its own "
           "--process_id" if args.coordinator_address else "check that every task of the job started")
    cluster = dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                   process_id=args.process_id)
    # It waits in C++ for the other processes, where Python's handlers never run: let Ctrl-C, SIGTERM
    # (scancel, timeout) and SIGHUP kill it. With them handled, it waited out the whole --join_timeout.
    # Listened to again after: initialize took SIGTERM for JAX's preemption notices.
    try:
        with signals.unheard():
            multihost.initialize_within(cluster, timeout, fix)
    except (ValueError, RuntimeError) as e:  # no cluster detected, the coordinator never answered
        raise MidgptError(f"--multihost could not join the other processes ({str(e).strip().splitlines()[0]}); "
                          "where no cluster is detected, pass --coordinator_address=HOST:PORT "
                          "--num_processes=N --process_id=I") from None
    start_devices()
    multihost.check_devices_alike()
    with multihost.failing_together():  # JAX takes process 0's count: another one elsewhere would go unseen
        if args.num_processes not in (None, jax.process_count()):
            # failing_together names the process on the others' lines.
            raise MidgptError(f"--num_processes={args.num_processes}, but {jax.process_count()} joined; give "
                              "every process the same --num_processes")


def main(argv: list[str]) -> None:
    # Heard from the start, as training hears them: a KeyboardInterrupt raised in `import jax` was a
    # traceback, and one raised in a garbage-collection callback of JAX's was dropped and the run went on.
    with StopSignals() as signals:
        launch(argv, signals)


def launch(argv: list[str], signals: StopSignals) -> None:
    parser = ArgumentParser(description=__doc__,
                            epilog=fields_help(argv) if {"-h", "--help"} & set(argv) else None)
    add_config_option(parser, required=True)
    parser.add_argument("--rundir", default=None, type=os.path.expanduser,
                        help="run directory (default: outputs/<timestamp>)")
    parser.add_argument("--debug", action="store_true",
                        help="write a profiler trace of a few steps, and no checkpoints")
    parser.add_argument("--multihost", action="store_true",
                        help="join the other processes with jax.distributed.initialize() (TPU pods, SLURM, ...)")
    parser.add_argument("--coordinator_address",
                        help="with --multihost, where auto-detection fails: HOST:PORT of process 0")
    parser.add_argument("--num_processes", type=int, help="with --multihost, where auto-detection fails")
    parser.add_argument("--process_id", type=int, help="with --multihost, where auto-detection fails")
    parser.add_argument("--join_timeout", type=positive_int,
                        help=f"with --multihost, seconds to wait for every process to join (default: {JOIN_TIMEOUT})")
    args, overrides = parser.parse_known_args(argv)
    cluster_flags = (args.coordinator_address, args.num_processes, args.process_id, args.join_timeout)
    if not args.multihost and any(v is not None for v in cluster_flags):
        parser.error("--coordinator_address, --num_processes, --process_id and --join_timeout need --multihost")
    if (args.join_timeout or 0) > MAX_JOIN_TIMEOUT:
        parser.error(f"--join_timeout must be at most {MAX_JOIN_TIMEOUT} s (a week), got {args.join_timeout}")
    if args.rundir == "":  # an unset $RUNDIR in a resume script would otherwise start a new run
        parser.error("--rundir is empty")
    where = os.path.abspath(args.rundir or "outputs")  # orbax writes to the absolute path, the working directory's too
    try:
        where.encode()
    except UnicodeEncodeError:  # what tensorstore, orbax's writer, fails on, and only at the first save
        parser.error(f"{where} is not UTF-8 text, where checkpoints cannot be written; pass a --rundir whose "
                     "whole path is UTF-8")
    if args.multihost and not args.rundir:  # each process would name its own from its clock
        parser.error("--multihost needs --rundir: one directory that every process writes to")
    check_cluster_arguments(parser, args)  # here, as JAX's own errors are tracebacks
    config = apply_overrides(load_config(args.config), overrides, options=list(vars(args)))
    resume = resumes(args.rundir)
    if resume and args.debug:
        raise MidgptError(f"{args.rundir} holds a run and --debug writes no checkpoints; use a new --rundir")
    if resume:  # the run's own config, with the overrides that keep it the same run
        saved = read_config_json(args.rundir)
        check_as_checkpointed(args.rundir, saved)
        config, changes, kept = resume_config(saved, config, overrides)
        check_saved_config(args.rundir, config, saved, fix="fix it there, or override it: --FIELD=VALUE")
    else:
        check_config(config)
    if args.rundir and not resume:
        check_new_rundir(args.rundir)
    rundir = args.rundir or new_rundir()  # made only now that the arguments are good

    cache_compiled_programs()  # imports jax: only once the arguments are good
    if args.multihost:  # before anything touches a device
        join_processes(args, signals)
    else:
        start_devices()
    notes = []
    if resume:
        notes.append(f"resuming the run in {rundir}" + "".join(f"; {c}" for c in changes))
        if kept:  # overrides the run began with, a default changed since, or a config renamed or removed since
            notes.append(f"the run keeps its saved values where --config={args.config} differs: {', '.join(kept)}")
    elif os.path.exists(os.path.join(rundir, "config.json")):  # a run that saved no checkpoint: nothing to resume
        notes.append(f"{rundir} holds no checkpoint (a --debug run's, or one stopped before its first save): "
                     "training afresh there, from this command's config")
    from midgpt.checkpoint import SAME_COMMAND
    from midgpt.train import train

    try:
        # Without --rundir, the same command would start another run: the line that says how to resume names it.
        resume_with = SAME_COMMAND + ("" if args.rundir else f" with --rundir={rundir}")
        train(config, rundir, debug=args.debug, resume=resume, notes=notes, signals=signals, resume_with=resume_with)
    except BaseException:
        if not args.rundir and holds_nothing(rundir):  # a check of the data or the devices failed: no run to keep
            shutil.rmtree(rundir, ignore_errors=True)
            with contextlib.suppress(OSError):  # and outputs/, if that leaves it empty
                os.rmdir(os.path.dirname(rundir))
        raise


if __name__ == "__main__":
    run(main)
