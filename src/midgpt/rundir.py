"""A run directory: its config.json, what a resume may change, its checkpoints' folders, and runs near a path.

Read without JAX or orbax, so that launch.py and sample.py can refuse a wrong --rundir at once.
"""

import dataclasses
import json
import os
import shlex

from midgpt.config import Config, apply_overrides, check_config, config_from_dict, config_names, get_field, leaves
from midgpt.errors import MidgptError

CHECKPOINTS = "checkpoints"  # the run directory's folder of orbax checkpoints, one folder a step


# Changing one of these on resume would make it another run: another model or another sampling
# of the data. The data itself may move (data_dir): the resume compares what it holds.
FIXED_ON_RESUME = ("model", "seed", "batch_size", "g_accum_iters", "param_dtype")
FREE_ON_RESUME = ("model.remat", "model.scan_unroll", "model.attention")  # the same model, run another way


def changes_the_run(a: Config, b: Config) -> str | None:
    """The first field that FIXED_ON_RESUME keeps and in which a and b differ, or None."""
    a_fields, b_fields = leaves(a), leaves(b)
    return next((name for name in a_fields if name.split(".")[0] in FIXED_ON_RESUME
                 and name not in FREE_ON_RESUME and a_fields[name] != b_fields[name]), None)


def resume_config(saved: Config, named: Config, overrides: list[str]) -> tuple[Config, list[str], list[str]]:
    """The saved config with the command line's overrides; the changes they make; what the run keeps.

    Another named config (one still known), or an override of FIXED_ON_RESUME (but FREE_ON_RESUME), is refused;
    anything else may change.
    """
    # Only the overrides change a run: where its named config differs (overrides the run began with,
    # or a default changed since), the run keeps its own values.
    # A run saved before configs had names has none; its config may also be renamed or removed
    # since. Then it takes the name of the --config that resumes it, which names it from then on.
    known = saved.name in config_names()
    if known and saved.name != named.name:
        raise MidgptError(f"the run in this --rundir was started with --config={saved.name}, not {named.name}; "
                          f"resume it with --config={saved.name}, or pass a new --rundir")
    resumed = apply_overrides(dataclasses.replace(saved, name=saved.name if known else named.name), overrides)
    given = {arg[2:].partition("=")[0] for arg in overrides}
    was, now, named_values = leaves(saved), leaves(resumed), leaves(named)
    fields = [n for n in was if n != "name"]
    if name := changes_the_run(resumed, saved):
        raise MidgptError(
            f"the run in this --rundir has {name}={was[name]!r} but this command asks for "
            f"{now[name]!r}; that is another model or other batches: pass a new --rundir"
        )
    changes = [f"{n}: {was[n]!r} -> {now[n]!r}" for n in ["name", *fields] if was[n] != now[n]]
    kept = [f"{n}={was[n]!r} (config: {named_values[n]!r})" for n in fields
            if n not in given and was[n] != named_values[n]]
    return resumed, changes, kept


def is_step(name: str) -> bool:
    """Whether a folder's name is a checkpoint's step: ASCII digits (str.isdigit takes "²", which int() refuses)."""
    return name.isascii() and name.isdigit()


def saved_steps(rundir: str) -> list[int]:
    """The steps of rundir's checkpoints, read from their folder names, without loading orbax."""
    folder = os.path.join(rundir, CHECKPOINTS)
    return [int(name) for name in os.listdir(folder) if is_step(name)] if os.path.isdir(folder) else []


def _config_copy(rundir: str, step: int) -> str:
    """Where checkpoint step keeps its copy of the config: orbax's JSON item "config" (an unfinished save has none)."""
    return os.path.join(rundir, CHECKPOINTS, str(step), "config", "metadata")


def _put_back(rundir: str, path: str) -> str:
    """The advice to copy the newest checkpoint's config back to path, or "" if no checkpoint holds one."""
    for step in sorted(saved_steps(rundir), reverse=True):
        if os.path.isfile(copy := _config_copy(rundir, step)):
            return f"put the newest checkpoint's copy back: cp {shlex.quote(copy)} {shlex.quote(path)}"
    return ""


def check_as_checkpointed(rundir: str, config: Config) -> None:
    """Refuse a config.json whose model or batches differ from those its newest checkpoint trained with (an edit)."""
    for step in sorted(saved_steps(rundir), reverse=True):
        try:
            with open(_config_copy(rundir, step), encoding="utf-8") as f:
                trained = config_from_dict(json.load(f))
        except (OSError, ValueError, MidgptError):  # no copy (an unfinished save), or damage the restore reports
            continue
        if name := changes_the_run(config, trained):
            path = os.path.join(rundir, "config.json")
            raise MidgptError(f"{path} has {name}={get_field(config, name)!r} but checkpoint {step} trained with "
                              f"{get_field(trained, name)!r} (an edit?): that is another model or other batches; "
                              f"{_put_back(rundir, path)}, or train it in a new --rundir")
        return


def is_run(path: str) -> bool:
    """Whether path is a run directory: a config.json and a checkpoints/ (empty for --debug's), as every run makes."""
    # Not config.json alone: many a project folder holds one, and a path under it is in no run.
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, CHECKPOINTS))


def runs_near(rundir: str, with_step: bool = True, new_run: bool = False) -> str | None:
    """What to pass for a path that is not a run: a run it holds (outputs/), or the run it is in (a checkpoint's).

    with_step: and the checkpoint's --step, for sample.py. new_run: or a new run in a folder of runs, for launch.py.
    """
    if os.path.isdir(rundir):
        runs = [e.path for e in os.scandir(rundir) if is_run(e.path)]
        # Of those with a checkpoint, where some have one: a --debug run has nothing to sample or resume.
        saved = [run for run in runs if saved_steps(run)]
        if runs:  # the newest: the one whose checkpoints/ took or lost a save last
            newest = max(saved or runs, key=lambda run: os.path.getmtime(os.path.join(run, CHECKPOINTS)))
            which = "the newest" + " with a checkpoint" * (0 < len(saved) < len(runs))
            if new_run:  # a user who meant to start one there is not steered into resuming another
                return (f"{rundir} holds runs: pass a new one in it, e.g. --rundir={os.path.join(rundir, 'NAME')}, "
                        f"or one of them to resume it, e.g. {which}, --rundir={newest}")
            return f"{rundir} holds runs: pass one, e.g. {which}, --rundir={newest}"
    below, run = [], os.path.normpath(rundir)
    while run != (up := os.path.dirname(run)):  # up to "" for a relative path, "/" for an absolute one
        below.insert(0, os.path.basename(run))
        run = up
        if is_run(run or "."):
            step = below[1] if len(below) > 1 and below[0] == CHECKPOINTS and is_step(below[1]) else None
            return f"{rundir} is inside the run in {run or '.'}: pass --rundir={run or '.'}" + (
                f" --step={step}" if step and with_step else "")
    return None


def read_config_json(rundir: str) -> Config:
    """The config a run saved in rundir/config.json."""
    path = os.path.join(rundir, "config.json")
    if os.path.isfile(rundir):
        raise MidgptError(runs_near(rundir) or f"{rundir} is a file, not a run directory; pass a run directory "
                                               "made by launch.py")
    if not os.path.lexists(path):  # a dangling symlink is not missing: cp would not write through it
        if saved_steps(rundir):
            raise MidgptError(f"{path} is missing but {rundir} holds checkpoints; "
                              + (_put_back(rundir, path) or "none holds a copy of it: pass a new --rundir"))
        if near := runs_near(rundir):
            raise MidgptError(f"{path} not found; {near}")
        if not os.path.isdir(rundir):
            raise MidgptError(f"{rundir} does not exist; pass a run directory made by launch.py")
        raise MidgptError(f"{path} not found; is {rundir} a run directory made by launch.py?")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        # A damaged file, which cp writes over in place: not an unreadable one (permissions), a directory
        # or a symlink (cp would write through it, to what it points at).
        damaged = isinstance(e, ValueError) and os.path.isfile(path) and not os.path.islink(path)
        fix = damaged and _put_back(rundir, path) or "restore it or pass a new --rundir"
        raise MidgptError(f"cannot read {path} as JSON ({e}); {fix}") from None
    try:
        return config_from_dict(saved)
    except MidgptError as e:  # an edit, or another version of midgpt: which, only the user knows
        undo = _put_back(rundir, path) or "undo the edit"
        raise MidgptError(f"{path}: {e}; {undo}, or use the version of midgpt that wrote it") from None


def read_run_config(rundir: str) -> Config:
    """A finished or running run's config.json, refused where it is not what its checkpoints trained with."""
    config = read_config_json(rundir)
    check_as_checkpointed(rundir, config)
    check_saved_config(rundir, config, config)  # a hand edit launch.py would refuse
    return config


def check_saved_config(rundir: str, config: Config, saved: Config, fix: str = "fix it there") -> None:
    """check_config of a run's config: `saved`, its config.json, with overrides; its errors from there name the file."""
    try:
        check_config(config)
    except MidgptError as e:
        try:
            check_config(saved)
        except MidgptError as cause:  # an edit, or a check newer than the run
            if str(cause) == str(e):
                raise MidgptError(f"{os.path.join(rundir, 'config.json')}: {e}; {fix}") from None
        raise
