"""Token streams on disk: memory-mapped splits, random training windows, and batches on the mesh."""

import contextlib
import json
import os
import shlex
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import Mesh

from midgpt import sharding
from midgpt.config import Config
from midgpt.errors import MidgptError
from midgpt.files import read_or_none
from midgpt.prepare import differences
from midgpt.rundir import read_config_json

GPT2_VOCAB_SIZE = 50257  # GPT-2 BPE's ids, as data/openwebtext/prepare.py writes them


def _require(data_dir: str, name: str, vocab_size: int | None = None) -> str:
    """Return data_dir/name, or raise MidgptError naming the missing path and how to make it.

    vocab_size: the model's, which says the tokenizer to prepare with; either where not given.
    """
    path = os.path.join(data_dir, name)
    if not os.path.exists(path) and os.path.isfile(run_config := os.path.join(data_dir, "config.json")):
        # A run's folder: preparing data there is refused, so the usual advice below would go nowhere.
        data_dir_of_run = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            with open(run_config, encoding="utf-8") as f:
                data_dir_of_run = json.load(f).get("data_dir")
        raise MidgptError(f"{data_dir} is a run directory, not prepared data; pass the folder that prepare.py wrote"
                          + (f", as that run did: --data_dir={data_dir_of_run}" if data_dir_of_run else ""))
    if not os.path.exists(path):
        missing = path if os.path.isdir(data_dir) else data_dir
        script = os.path.join(data_dir, "prepare.py")  # the datasets in data/ carry their own
        text, out_dir = (data_dir, "DIR") if os.path.isfile(data_dir) else (None, data_dir)  # the text itself?
        chars = f"python data/shakespeare_char/prepare.py --input {text or 'TEXT'} --out_dir {out_dir} (characters)"
        bpe = f"python data/openwebtext/prepare.py --input {text or 'FILES'} --out_dir {out_dir} (GPT-2 BPE)"
        if os.path.exists(script):
            how = f"python {script}"
        elif vocab_size is None:
            how = f"{chars} or {bpe}"
        else:  # GPT-2's ids need its vocabulary; a smaller one can only be characters'
            how = bpe if vocab_size >= GPT2_VOCAB_SIZE else chars
        if os.path.isfile(data_dir):
            raise MidgptError(f"data_dir {data_dir} is a file, not a folder of prepared data; run {how}, "
                              "then pass --data_dir=DIR")
        raise MidgptError(f"{missing} not found{_in_clone(data_dir, name) or f'; run {how} to create it'}")
    return path


def _in_clone(data_dir: str, name: str) -> str | None:
    """Where data_dir/name is, said as advice, if a relative data_dir is not here but in the clone of this code."""
    # A config's data_dir is relative: run from elsewhere than the clone that holds it, it is not found.
    clone = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))  # of an editable install
    if not os.path.isabs(data_dir) and os.path.exists(os.path.join(clone, data_dir, name)):
        return (f" in {os.getcwd()}; run from the repository ({clone}) "
                f"or pass --data_dir={os.path.join(clone, data_dir)}")
    return None


def load_tokens(data_dir: str, split: str, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map <data_dir>/<split>.bin as a flat uint16 token stream; vocab_size: the model's, for _require."""
    path = _require(data_dir, f"{split}.bin", vocab_size)
    if not os.path.isfile(path):  # a folder: np.memmap's IsADirectoryError, in a traceback
        raise MidgptError(f"{path} is not a file; prepare the data again")
    if os.path.getsize(path) == 0:  # which np.memmap cannot map
        raise MidgptError(f"{path} is empty; prepare the data again, with more text")
    if os.path.getsize(path) % 2:
        raise MidgptError(f"{path} holds an odd number of bytes, so no uint16 tokens (cut short?); "
                          "prepare the data again")
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_meta(data_dir: str, fix: str = "prepare the data again", vocab_size: int | None = None) -> dict:
    """Read <data_dir>/meta.json (tokenizer, vocabulary, token counts); vocab_size: the model's, for _require."""
    path = _require(data_dir, "meta.json", vocab_size)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MidgptError(f"cannot read {path} as JSON ({e}); {fix}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise MidgptError(f"{path} names no vocab_size; {fix}")
    # What decoding reads: a hand edit that breaks it would be an IndexError, or text from another vocabulary.
    tokenizer, chars, V = meta.get("tokenizer"), meta.get("chars"), meta["vocab_size"]
    is_gpt2 = tokenizer == "gpt2" and V == GPT2_VOCAB_SIZE
    is_char = tokenizer == "char" and isinstance(chars, (list, str)) and len(chars) == V and all(
        isinstance(c, str) and len(c) == 1 for c in chars)
    if not (is_gpt2 or is_char):
        raise MidgptError(f"{path} describes no tokenizer (tokenizer 'char' with vocab_size characters in chars, "
                          f"or 'gpt2' with vocab_size {GPT2_VOCAB_SIZE}); {fix}")
    return meta


def meta_bytes(data_dir: str) -> bytes | None:
    """<data_dir>/meta.json as stored, or None where it cannot be read."""
    return read_or_none(os.path.join(data_dir, "meta.json"))


def load_run_meta(rundir: str, data_dir: str) -> dict | None:
    """The run's copy of its data's meta.json, or None for a run made before runs kept one."""
    if not os.path.exists(os.path.join(rundir, "meta.json")):
        return None
    # Preparing the data again would not touch this copy.
    return load_meta(rundir, fix="it is the run's copy of its data's: if data_dir holds the data this run trained on, "
                                 f"put that back (cp {shlex.quote(os.path.join(data_dir, 'meta.json'))} "
                                 f"{shlex.quote(rundir)}/)")


def load_splits(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map train and val; check that the model's vocabulary covers them and that each holds a window."""
    meta = load_meta(config.data_dir, vocab_size=config.model.vocab_size)
    if meta["vocab_size"] > config.model.vocab_size:
        raise MidgptError(
            f"{config.data_dir} has {meta['vocab_size']} token ids but model.vocab_size is "
            f"{config.model.vocab_size}; set --model.vocab_size={meta['vocab_size']} or more"
        )
    splits = {split: load_tokens(config.data_dir, split, config.model.vocab_size) for split in ("train", "val")}
    for split, tokens in splits.items():
        if len(tokens) != meta.get(f"{split}_tokens", len(tokens)):  # cut short (at an even byte) or replaced
            raise MidgptError(f"{config.data_dir}/{split}.bin holds {len(tokens)} tokens but its meta.json says "
                              f"{meta[f'{split}_tokens']}; prepare the data again")
        if len(tokens) <= config.model.block_size:  # a window is block_size + 1 tokens: inputs and targets
            raise MidgptError(f"{config.data_dir}/{split}.bin holds {len(tokens)} tokens, too few for one window of "
                              f"model.block_size + 1 = {config.model.block_size + 1}; prepare it from more text"
                              # your own text's val split is 1% of it, by default
                              + (", or with a larger --val_fraction"
                                 if split == "val" and meta.get("tokenizer") == "gpt2" else "")
                              + ", or train a smaller --model.block_size")
    return splits["train"], splits["val"]


def check_same_data(rundir: str, data_dir: str) -> None:
    """Refuse data other than the run trained on: prepared again from other text, or found elsewhere."""
    saved = os.path.join(rundir, "meta.json")
    trained, ran_on = load_run_meta(rundir, data_dir), read_config_json(rundir).data_dir
    # Your own text's split is by --val_fraction: the same text with another one is other data.
    fraction = trained.get("val_fraction") if trained else None
    again = f" with --val_fraction {fraction}" if isinstance(fraction, float) else ""
    advice = ("pass the --data_dir that holds the run's data (a relative one is read from the current directory), "
              f"or prepare it again from the same text{again}, or train in a new --rundir")
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        if where := _in_clone(data_dir, "meta.json"):  # resumed from another directory
            raise MidgptError(f"{data_dir} not found{where}")
        raise MidgptError(f"{os.path.abspath(data_dir)} holds no prepared data (no meta.json); {advice}")
    now = load_meta(data_dir)
    # A relative ran_on is compared as if typed here: the directory the run started in is not saved.
    checksums = trained and "sha256" in trained and "sha256" in now
    if os.path.realpath(data_dir) != os.path.realpath(ran_on) and not checksums:
        why = (f"{rundir} keeps no copy of its data's meta.json" if trained is None else
               f"{saved} or {data_dir}/meta.json lacks the checksums that prepare.py now writes")
        where = "" if os.path.isabs(ran_on) else " from the directory the run was started in"
        raise MidgptError(f"this run trained on {ran_on}, and {why}: nothing shows that {data_dir} holds the same "
                          f"data; resume with --data_dir={shlex.quote(ran_on)}{where}, or train in a new --rundir")
    if trained and (differ := differences(trained, now)):
        what = "another vocabulary" if {"tokenizer", "vocab_size", "chars"} & set(differ) else "other text"
        raise MidgptError(f"{os.path.abspath(data_dir)} holds {what} than this run trained on ({', '.join(differ)} "
                          f"differ from {saved}); {advice}")


# Streams of batch seeds, (seed, TRAIN_STREAM, step) in training and (seed, stream) in evaluation: the
# stream keeps them apart.
TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 0, 1, 2


def get_batch(
    tokens: np.ndarray,
    seed: tuple[int, ...],
    batch_size: int,
    block_size: int,
    rows: slice | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The global batch fixed by seed, or its rows, as int32 (x_bxT, y_bxT), y = x shifted by one."""
    rng = np.random.default_rng(seed)
    # Every row's offset is drawn, so each process's share comes from the same global batch.
    offsets_B = rng.integers(0, len(tokens) - block_size, size=batch_size)
    offsets_b = offsets_B if rows is None else offsets_B[rows]  # the b rows asked for
    # Fancy indexing reads only the selected windows from the memmap; each is T+1 long.
    window_bxT1 = tokens[offsets_b[:, None] + np.arange(block_size + 1)].astype(np.int32)
    return window_bxT1[:, :-1], window_bxT1[:, 1:]


def global_batch(tokens: np.ndarray, seed: tuple[int, ...] | list[tuple[int, ...]], G: int, config: Config,
                 mesh: Mesh):
    """The G batches fixed by seed, (x_GxBxT, y_GxBxT), on the mesh: each process reads only its own rows.

    G: the step's micro-batches, or an evaluation's batches (E elsewhere). A list of K seeds gives K steps'
    batches, stacked: (x_KxGxBxT, y_KxGxBxT).
    """
    seeds = seed if isinstance(seed, list) else [seed]
    B, T = config.batch_size, config.model.block_size
    lead = (len(seeds), G) if isinstance(seed, list) else (G,)  # the axes before B's
    batch_sharding = sharding.batch_sharding(mesh, ndim=len(lead) + 2, batch_axis=len(lead))
    rows_b = sharding.process_rows(batch_sharding, (*lead, B, T), batch_axis=len(lead))  # this process's b of B
    # Row b of micro-batch g is row g * B + b of the G * B rows drawn for the seed.
    index_Gb = (np.arange(G)[:, None] * B + rows_b).ravel()
    x_KxGbxT, y_KxGbxT = (np.stack(a) for a in zip(*(get_batch(tokens, s, G * B, T, rows=index_Gb) for s in seeds)))
    # Ids past the table look up nothing: the loss turns NaN, and the learning rate would be blamed.
    if x_KxGbxT.size and (top := int(max(x_KxGbxT.max(), y_KxGbxT.max()))) >= config.model.vocab_size:
        raise MidgptError(f"{getattr(tokens, 'filename', None) or 'the data'} holds token id {top}, past "
                          f"model.vocab_size={config.model.vocab_size}: it is damaged; prepare the data again")
    return tuple(
        jax.make_array_from_process_local_data(batch_sharding, a.reshape(*lead, len(rows_b), T), (*lead, B, T))
        for a in (x_KxGbxT, y_KxGbxT)
    )


def prefetch(make, items: Iterable):
    """Yield (item, make(item)) for each item; a thread makes the next while the caller uses this one."""
    items, end = iter(items), object()
    with ThreadPoolExecutor(max_workers=1) as pool:
        item = next(items, end)
        pending = None if item is end else pool.submit(make, item)
        while item is not end:
            ready = pending.result()
            following = next(items, end)
            if following is not end:
                pending = pool.submit(make, following)
            yield item, ready
            item = following
