"""Checkpoints under RUNDIR/checkpoints: orbax, asynchronous, atomic; resume from the newest good one.

A checkpoint holds the whole TrainState (parameters, optimiser state, step, dropout
key; the step is also the data position, since batches are drawn by their step: see TrainState),
the run's config, and a fingerprint of each array that a restore checks.
"""

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from midgpt import multihost, sharding
from midgpt.config import Config, config_to_dict
from midgpt.errors import MidgptError
from midgpt.rundir import CHECKPOINTS, saved_steps

# orbax writes this file into a step's directory when the save commits; a step
# without it was cut short, whatever else is there.
COMMIT_MARKER = "commit_success.txt"


def directory(rundir: str) -> str:
    return os.path.join(os.path.abspath(rundir), CHECKPOINTS)


def step_directory(rundir: str, step: int) -> str:
    return os.path.join(directory(rundir), str(step))


def committed(rundir: str, step: int) -> bool:
    """Whether the save of step finished."""
    return os.path.exists(os.path.join(step_directory(rundir, step), COMMIT_MARKER))


def committed_steps(rundir: str) -> list[int]:
    """The steps whose save finished, oldest first."""
    return sorted(step for step in saved_steps(rundir) if committed(rundir, step))


def newest_committed(rundir: str) -> int | None:
    """The newest step whose save finished, or None."""
    return max(committed_steps(rundir), default=None)


def make_manager(rundir: str, config: Config) -> ocp.CheckpointManager:
    """The run's checkpoint manager."""
    # orbax deletes the oldest only after a newer one commits, so the last good copy is never the one removed.
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True)
    # Made here, not by orbax: a file in the way fails now, in one line, rather than at the first save.
    os.makedirs(directory(rundir), exist_ok=True)
    return ocp.CheckpointManager(directory(rundir), options=options)


def check_writable(rundir: str) -> None:
    """Raise OSError now if checkpoints/ takes no file: a save would fail only at the first checkpoint, steps later."""
    with tempfile.TemporaryFile(dir=directory(rundir)):
        pass


def delete_unfinished_saves(rundir: str) -> None:
    """Delete the folders N.orbax-checkpoint-tmp that saves cut short by a kill left, each as large as a checkpoint."""
    # For the trainer, with the run's lock held: no other save can be under way (sample.py may read a run
    # in training, and must not). Not orbax's cleanup_tmp_directories, which deletes in a thread that only
    # a save waits for: a launch that saved nothing released the lock while it deleted, and a second
    # launch's first save could lose its folder to it.
    for unfinished in pathlib.Path(directory(rundir)).glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(unfinished)


@jax.jit
def fingerprint(x: jax.Array) -> jax.Array:
    """x's bits summed with odd weights modulo 2**32: exact on any mesh, and changed by any one changed value."""
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    weights = 2 * jax.lax.iota(jnp.uint32, x.size).reshape(x.shape) + 1  # odd: invertible modulo 2**32
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def fingerprint_dict(tree) -> dict[str, int]:
    """{dotted path: fingerprint} of a tree's arrays."""
    # An array at a time, each fetched before the next is started. XLA:CPU holds the weighted bits whole,
    # and a whole state's would be its size again. With several processes, XLA:CPU's programs in flight
    # together deadlocked in gloo's all-reduce: 6 of 12 two-process runs hung at a save.
    found = jax.tree.map(lambda x: jax.device_get(fingerprint(x)), eqx.filter(tree, eqx.is_array))
    return by_path(found, int)


def check_fingerprints(manager: ocp.CheckpointManager, step: int, tree) -> None:
    """Raise ValueError where a restored array is not what was saved: its files changed since, in place."""
    # tensorstore checks the files' layout, not the bytes of the values; orbax has no checksum for them.
    path = pathlib.Path(str(manager.directory), str(step), "fingerprints")
    if not path.is_dir():
        return  # saved before checkpoints had them
    # Not manager.restore, whose barrier hangs the others: see restore.
    with contextlib.closing(ocp.JsonCheckpointHandler()) as handler, multihost.failing_together():
        saved = handler.restore(path, args=ocp.args.JsonRestore())
    changed = sorted(k for k, v in fingerprint_dict(tree).items() if saved.get(k, v) != v)
    if changed:
        raise ValueError(f"the values of {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} are not "
                         "those saved: its files were changed")


# What a failed save's line tells the user to run; launch.py names the run directory if the command did not.
SAME_COMMAND = "the same command"


def save(manager: ocp.CheckpointManager, step: int, state, config: Config, resume_with: str = SAME_COMMAND) -> None:
    """Start an asynchronous save: the arrays are copied off the devices, then written in the background."""
    arrays = eqx.filter(state, eqx.is_array)
    args = ocp.args.Composite(state=ocp.args.StandardSave(arrays), config=ocp.args.JsonSave(config_to_dict(config)),
                              fingerprints=ocp.args.JsonSave(fingerprint_dict(arrays)))
    with failed_saves_in_one_line(manager, resume_with):
        manager.save(step, args=args, force=True)


def wait(manager: ocp.CheckpointManager, resume_with: str = SAME_COMMAND) -> None:
    """Block until every save started has finished."""
    with failed_saves_in_one_line(manager, resume_with):
        manager.wait_until_finished()


def close(manager: ocp.CheckpointManager, resume_with: str = SAME_COMMAND) -> None:
    """Let every save started finish, then release the manager's threads."""
    with failed_saves_in_one_line(manager, resume_with):  # a failed save can be raised again here, after wait passed
        manager.close()


class SaveFailed(MidgptError):
    """A checkpoint save failed; the line names the newest intact checkpoint."""


@contextlib.contextmanager
def failed_saves_in_one_line(manager: ocp.CheckpointManager, resume_with: str):
    """A save that failed in the background (a full disk) as one line naming the newest intact checkpoint.

    resume_with: the command that resumes the run.
    """
    try:
        yield  # orbax raises a background failure at the next save or wait
    except Exception as e:
        intact = newest_committed(os.path.dirname(str(manager.directory)))
        if multihost.failed_collective(e):  # another process stopped, in the save's barrier: no fault of the disk's
            raise multihost.collective_error(e, f"once every process has stopped, run {resume_with} to " + (
                f"resume from checkpoint {intact}" if intact is not None else "start again")) from e
        # tensorstore appends the OS error's number: "No space left on device" says more than its first words.
        code = re.search(r"os_error_code='?(\d+)", str(e))
        raise SaveFailed(f"a checkpoint save failed ({os.strerror(int(code[1])) if code else describe(e)}); " + (
            f"checkpoint {intact} is intact: fix the cause and run {resume_with} to resume from it"
            if intact is not None else "no checkpoint was finished: fix the cause and run again")) from None


def placed(like, shardings):
    """(like's arrays as ShapeDtypeStructs placed by shardings, the rest of like)."""
    arrays_like, static = eqx.partition(like, sharding.is_abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), arrays_like, shardings), static


def restore(manager: ocp.CheckpointManager, step: int, like, shardings):
    """The state saved at step, placed by shardings (the saving mesh does not matter).

    A process that cannot read its part raises on every process (the others' line names it).
    """
    target, static = placed(like, shardings)
    # Its handler, not manager.restore, which ends in a barrier: a process whose read failed never
    # came to it, and the others waited there until it exited, then aborted with a C++ stack.
    with contextlib.closing(ocp.StandardCheckpointHandler()) as handler, multihost.failing_together():
        try:
            restored = handler.restore(pathlib.Path(str(manager.directory), str(step), "state"),
                                       args=ocp.args.StandardRestore(target))
        except Exception as e:  # described here, where its cause is at hand, for the other processes' lines
            if multihost.failed_collective(e):  # another process stopped: failing_together says so
                raise
            raise MidgptError(describe(e)) from e
    check_fingerprints(manager, step, restored)
    return eqx.combine(restored, static)


def restore_model(manager: ocp.CheckpointManager, step: int, like_model, shardings):
    """The model alone of the state saved at step: the optimiser state, twice its size, is never read."""
    target, static = placed(like_model, shardings)
    # The step count too, checked as a resume checks it; the state's other fields are left out of the read.
    step_like = jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.tree.leaves(shardings)[0])
    item = {"model": target, "step": step_like}
    args = ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    check_fingerprints(manager, step, restored)
    if (saved := int(restored["step"])) != step:  # sampled as named, it was another step's model
        raise ValueError(holds_another_step(saved))
    return eqx.combine(restored["model"], static)


def holds_another_step(saved: int) -> str:
    """Why a checkpoint whose state is of another step than its folder's name does not restore."""
    return f"it holds the state after step {saved}: a folder renamed, or copied from another?"


def by_path(tree, value) -> dict:
    """{dotted path: value(array)} of a tree's arrays; a state and orbax's metadata of it give the same paths."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): value(x)
            for path, x in jax.tree.leaves_with_path(tree) if hasattr(x, "shape")}


def array_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of a tree's arrays."""
    return by_path(tree, lambda x: tuple(x.shape))


def check_arrays(step_dir: str, like, part: str | None = None) -> None:
    """Raise MidgptError if the checkpoint (or its field part) holds other arrays than like.

    Other arrays mean another model, not damage.
    """
    # The item's handler, not a StandardCheckpointer: that one looks for a step's metadata
    # file in the item's folder and logs a warning on every resume.
    try:
        with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
            saved = array_shapes(handler.metadata(pathlib.Path(step_dir, "state")))
    except Exception:  # unreadable metadata is damage, which the restore reports
        return
    if not saved:  # no metadata at all is damage too
        return
    wanted = array_shapes({part: like} if part else like)
    if part:  # none under it is another layout, which a partial restore would not notice
        saved = {k: v for k, v in saved.items() if k.startswith(part + ".")}
    if saved != wanted:
        differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        shown = "; ".join(f"{k}: saved {saved.get(k, 'none')}, this model {wanted.get(k, 'none')}" for k in differ[:3])
        raise MidgptError(
            f"checkpoint {step_dir} holds other arrays than this model ({shown}): it was written by another "
            "version of midgpt (or config.json was edited); use that version, or train in a new --rundir")


def describe(e: Exception) -> str:
    """An exception from a failed restore or save as a short phrase: its type and the start of its first line."""
    if isinstance(e, MidgptError):  # ours: written to be read, and already short
        return str(e)
    # orbax wraps a failed read in a bare Exception whose text shows a bound method's repr (its spec,
    # never called) where the detail should be; the error it wraps names the array and the file.
    if str(e).startswith("Encountered error while reading array index") and e.__cause__ is not None:
        e = e.__cause__
    first = (str(e).strip().splitlines() or ["no detail"])[0]
    if len(first) > 160:  # cut at a space, unless that would lose most of it (a long path has none)
        first = first[:160]
        first = (first[:first.rfind(" ")] if first.rfind(" ") > 120 else first) + " ..."
    return f"{type(e).__name__}: {first}"


def failures(problems: dict[int, str]) -> str:
    """Why each checkpoint did not restore, newest first, as one clause."""
    return "; ".join(f"checkpoint {step}: {why}" for step, why in sorted(problems.items(), reverse=True))


def restore_newest(manager: ocp.CheckpointManager, rundir: str, like, shardings, say):
    """(state, step) from the newest checkpoint that restores to its step's state, or None if no save ever finished.

    Damaged checkpoints newer than the one restored are moved to RUNDIR/checkpoints_damaged.
    """
    found, damaged = None, []  # (step, problem, whether its save finished), newest first
    aside = os.path.join(os.path.abspath(rundir), "checkpoints_damaged")
    for step in sorted(manager.all_steps(), reverse=True):
        if finished := committed(rundir, step):
            path = step_directory(rundir, step)
            check_arrays(path, like)
            try:
                state = restore(manager, step, like, shardings)
            except Exception as e:  # orbax and tensorstore raise many types for damaged files; every process alike
                if multihost.failed_collective(e):  # another process stopped: no damage of the checkpoint's
                    raise
                problem = describe(e)
            else:
                # A folder copied or renamed by hand: resumed as it is named, its learning rate was another step's.
                if (saved := int(state.step)) == step:
                    found = state, step
                    break
                problem = holds_another_step(saved)
        else:
            problem = f"no {COMMIT_MARKER}: its save did not finish"
        damaged.append((step, problem, finished))
    # If finished ones exist but none restores, nothing is moved: a run started over would rewind the logs,
    # and the cause may be this machine (memory, files) rather than the checkpoints.
    if not found and (unreadable := [(step, problem) for step, problem, finished in damaged if finished]):
        raise MidgptError(f"no checkpoint in {directory(rundir)} restores ({failures(dict(unreadable))}); nothing "
                          "was moved or overwritten: fix the cause and run again, or train in a new --rundir")
    for step, problem, _ in damaged:
        moved = os.path.join(aside, f"{step}.{time.time_ns()}")
        say(f"checkpoint {step} is damaged ({problem}); moved to {moved}")  # the caller says where it resumes
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            shutil.move(step_directory(rundir, step), moved)
    if damaged:
        multihost_utils.sync_global_devices("damaged checkpoints moved aside")
        manager.reload()
    return found
