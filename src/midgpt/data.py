"""Token streams on disk: memory-mapped splits and random training windows."""

import json
import os

import numpy as np

from midgpt.errors import MidgptError


def _require(data_dir: str, name: str) -> str:
    """Return data_dir/name, or raise MidgptError naming the missing path and how to make it."""
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        missing = path if os.path.isdir(data_dir) else data_dir
        script = os.path.join(data_dir, "prepare.py")  # the datasets in data/ carry their own
        how = (f"python {script}" if os.path.exists(script) else
               f"python data/openwebtext/prepare.py --input YOUR_FILES --out_dir {data_dir} "
               "(or data/shakespeare_char/prepare.py)")
        raise MidgptError(f"{missing} not found; run {how} to create it")
    return path


def load_tokens(data_dir: str, split: str) -> np.ndarray:
    """Memory-map <data_dir>/<split>.bin as a flat uint16 token stream."""
    path = _require(data_dir, f"{split}.bin")
    if os.path.getsize(path) == 0:  # which np.memmap cannot map
        raise MidgptError(f"{path} is empty; prepare the data again, with more text")
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_meta(data_dir: str) -> dict:
    """Read <data_dir>/meta.json (tokenizer, vocabulary, token counts)."""
    with open(_require(data_dir, "meta.json")) as f:
        return json.load(f)


def check_vocabulary(rundir: str, data_dir: str) -> None:
    """Refuse data whose ids mean other tokens than the run trained on (prepared again from other text)."""
    saved = os.path.join(rundir, "meta.json")
    if not os.path.exists(saved):  # a run made before runs kept a copy has none to compare
        return
    with open(saved) as f:
        trained = json.load(f)
    now = load_meta(data_dir)
    if any(trained.get(k) != now.get(k) for k in ("tokenizer", "vocab_size", "chars")):
        raise MidgptError(f"{data_dir} now holds another vocabulary than this run trained on ({saved}); "
                          "prepare it again from the same text, or train in a new --rundir")


def get_batch(
    tokens: np.ndarray,
    key: tuple[int, ...],
    batch_size: int,
    block_size: int,
    rows: slice | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return rows of the global batch fixed by key as int32 (x_BxT, y_BxT), y = x shifted by one."""
    rng = np.random.default_rng(key)
    # Every row's offset is drawn, so each process's share comes from the same global batch.
    offsets_B = rng.integers(0, len(tokens) - block_size, size=batch_size)
    if rows is not None:
        offsets_B = offsets_B[rows]
    # Fancy indexing reads only the selected windows from the memmap; each is T+1 long.
    window_BxT1 = tokens[offsets_B[:, None] + np.arange(block_size + 1)].astype(np.int32)
    return window_BxT1[:, :-1], window_BxT1[:, 1:]

