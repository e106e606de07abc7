"""Throughput and peak memory of data/openwebtext/prepare.py on generated local text.

python benchmarks/prepare_openwebtext.py [--sizes_mb 10 100] [--num_proc 2] [--text PATH]
prints one JSON line per corpus. The corpora are .txt files in a temp dir of ~5 KB documents
(OpenWebText's mean): Zipf-distributed made-up words, or with --text, paragraphs of a real text
(e.g. Tiny Shakespeare), whose BPE speed is nearer to real web text's.
peak_rss_mb is the largest single process of the tree: getrusage(RUSAGE_CHILDREN) only ever
reports the largest child, so the prepare parent's own peak and its workers' are given apart.
"""

import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from midgpt.cli import ArgumentParser, positive_int, run, say
from midgpt.errors import MidgptError

PREPARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "openwebtext", "prepare.py")
# Runs prepare.py in this very process, so RUSAGE_SELF is the parent's peak, RUSAGE_CHILDREN the workers'.
WRAPPER = """
import json, resource, runpy, sys
report, sys.argv = sys.argv[1], sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(report, "w") as f:
        json.dump({who: resource.getrusage(getattr(resource, who)).ru_maxrss
                   for who in ("RUSAGE_SELF", "RUSAGE_CHILDREN")}, f)
"""


def text_blocks(source: str) -> list[str]:
    """The blank-line-separated blocks of a real text; a MidgptError if it has none."""
    try:
        with open(source, encoding="utf-8") as f:
            blocks = [b.strip() for b in f.read().split("\n\n") if b.strip()]
    except OSError as e:
        raise MidgptError(f"cannot read --text {source}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise MidgptError(f"--text {source}: not UTF-8 text ({e.reason})") from None
    if not blocks:
        raise MidgptError(f"--text {source}: holds no text to draw documents from")
    if any("\0" in block for block in blocks):  # a binary file, or UTF-16: prepare.py named the temporary corpus
        raise MidgptError(f"--text {source}: holds NUL characters, so it is not UTF-8 text; pass a text file")
    return blocks


def write_corpus_from(path: str, size_mb: int, blocks: list[str], seed: int = 0) -> None:
    """Write ~size_mb MiB of documents drawn from the blocks of a real text."""
    rng = random.Random(seed)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < size_mb * 2**20:
            doc = "\n".join(rng.choices(blocks, k=rng.randint(5, 60))) + "\n\n"  # ~OpenWebText's 5 KB mean
            f.write(doc)
            size += len(doc)


def write_corpus(path: str, size_mb: int, seed: int = 0) -> None:
    """Write ~size_mb MiB of documents, one per blank-line-separated block."""
    rng = random.Random(seed)
    syllables = "ba be bi bo bu ca co da de di do el en er es fa fi ga go ha he in is ka ko la le li lo " \
                "ma me mi mo na ne ni no on or pa pe pi po ra re ri ro sa se si so ta te ti to un ve vi".split()
    vocab = ["".join(rng.choices(syllables, k=rng.choice((1, 1, 2, 2, 3, 4)))) for _ in range(20_000)]
    cum_weights = list(itertools.accumulate(1 / rank for rank in range(1, len(vocab) + 1)))
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < size_mb * 2**20:
            words = rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(100, 1700))
            lines = (" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, len(words), 12))
            doc = "\n".join(lines) + "\n\n"
            f.write(doc)
            size += len(doc)


def measure(corpus: str, out_dir: str, num_proc: int, val_fraction: float) -> dict:
    """Run prepare.py on corpus under the wrapper; return its sizes, speed and peak memory."""
    report = os.path.join(out_dir, "rusage.json")
    args = [sys.executable, "-c", WRAPPER, report, PREPARE, "--input", corpus, "--out_dir", out_dir,
            "--num_proc", str(num_proc), "--val_fraction", str(val_fraction)]
    start = time.perf_counter()
    result = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:  # its last line says why (prepare.py's one-line error)
        why = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise MidgptError(f"{why[0]} (on {os.path.basename(corpus)})")
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    with open(report) as f:
        rusage_kb = json.load(f)
    tokens = meta["train_tokens"] + meta["val_tokens"]
    parent_mb, worker_mb = rusage_kb["RUSAGE_SELF"] / 1024, rusage_kb["RUSAGE_CHILDREN"] / 1024
    return {
        "corpus_mb": round(os.path.getsize(corpus) / 2**20, 1),
        "documents": meta["train_documents"] + meta["val_documents"],
        "tokens": tokens,
        "seconds": round(seconds, 2),  # wall time of the whole run, interpreter start included
        "tokens_per_sec": round(tokens / seconds),
        "peak_rss_mb": round(max(parent_mb, worker_mb), 1),
        "parent_peak_rss_mb": round(parent_mb, 1),
        "worker_peak_rss_mb": round(worker_mb, 1),
    }


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--sizes_mb", type=positive_int, nargs="+", default=[10, 100],
                        help="the corpora's sizes, in MiB of text (default: 10 100)")
    parser.add_argument("--num_proc", type=positive_int, default=2, help="tokenizer processes")
    # 0.01, prepare.py's own for --input files (not OpenWebText's 0.0005): a 10 MiB corpus holds ~2,000 documents,
    # and val must not be empty.
    parser.add_argument("--val_fraction", type=float, default=0.01, help="share of documents for val")
    parser.add_argument("--text", help="build the corpora from this real text's paragraphs instead of made-up words")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:  # train and val both need documents
        parser.error(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    blocks = text_blocks(args.text) if args.text else None
    with tempfile.TemporaryDirectory() as tmp:
        for size_mb in args.sizes_mb:
            corpus, out_dir = os.path.join(tmp, f"corpus_{size_mb}mb.txt"), os.path.join(tmp, f"out_{size_mb}mb")
            os.makedirs(out_dir)
            if args.text:
                write_corpus_from(corpus, size_mb, blocks)
            else:
                write_corpus(corpus, size_mb)
            if not say(json.dumps(measure(corpus, out_dir, args.num_proc, args.val_fraction))):
                break  # stdout's reader is gone: none reads the next size's


if __name__ == "__main__":
    run(main)
