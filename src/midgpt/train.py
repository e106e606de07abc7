"""The plain Python loop around the training step (step.py): data, evaluation, logs, checkpoints, stops."""

import contextlib
import json
import math
import os
import shlex
import sys
from collections.abc import Iterator, Sequence

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from midgpt import checkpoint, cli, data, memory, mfu, multihost, precision, sharding
from midgpt.config import Config, config_to_dict, steps_a_call
from midgpt.errors import MidgptError
from midgpt.files import lock_run, write_atomically, writing_to
from midgpt.metrics import MetricsLog
from midgpt.model import GPT, check_cudnn, count_params
from midgpt.optimizer import lr_at, make_optimizer, schedule_note
from midgpt.profiler import TraceWindow
from midgpt.step import (eval_loss, fresh_state, init_state, loss_chunks, make_train_step, memory_estimator,
                         pieces_per_micro_batch, state_layout)


def calls(start: int, config: Config, traced: range) -> Iterator[range]:
    """The steps after start as the loop runs them: steps_a_call at a time, ending where the loop acts, or one
    at a time where they do not fit (a resume off that grid, the last steps, `traced` ones): two programs."""
    n, step = steps_a_call(config), start + 1
    alone = {*traced, traced.start - 1} if traced else set()  # the trace starts and stops between calls
    while step <= config.max_steps:
        last = step + n - 1
        whole = (step - 1) % n == 0 and last <= config.max_steps and not any(step <= s < last for s in alone)
        yield range(step, last + 1) if whole else range(step, step + 1)
        step += n if whole else 1


def evaluate(model: GPT, tokens, config: Config, mesh: Mesh, stream: int) -> float:
    """Mean loss over eval_iters batches; the same batches at every evaluation."""
    x_ExBxT, y_ExBxT = data.global_batch(tokens, (config.seed, stream), config.eval_iters, config, mesh)
    pieces = pieces_per_micro_batch(config, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, eqx.filter(model, eqx.is_array))
    return float(eval_loss(model, x_ExBxT, y_ExBxT, config.compute_dtype, pieces, sharding.gather_params(mesh),
                           loss_chunks(config, mesh, pieces), shardings))


def load_data(config: Config, rundir: str, resume: bool) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(train tokens, val tokens, the data's meta.json), the same on every process and, on a resume, the run's own."""
    # meta.json is read around the tokens: prepare.py renames its files over the old ones, meta.json last. Read
    # again at the copy into the run, seconds later, it was of the data prepared since, and a resume on that
    # passed as the run's own.
    meta = data.meta_bytes(config.data_dir)
    with multihost.failing_together():  # a host without the data, or whose copy changed: every process stops
        if resume:  # first: load_splits' advice for a larger vocabulary would be another model
            data.check_same_data(rundir, config.data_dir)
        train_tokens, val_tokens = data.load_splits(config)
        if data.meta_bytes(config.data_dir) != meta:
            raise MidgptError(f"{config.data_dir} was prepared again as this run started; run the same command again")
    multihost.check_same_data(config.data_dir, meta)
    return train_tokens, val_tokens, meta


def open_checkpoints(config: Config, rundir: str, debug: bool, say):
    """The run's checkpoint manager, its folder cleared of unfinished saves and checked writable; None with --debug."""
    if debug:  # an empty checkpoints/: logs past checkpoint_interval without a save are a debug run's, not a loss
        with writing_to(rundir):
            os.makedirs(checkpoint.directory(rundir), exist_ok=True)
        say("debug: no checkpoints are written")
        return None
    multihost.check_same_rundir(rundir)
    with multihost.failing_together(), writing_to(rundir):  # not in orbax's barrier, where the others wait
        if jax.process_index() == 0:
            checkpoint.delete_unfinished_saves(rundir)
    with writing_to(rundir):
        manager = checkpoint.make_manager(rundir, config)
    with multihost.failing_together(), writing_to(rundir):
        checkpoint.check_writable(rundir)
    return manager


def write_config(config: Config, rundir: str, meta: bytes):
    """config.json, and meta (the data's meta.json, read with its tokens): the run decodes them anywhere, as trained."""
    if jax.process_index() == 0:
        os.makedirs(rundir, exist_ok=True)
        write_atomically(os.path.join(rundir, "config.json"), json.dumps(config_to_dict(config), indent=2))
        write_atomically(os.path.join(rundir, "meta.json"), meta)


# A uniform guess over the vocabulary scores ln V; real loss spikes stay near or below it.
DIVERGED_LOSS = 3  # times ln V


def check_diverged(metrics: dict, step: int, last_checkpoint: int | None, vocab_size: int,
                   resume_with: str = checkpoint.SAME_COMMAND):
    """Stop a diverged run before it saves: a metric that is not finite, a loss far worse than a uniform
    guess's, or a gradient that is exactly zero. The evaluation's losses too, where metrics has them."""
    kept = (f"checkpoint {last_checkpoint} is untouched: lower --learning_rate and run {resume_with} to resume from it"
            if last_checkpoint else
            f"no checkpoint was written: run {checkpoint.SAME_COMMAND} with a lower --learning_rate to start again")
    # param_norm and the evaluation's losses: of the updated parameters, which a checkpoint saves. The step's
    # loss is of the parameters before its update, which a learning rate of 1e3 took from 2.2 to 2e6 at once.
    values = {name: float(metrics[name]) for name in ("loss", "grad_norm", "param_norm", "train_loss", "val_loss")
              if name in metrics}
    for name, value in values.items():
        if not math.isfinite(value):
            raise MidgptError(f"{name} is {value} at step {step}: training diverged; {kept}")
    # A learning rate of 10 took the loss to 16444 and on, finite, and saved such checkpoints over the good ones.
    uniform = math.log(vocab_size)
    for name in ("loss", "train_loss", "val_loss"):
        if values.get(name, 0) > DIVERGED_LOSS * uniform:
            raise MidgptError(f"{name} is {values[name]:.4g} at step {step}: training diverged (over {DIVERGED_LOSS} "
                              f"times the {uniform:.2f} of a uniform guess over {vocab_size} tokens); {kept}")
    # A learning rate of 1e6 grew the parameters to 1e9 and the loss stayed finite: the norms then flatten
    # every logit, no gradient moves them again, and the saves that follow would rotate away the good ones.
    if values["grad_norm"] == 0:
        raise MidgptError(f"grad_norm is 0.0 at step {step}: training diverged (every gradient is zero: the "
                          f"parameters grew past where any moves them, to a norm of {values['param_norm']:.3g}); "
                          f"{kept}")


def say_setup(config: Config, model: GPT, mesh: Mesh, rundir: str, pieces: int, timer: mfu.StepTimer, say):
    """The lines that describe a run before its first step: its size, devices, and what MFU is against."""
    n, processes = jax.device_count(), jax.process_count()
    say(f"{count_params(model):,} parameters; mesh {dict(mesh.shape)} over {n} {jax.devices()[0].platform} "
        f"device{'s' * (n > 1)} in {processes} process{'es' * (processes > 1)}; run directory {rundir}")
    if pieces > 1:
        say(f"each micro-batch of {config.batch_size} rows runs as {pieces} of {config.batch_size // pieces} "
            "in training and evaluation: faster on a lone CPU")
    if (per_call := steps_a_call(config)) < config.steps_per_call:
        say(f"steps_per_call={config.steps_per_call} runs {per_call} at a time: a call ends where the loop logs, "
            f"evaluates or saves, so it divides log_interval, eval_interval and checkpoint_interval")
    step_flops = mfu.flops_per_token(config.model) * timer.tokens_per_step
    say(f"MFU is against the {timer.source}: {timer.peak / 1e12:.3g} TFLOP/s per device, "
        f"{n} device{'s' * (n > 1)}; {step_flops / 1e9:.4g} GFLOP a step")


def compiled_line(config: Config, steps: range, seconds: float, start: int, peak_memory: int | None) -> str:
    """What a program's first call took, compile included; and a resume's learning rate, which a longer
    lr_decay_steps moves (its cosine, stretched, rises again)."""
    resumed_here = start and steps[0] == start + 1
    return (f"{cli.named_steps(steps)} (compile included) took {seconds:.1f} s"
            + (f", {'at' if len(steps) == 1 else 'from'} learning rate {lr_at(config, start):.3g}"
               if resumed_here else "")
            + (f"; peak memory {memory.readable(peak_memory)} per device" if peak_memory else ""))


def train(config: Config, rundir: str, debug: bool = False, resume: bool = False, notes: Sequence[str] = (),
          signals: cli.StopSignals | None = None, resume_with: str = checkpoint.SAME_COMMAND) -> GPT:
    """Train into rundir (config.json, meta.json, metrics.jsonl, TensorBoard events, checkpoints/), resuming if asked.

    Every process runs it (JAX's multi-controller model) and saves its part of each checkpoint; process 0 alone
    writes the run's other files and prints (but for a stop's notice).
    """
    # Process 0 prints the notes (launch.py's word on a resume) once no other launch holds the run. A stop
    # signal (`signals`, launch.py's since it began, else heard from here on) stops it where the loop next can (below);
    # resume_with is the command that resumes the run, for the lines that say so.
    with contextlib.ExitStack() as held:  # held: the run directory's lock, and signals if they are ours
        # Heard from the start, not only in the loop: after jax.distributed.initialize, JAX's own
        # SIGTERM handler would take a signal during the restore or the compile and only note it.
        signals = signals or held.enter_context(cli.StopSignals())
        return _train(config, rundir, debug, resume, notes, signals, held, resume_with)


def _train(config: Config, rundir: str, debug: bool, resume: bool, notes: Sequence[str], signals: cli.StopSignals,
           held: contextlib.ExitStack, resume_with: str) -> GPT:
    # Read before the processes first meet, so before process 0 can have made it: all agree.
    existed = os.path.isdir(rundir)
    compute_dtype = precision.compute_dtype(config.compute_dtype)  # "auto" by this host's CPU, so it is compared
    multihost.check_same_arguments(config, rundir, debug, resume, compute_dtype)
    check_cudnn(config.model, compute_dtype, jax.devices()[0])
    train_tokens, val_tokens, meta = load_data(config, rundir, resume)
    mesh = sharding.make_mesh(config, resuming=resume)
    is_main = jax.process_index() == 0
    say = cli.say if is_main else lambda _: None
    # Several processes agree on a stop only at log steps, where they sync anyway; one stops after the call
    # under way, whose steps run as one program.
    per_call = steps_a_call(config)
    stop_after = ("at the next log step" if jax.process_count() > 1 else
                  "after this step" if per_call == 1 else "after the steps under way")
    # Every process: the stop's notice goes to the terminal it was asked in, named where logs merge (srun).
    signals.speak(cli.say if is_main else lambda line: cli.say(f"process {jax.process_index()}: {line}"), stop_after,
                  saving=not debug)

    def lock():  # process 0 holds it; if it is refused, every process stops
        with multihost.failing_together(), writing_to(rundir):
            if is_main:
                held.enter_context(lock_run(rundir))

    # A directory that exists may hold a run in training: locked before anything is said, a second
    # launch prints only its refusal. A --rundir that does not exist yet is made by its lock, at the
    # first write, so that failed checks leave none.
    if existed:
        lock()
    for note in notes:
        say(note)
    say("config: " + json.dumps(config_to_dict(config)))
    optimizer = make_optimizer(config)
    # The state's shapes and layout, without computing it: for the memory plan and a restore.
    like = eqx.filter_eval_shape(fresh_state, config, optimizer)
    shardings, _ = state_layout(config, optimizer, mesh)
    estimate_for = memory_estimator(mesh, like, shardings)
    memory.plan(config, mesh, estimate_for, say, resume)  # before anything is written, so a retry starts afresh
    pieces = pieces_per_micro_batch(config, mesh)
    if not existed:  # before the first write
        lock()
    manager = open_checkpoints(config, rundir, debug, say)

    state, start = None, 0
    if resume:
        found = checkpoint.restore_newest(manager, rundir, like, shardings, say)
        if found:
            state, start = found
        say(f"resuming from checkpoint {start}" if found else "no checkpoint to resume from: starting at step 0")
        if start >= config.max_steps:  # the run is left as it was: its config.json is of the steps it ran
            past = "" if start == config.max_steps else f", and passed (the run is at step {start})"
            say(f"max_steps={config.max_steps} is reached{past}: nothing to train; the run and its "
                "config.json are left as they were (a larger --max_steps goes on)")
            if manager:
                checkpoint.close(manager, resume_with)
            return state.model
    if note := schedule_note(config):
        say(note)
    last_checkpoint = start or None
    # Mid-run, the fix for a full disk is to resume, not to start over elsewhere.
    resume_fix = lambda changed="": (
        f"run {resume_with}{changed} to resume from checkpoint {last_checkpoint}" if last_checkpoint
        else f"run {checkpoint.SAME_COMMAND}{changed} to start again (no checkpoint yet)")
    # After the restore, which may refuse the run directory. A full disk, a hand-edited metrics.jsonl:
    # process 0's alone, and every process stops on it. The logs first: a resume they refuse leaves the
    # run's config.json as it was, not with the overrides of a command that never ran.
    with multihost.failing_together(), writing_to(rundir, resume_fix()) if last_checkpoint else writing_to(rundir):
        log = MetricsLog(rundir, start, json.dumps(config_to_dict(config), indent=2)) if is_main else None
        write_config(config, rundir, meta)
    if state is None:
        state = init_state(config, optimizer, mesh)
    train_step = make_train_step(config, optimizer, mesh, pieces)
    tokens_per_step = config.g_accum_iters * config.batch_size * config.model.block_size
    timer = mfu.StepTimer(config.model, tokens_per_step, compute_dtype)
    say_setup(config, state.model, mesh, rundir, pieces, timer, say)
    trace = TraceWindow(start, config.max_steps, rundir, debug, say, records=is_main)  # one trace, process 0's

    # Off a terminal (CI, log files), redraw rarely rather than fill the log with frames.
    bar = tqdm(initial=start, total=config.max_steps, desc="train", dynamic_ncols=True, disable=not is_main,
               mininterval=0.1 if sys.stderr.isatty() else 30, file=cli.PipeSafe(sys.stderr))
    make_batches = lambda steps: data.global_batch(  # of one step, or stacked for several
        train_tokens, [(config.seed, data.TRAIN_STREAM, step) for step in steps] if len(steps) > 1
        else (config.seed, data.TRAIN_STREAM, steps[0]), config.g_accum_iters, config, mesh
    )
    peak_memory, speed = None, {}  # speed: the bar's last measured tokens/s and MFU
    timer.restart()
    step = start  # for an error before the first step
    stopped = False  # by a stop signal: not finished
    called = set()  # which of the step's two programs have run: one step a call (False), several (True)

    try:
        for steps, (x, y) in data.prefetch(make_batches, calls(start, config, trace.steps)):
            step = steps[-1]  # the loop acts after the call's last step alone
            is_eval = step % config.eval_interval == 0 or step == config.max_steps
            is_log = is_eval or step % config.log_interval == 0
            # An evaluation is a jitted call a split (minutes of shakespeare_char's on a CPU), and a stop waits for
            # it: a resume would not evaluate this step again.
            ending = "this step" if len(steps) == 1 else f"step {step}"
            after_call = f"after {ending}" if jax.process_count() == 1 else stop_after
            signals.when = f"after {ending}'s evaluation" if is_eval else after_call
            # The first call of each of the two programs compiles it (or loads it from the cache): the run's
            # first call, and the other program's first, at the last steps, a resume off the grid or a trace.
            stacked = len(steps) > 1
            compiles = stacked not in called
            called.add(stacked)
            if compiles:
                jax.block_until_ready(state)  # so that the line below times this call alone
                timer.restart()
                if jax.process_count() > 1:  # its first step meets the others in time
                    multihost.compile_together(train_step.lower(state, x, y))
            trace.before(steps[0])
            state, metrics = train_step(state, x, y)
            bar.update(len(steps))
            timer.tick(len(steps))
            if trace.after(step, state):
                timer.restart()  # traced steps are slower: not timed
            if compiles:  # leave the compile out of the throughput
                jax.block_until_ready(state)
                peak_memory = memory.peak_in_use()
                say(compiled_line(config, steps, timer.seconds, start, peak_memory))
                timer.restart()

            if is_log:
                check_diverged(metrics, step, last_checkpoint, config.model.vocab_size, resume_with)
                record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
                if step not in trace and (timed := timer.read(step, say)):  # none after a compile
                    record.update(timed)
                    speed = {"tok/s": f"{record['tokens_per_sec']:,.0f}", "mfu": f"{record['mfu']:.1%}"}
                bar.set_postfix({"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", **speed}, refresh=False)
                if peak_memory:
                    record["peak_memory_gib"] = memory.peak_in_use() / 2**30
                if is_eval:
                    record["train_loss"] = evaluate(state.model, train_tokens, config, mesh, data.EVAL_TRAIN_STREAM)
                    record["val_loss"] = evaluate(state.model, val_tokens, config, mesh, data.EVAL_VAL_STREAM)
                    signals.when = after_call  # evaluated: a stop that comes now waits for no evaluation
                    say(f"step {step}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}")
                    check_diverged(record, step, last_checkpoint, config.model.vocab_size, resume_with)
                with multihost.failing_together(), writing_to(rundir, resume_fix()):  # a full disk
                    if log:
                        log.write(record)
                timer.restart()

            if notice := signals.notice():  # where the signal did not reach StopSignals' thread
                signals.say(notice)
            stop = signals.received is not None
            if jax.process_count() > 1:  # all stop at the same step; agreeing costs a sync, so only at log steps
                stop = is_log and bool(multihost_utils.process_allgather(np.int32(stop)).any())
            stop = stop and step < config.max_steps  # at the last step, the run finishes as it would have
            if manager and (step % config.checkpoint_interval == 0 or step == config.max_steps or stop):
                if not is_log:  # never save a diverged state (a log step has checked it above)
                    check_diverged(metrics, step, last_checkpoint, config.model.vocab_size, resume_with)
                with timer.paused():  # the save's copy to host is no step's time
                    checkpoint.save(manager, step, state, config, resume_with)
                last_checkpoint = step
                # A signal during the save (seconds, for a large model): stop with it, not train on to save again.
                # Processes stop together, at a log step.
                stop = stop or (jax.process_count() == 1 and signals.received is not None and step < config.max_steps)
            if stop:
                stopped = True
                trace.stopped(step, state)
                if manager:
                    checkpoint.wait(manager, resume_with)
                bar.close()  # now: closed after the line, it was drawn again below it
                say(f"stopped after step {step} ({signals.received or 'another process was signalled'}); " + (
                    f"run {resume_with} to resume from checkpoint {step}" if manager
                    else "no checkpoint was written (--debug)"))
                break
    except BaseException as e:
        # A process that stopped (killed, or its own error) fails the others' next collective: the
        # others' error says so, where JAX's exit would wait out its heartbeat, then abort in C++.
        lost = multihost.failed_collective(e)
        if manager:  # started saves still commit
            # A failed one is raised over the error in flight, which may name its checkpoint as the one to
            # resume from (a full disk met at a log step), unless that error is the failed save itself, or
            # a lost process, without which no save can finish.
            quietly = isinstance(e, checkpoint.SaveFailed) or lost
            with contextlib.suppress(Exception) if quietly else contextlib.nullcontext():
                checkpoint.close(manager, resume_with)
        if lost:
            raise multihost.collective_error(e, f"once every process has stopped, {resume_fix()}", step) from e
        if memory.ran_out(e):  # the estimate is rough: a step can still need more than the device has
            # Once a checkpoint is saved, the run's batch is fixed, as on any resume.
            batch_fixed = resume or last_checkpoint is not None
            raise MidgptError(f"at step {step}, " + memory.out_of_memory(
                e, config, mesh, estimate_for, batch_fixed, resume_fix(" with one of them"))) from None
        raise
    else:
        if manager:
            checkpoint.close(manager, resume_with)
    finally:
        trace.failed(step)  # if still tracing, an error: its line comes last
        bar.close()
        if log:
            log.close()
    if not stopped:  # finished: where it is, and what to do with it
        say(f"trained to step {step}: " + (
            f"checkpoint {step} in {checkpoint.directory(rundir)}; python sample.py --rundir={shlex.quote(rundir)} "
            "samples from it" if manager else "no checkpoint was written (--debug)"))
    return state.model
