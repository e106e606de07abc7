"""What the data/*/prepare.py scripts share: where they may write, and how a dataset is replaced whole."""

import json
import os
from pathlib import Path

from midgpt.errors import MidgptError
from midgpt.files import lock_directory

FILES = ("train.bin", "val.bin", "meta.json")  # meta.json last: its presence marks a dataset complete
# The builders of Hugging Face `datasets` that read the files given to them (--dataset json --data_files F):
# your own text, as --input's, not a dataset of the Hub.
FILE_BUILDERS = ("json", "parquet", "csv", "text", "arrow", "pandas")


def check_out_dir(out_dir: Path, tokenizer: str, source: dict | None = None) -> None:
    """Refuse an --out_dir whose files are not this kind of data: a run's, another tokenizer's, another Hub dataset's.

    A dataset of the same kind is prepared again in place (new text for the same purpose).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise MidgptError(f"--out_dir {out_dir} is a file, not a directory; pass another --out_dir")
    if (out_dir / "config.json").exists():
        raise MidgptError(f"--out_dir {out_dir} holds a run (config.json), not data; pass another --out_dir")
    # Found only at the renames, after meta.json was removed: the old dataset was lost, and .tmp files left.
    for name in FILES:
        if (out_dir / name).is_dir():
            raise MidgptError(f"--out_dir {out_dir} holds a folder named {name}, where this file goes; move it "
                              "away, or pass another --out_dir")
    if (old := _old_meta(out_dir)) is None:  # none, or damaged: nothing whole to lose
        return
    from_hub = lambda source: (source.get("dataset") if isinstance(source, dict)
                               and source.get("dataset") not in FILE_BUILDERS else None)
    if old.get("tokenizer") != tokenizer:
        kind = f"data of another tokenizer ({old.get('tokenizer')!r}, not {tokenizer!r})"
    elif (hub := from_hub(old.get("source"))) and from_hub(source) != hub:  # a download of hours, replaced
        kind = f"a dataset prepared from the Hub ({hub}), not from {from_hub(source) or 'your own files'}"
    else:
        return
    raise MidgptError(f"--out_dir {out_dir} holds {kind}, which this would replace; pass another --out_dir, "
                      f"or remove its {', '.join(FILES[:-1])} and {FILES[-1]} first")


def _old_meta(out_dir: Path) -> dict | None:
    """out_dir's meta.json, or None where it is missing, damaged or not a JSON object."""
    try:
        old = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


# What says that two prepared datasets are the same: their vocabulary, their splits' sizes and
# contents (a meta.json made before a key existed lacks it: compared where both have it).
DATA_IDENTITY = ("tokenizer", "vocab_size", "chars", "train_tokens", "val_tokens", "sha256")


def differences(meta: dict, other: dict) -> list[str]:
    """The DATA_IDENTITY keys in which two datasets' meta.json differ."""
    return [k for k in DATA_IDENTITY if k in meta and k in other and meta[k] != other[k]]


def replace_dataset(out_dir: Path, written: dict[str, Path]) -> str:
    """Rename each of FILES from where it was written (beside it) over the old one, meta.json last.

    Returns what the final line adds: that the old dataset held other data, or nothing.
    """
    differ = differences(_old_meta(out_dir) or {}, json.loads(written["meta.json"].read_text()))
    # A stale meta.json beside half-replaced .bin files would vouch for the wrong data.
    (out_dir / "meta.json").unlink(missing_ok=True)
    for name in FILES:
        os.replace(written[name], out_dir / name)
    # Prepared again in place, as it may be, but not silently: runs on the old data will not resume on it.
    return (f", over other data ({', '.join(differ)} differ): runs that trained on that data will not resume "
            "on this" if differ else "")


def lock_out_dir(out_dir: Path) -> None:
    """Hold out_dir until this process ends: a second prepare.py writing there at once would mix its files in."""
    # Both would write the same .tmp files, and rename each other's: one dataset of both texts, or none.
    lock_directory(out_dir, f"another prepare.py is writing to {out_dir}; wait for it to end, "
                            "or pass another --out_dir")
