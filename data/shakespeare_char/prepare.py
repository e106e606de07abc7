"""Tiny Shakespeare -> char-level train.bin / val.bin (uint16) and meta.json."""

import contextlib
import hashlib
import http.client
import json
import os
import shlex
import signal
import sys
import urllib.request
from pathlib import Path

import numpy as np

from midgpt.cli import ArgumentParser
from midgpt.errors import MidgptError
from midgpt.prepare import FILES, check_out_dir, lock_out_dir, replace_dataset
from midgpt.tokenizer import read_utf8

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def read_text(path: Path) -> str:
    """Return the file's text exactly as stored but for a byte-order mark, or exit with one line on stderr."""
    if path.exists() and not path.is_file() and not path.is_dir():  # /dev/zero was read until memory ran out
        sys.exit(f"prepare.py: {path} is not a regular file (a pipe or a device); write its text to a file and "
                 "pass that")
    try:
        return read_utf8(path)  # exactly: text mode would translate newlines and break exact round trips
    except FileNotFoundError:
        sys.exit(f"prepare.py: input file not found: {path}")
    except OSError as e:
        sys.exit(f"prepare.py: cannot read {path} as UTF-8 text: {e}")
    except MidgptError as e:  # not UTF-8: what to convert it from
        sys.exit(f"prepare.py: {e}")


def download(path: Path) -> None:
    """Fetch Tiny Shakespeare into path, or exit with one line on stderr."""
    try:
        with urllib.request.urlopen(URL, timeout=30) as response:
            body = response.read()
    except (OSError, http.client.HTTPException) as e:  # a cut connection is IncompleteRead, not an OSError
        sys.exit(f"prepare.py: could not download {URL} ({e}); pass --input PATH to a local copy")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Rename into place so a killed download never leaves a truncated input.txt to reuse.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, path)


def main() -> None:
    # Its errors one line, close options named, and no abbreviation (--inp for --input), as every command's.
    parser = ArgumentParser(description=__doc__, prog="data/shakespeare_char/prepare.py")
    parser.add_argument("--input", type=os.path.expanduser,
                        help="Tiny Shakespeare text file (default: <out_dir>/input.txt, downloaded if absent)")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), type=os.path.expanduser,
                        help="where train.bin, val.bin and meta.json go (default: this script's folder)")
    try:
        args = parser.parse_args()
        if "" in (args.input, args.out_dir):  # an unset $VAR: Path("") is the working directory
            parser.error(f"--{'input' if args.input == '' else 'out_dir'} is empty")
        out_dir = Path(args.out_dir)
        check_out_dir(out_dir, "char")
    except MidgptError as e:
        sys.exit(f"prepare.py: {e}")

    input_path = Path(args.input) if args.input else out_dir / "input.txt"
    if args.input is None and not input_path.exists():
        download(input_path)
    text = read_text(input_path)

    chars = sorted(set(text))
    if len(chars) > 2**16:
        sys.exit(f"prepare.py: {len(chars)} distinct characters do not fit uint16 token ids; for such text, "
                 f"use GPT-2 BPE: python data/openwebtext/prepare.py --input {shlex.quote(str(input_path))}")
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n_train = int(0.9 * len(ids))
    splits = {"train": ids[:n_train], "val": ids[n_train:]}
    if n_train == 0:  # training needs both splits, and data.py cannot memory-map an empty one
        sys.exit(f"prepare.py: {input_path} holds {len(ids)} character{'' if len(ids) == 1 else 's'}, "
                 "too few for a train and a val split")

    meta = {
        "tokenizer": "char",
        "vocab_size": len(chars),
        "chars": chars,
        "train_tokens": len(splits["train"]),
        "val_tokens": len(splits["val"]),
        "sha256": {f"{name}.bin": hashlib.sha256(split_ids.tobytes()).hexdigest()
                   for name, split_ids in splits.items()},
    }
    # Every file is written beside the old ones first: a full disk or a Ctrl-C leaves a prepared dataset as it was.
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock_out_dir(out_dir)
    except OSError as e:
        sys.exit(f"prepare.py: cannot write to {out_dir} ({e}); nothing prepared before was replaced")
    except MidgptError as e:  # and its .tmp files are the other one's
        sys.exit(f"prepare.py: {e}")
    tmp = {name: out_dir / f"{name}.tmp" for name in FILES}
    try:
        for name, split_ids in splits.items():
            split_ids.tofile(tmp[f"{name}.bin"])
        tmp["meta.json"].write_text(json.dumps(meta))
        # The renames below take microseconds, and a stop in them would leave neither dataset whole.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    except (OSError, KeyboardInterrupt) as e:
        for path in tmp.values():
            with contextlib.suppress(OSError):  # not there, or --out_dir is no directory
                path.unlink()
        sys.exit(f"prepare.py: cannot write to {out_dir} ({e or 'interrupted'}); nothing prepared before was replaced")
    replaced = replace_dataset(out_dir, tmp)
    print(f"vocab size {len(chars)}; train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
          f"-> {out_dir}{replaced}")


if __name__ == "__main__":
    main()
