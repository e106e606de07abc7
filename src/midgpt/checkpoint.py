"""What a run leaves on disk for later use: its config and its final parameters."""

import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from midgpt.config import Config, config_from_dict
from midgpt.errors import MidgptError
from midgpt.model import GPT, cast_floats

MODEL_FILE = "model.eqx"


def save_model(rundir: str, model: GPT) -> None:
    """Write the parameters to rundir/model.eqx, atomically: a killed save leaves no torn file.

    Every process must call it (the sharded parameters are gathered); process 0 writes.
    """
    arrays, static = eqx.partition(model, eqx.is_array)
    arrays = multihost_utils.process_allgather(arrays, tiled=True)
    if jax.process_index() == 0:
        tmp = os.path.join(rundir, MODEL_FILE + ".tmp")
        eqx.tree_serialise_leaves(tmp, eqx.combine(arrays, static))
        os.replace(tmp, os.path.join(rundir, MODEL_FILE))


def load_config_json(rundir: str) -> Config:
    path = os.path.join(rundir, "config.json")
    if not os.path.exists(path):
        raise MidgptError(f"{path} not found; is {rundir} a run directory made by launch.py?")
    with open(path) as f:
        return config_from_dict(json.load(f))


def load_model(rundir: str, config: Config) -> GPT:
    """The parameters that training saved at its end, in param_dtype."""
    path = os.path.join(rundir, MODEL_FILE)
    if not os.path.exists(path):
        raise MidgptError(f"{path} not found; the run has not finished training yet")
    # Shapes only: no need to spend time initialising weights that are overwritten.
    dtype = jnp.dtype(config.param_dtype)
    like = eqx.filter_eval_shape(lambda: cast_floats(GPT(config.model, key=jax.random.key(0)), dtype))
    try:
        return eqx.tree_deserialise_leaves(path, like)
    except Exception as e:
        raise MidgptError(f"{path} is unreadable ({type(e).__name__}: {e}); train the run again") from None
