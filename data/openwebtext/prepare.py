"""OpenWebText (or local text) -> GPT-2 BPE train.bin / val.bin (uint16) and meta.json.

Sources, all streamed so memory stays flat however large the corpus:
  default    the Hugging Face dataset --dataset (Skylion007/openwebtext), its parquet export
  --dataset json --data_files F   your own files, read by Hugging Face datasets (also parquet, csv, text, arrow)
  --input    local files: .txt holds ONE DOCUMENT PER BLANK-LINE-SEPARATED BLOCK (documents
             separated by one or more empty or whitespace-only lines), .jsonl a "text" field
             per line, .parquet a "text" column
Every document's tokens are followed by EOT (50256); empty or whitespace-only rows are no
documents. A document goes to val iff the first 8 bytes of sha256(its UTF-8 text) fall under
--val_fraction of 2**64: the same inputs give byte-identical outputs, and duplicate documents
never straddle train and val.
"""

import contextlib
import functools
import glob
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from tqdm import tqdm

from midgpt.cli import ArgumentParser
from midgpt.errors import MidgptError
from midgpt.prepare import FILE_BUILDERS, FILES, check_out_dir, lock_out_dir, replace_dataset
from midgpt.tokenizer import (compressed_advice, gpt2, not_utf8_advice, nul_advice, utf16_no_mark_advice,
                              utf16_or_32_advice)

MAX_DOCUMENT = 64 << 20  # characters of a .txt file's blank-line-separated block, or of a .jsonl line
DOCS_PER_TASK = 1024  # big enough to amortise pickling, small enough to keep RAM per worker low
# ... or fewer, of long documents: 1024 books, one a .jsonl line, were a task of gigabytes, held whole.
CHARS_PER_TASK = 4 << 20
SPLITS = ("train", "val")
REVISION = "refs/convert/parquet"  # the Hub's parquet export of a dataset
# A null may be a document lost upstream: refused, where an empty text is a document that says nothing.
FILL_NULLS = "drop such rows, or fill them with '' (empty texts are skipped)"
# The FILE_BUILDERS --dataset may name: not pandas, whose files are pickles that may run code.
FORMATS = "json, parquet, csv, text or arrow"
TEXT_BUILDERS = ("json", "csv", "text")  # the FILE_BUILDERS that read text files, not binary ones
BUILDER_OF = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
              ".arrow": "arrow"}


def parquet_file(path: str):
    import pyarrow.parquet  # imported here: .txt and .jsonl runs do not need pyarrow

    try:
        return pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as e:  # a truncated download, another format
        raise MidgptError(f"{path}: not a readable parquet file ({e})") from None


def check_inputs(paths: list[str]) -> None:
    """Raise MidgptError for a missing file, an unknown extension or a parquet without a text column."""
    for path in paths:
        if os.path.isdir(path):
            raise MidgptError(f"{path} is a directory; pass its files, e.g. {os.path.join(path, '*.txt')}")
        if os.path.exists(path) and not os.path.isfile(path):  # <(zcat a.txt.gz) is /dev/fd/63: no file, no extension
            raise MidgptError(f"{path} is not a regular file (a pipe or a device); write its text to a .txt, "
                              ".jsonl or .parquet file and pass that")
        if not os.path.isfile(path):
            raise MidgptError(f"input file not found: {path}")
        suffix = Path(path).suffix.lower()  # NOTES.TXT is a .txt
        if suffix not in (".txt", ".jsonl", ".parquet"):
            raise MidgptError(compressed_advice(path)
                              or f"{path}: unknown extension {Path(path).suffix!r}; use .txt, .jsonl or .parquet")
        if suffix == ".parquet":
            import pyarrow

            schema = parquet_file(path).schema_arrow
            if "text" not in schema.names:
                raise MidgptError(f"{path}: parquet file has no 'text' column")
            kind = schema.field("text").type
            if pyarrow.types.is_dictionary(kind):  # strings stored once each, as pandas' categoricals are
                kind = kind.value_type
            if str(kind) not in ("string", "large_string", "string_view"):
                raise MidgptError(f"{path}: its 'text' column holds {schema.field('text').type}, not strings")


def check_text_files(data_files: list[str]) -> None:
    """Raise MidgptError for a local one of --data_files in UTF-16 or UTF-32, with a byte-order mark or without."""
    # Without a mark, its ASCII reads as UTF-8: the rows' text held a NUL beside each letter.
    for pattern in data_files:
        for path in glob.glob(os.path.expanduser(pattern), recursive=True) if "://" not in pattern else []:
            if os.path.isfile(path) and (advice := utf16_or_32_advice(path) or utf16_no_mark_advice(path)):
                raise MidgptError(advice)


def file_documents(path: str):
    """Yield the documents of one local file, reading it as a stream."""
    try:
        yield from _file_documents(path)
    except UnicodeDecodeError as e:  # its position would count from a read buffer, not the file
        raise MidgptError(not_utf8_advice(path, e.reason)) from None


def _file_documents(path: str):
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow

        batches = parquet_file(path).iter_batches(batch_size=DOCS_PER_TASK, columns=["text"])
        try:
            for row, text in enumerate((text for batch in batches for text in batch.column(0).to_pylist()), 1):
                if text is None:
                    raise MidgptError(f"{path}: row {row}'s 'text' is null; {FILL_NULLS}")
                yield text
        except (pyarrow.ArrowException, OSError) as e:  # a footer that reads, over damaged pages
            raise MidgptError(f"{path}: damaged parquet data ({str(e).strip().splitlines()[0]})") from None
        return
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not text
        # At most a document's worth at a time: a line of gigabytes (a file without newlines) is refused at
        # its first piece, not read whole. Only such a line comes in pieces, and its first one is refused.
        lines = iter(functools.partial(f.readline, MAX_DOCUMENT + 1), "")
        if suffix == ".jsonl":
            for lineno, line in enumerate(lines, 1):
                if "\0" in line:  # raw, no JSON at all (an escaped "\u0000" is read as the document's)
                    raise MidgptError(nul_advice(path))
                if len(line.rstrip("\n")) > MAX_DOCUMENT:  # held whole and tokenized, a document takes 14x its size
                    raise MidgptError(f"{path}:{lineno}: a line of over {MAX_DOCUMENT >> 20}M characters, more than "
                                      "one document may hold; split that document, or leave it out")
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except json.JSONDecodeError as e:
                    raise MidgptError(f"{path}:{lineno}: not JSON ({e})") from None
                except (ValueError, RecursionError) as e:  # an int of over 4300 digits; arrays nested 1e5 deep
                    raise MidgptError(f"{path}:{lineno}: JSON that Python cannot read ({str(e).split(';')[0]}); "
                                      "leave that line out") from None
                except (KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise MidgptError(f"{path}:{lineno}: not a JSON object with a string 'text' field")
                # A "\ud83d" escape (an emoji cut in two, common in scraped text) is no UTF-8: U+FFFD, as
                # tiktoken would.
                yield text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return
        block, size = [], 0
        # The sentinel blank line flushes the last block.
        for lineno, line in enumerate(itertools.chain(lines, ["\n"]), 1):
            # By line, not by document: UTF-16's blank lines hold NULs, and its whole file would be one document.
            if "\0" in line:
                raise MidgptError(nul_advice(path))
            if line.strip():
                block.append(line.rstrip("\n"))
                size += len(block[-1]) + (len(block) > 1)  # the document's length: its lines, joined by "\n"
                if size > MAX_DOCUMENT:  # a file of one document per line, say
                    raise MidgptError(f"{path}:{lineno}: a document of over {MAX_DOCUMENT >> 20}M characters; in "
                                      ".txt files, blank lines separate documents (or use .jsonl, one per line)")
            elif block:
                yield "\n".join(block)
                block, size = [], 0


class RetriesInOneLine(logging.Filter):
    """huggingface_hub's retries of failed requests, said in one line a minute at most: it logs two lines a try.

    A rate limit's wait, which may be long, is said as huggingface_hub says it.
    """

    def __init__(self, dataset: str):
        super().__init__()
        self.dataset, self.said_at = dataset, -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if " thrown while requesting " not in text and not text.startswith("Retrying in "):
            return True
        if time.monotonic() - self.said_at < 60:
            return False
        self.said_at = time.monotonic()
        record.msg, record.args = (f"prepare.py: a request to the Hugging Face Hub for {self.dataset} failed "
                                   f"({text.split(' thrown while')[0]}); retrying, up to 5 times a request"), ()
        return True


class FailedFile(logging.Filter):
    """Drops a datasets builder's line on a file it could not read, keeping the file for the error's one line."""

    file = None

    def filter(self, record: logging.LogRecord) -> bool:
        found = re.match(r"Failed to .*?'(.*)' with error ", record.getMessage())
        if found:
            self.file = found[1]
        return not found


def connection_errors() -> tuple[type[BaseException], ...]:
    """The errors of a connection that failed: Python's, and those of the HTTP clients datasets and its hub use."""
    errors = [ConnectionError, TimeoutError]  # requests' own are OSErrors, but neither of these
    for module, name in (("requests", "RequestException"), ("httpx", "TransportError"), ("httpx2", "TransportError"),
                         ("aiohttp", "ClientConnectionError")):
        if module in sys.modules:  # only a client already imported can have raised
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def hf_documents(name: str, data_files: list[str] | None = None):
    """Yield the 'text' of each row of a Hugging Face dataset's train split, streamed."""
    import datasets  # imported here: local-file runs should not pay for it
    import pandas  # datasets' csv builder reads with it
    import pyarrow

    hub_log, retries = logging.getLogger("huggingface_hub.utils._http"), RetriesInOneLine(name)
    hub_log.addFilter(retries)
    builder_log, failed = logging.getLogger(f"datasets.packaged_modules.{name}.{name}"), FailedFile()
    builder_log.addFilter(failed)
    # The Hub's openwebtext is a loading script that datasets>=4 refuses; its parquet export is not.
    where = {"data_files": data_files} if data_files else {"revision": REVISION}
    # The text builder's rows are lines by default: documents of a line each, without their newlines. A csv's
    # "NA", "null" or "" are text, not missing: pandas' default read them as null, and the run was refused.
    options = {"text": {"sample_by": "paragraph"}, "csv": {"keep_default_na": False}}.get(name, {})
    try:
        for row in datasets.load_dataset(name, split="train", streaming=True, **where, **options):
            if not isinstance(row.get("text"), str):  # as --input's .parquet files, a null is refused, not skipped
                raise MidgptError(f"{name}: a row's 'text' is null; {FILL_NULLS}" if row.get("text", 0) is None else
                                  f"{name}: a row's 'text' is not a string" if "text" in row else
                                  f"{name}: a row has no 'text' field (columns: {sorted(row)})")
            if name != "text":
                yield row["text"]
                continue
            # A paragraph ends at "\n\n" alone; --input's .txt documents at any blank or whitespace-only line.
            for blank, lines in itertools.groupby(row["text"].split("\n"), key=lambda line: not line.strip()):
                if not blank:
                    yield "\n".join(lines)
    # json's and parquet's builders read a first row for the columns, of files with none; csv's reads a header.
    except (StopIteration, pandas.errors.EmptyDataError):
        if name not in FILE_BUILDERS:
            raise
        raise MidgptError(f"{' '.join(data_files)}: no rows to read (empty files?); pass files that hold "
                          "text") from None
    except connection_errors() as e:  # an unreachable Hub, or host of remote --data_files
        host = "the Hugging Face Hub" if not data_files or "hf://" in " ".join(data_files) else "the files' host"
        fix = "download them and pass them as --input" if data_files else "pass --input FILES"
        raise MidgptError(f"could not reach {host} for {name} ({e}); {fix} instead") from None
    # A file of another format than the builder's; or of its format, but malformed: a csv's unclosed quote or
    # ragged row (pandas' ParserError), a json file's line that is no object (datasets' ValueError).
    except (pyarrow.ArrowException, ValueError) as e:
        if name not in FILE_BUILDERS:  # a Hub dataset's own files: its traceback is the report
            raise
        reason = f"not UTF-8: {e.reason}" if isinstance(e, UnicodeDecodeError) else str(e).strip().splitlines()[0]
        file = failed.file or " ".join(data_files)
        fix = f"pass its format as --dataset: {FORMATS}"
        if isinstance(e, UnicodeDecodeError):  # a file of a binary format, or text in another encoding
            fix = f"if it is text, convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8); if not, {fix}"
        elif not isinstance(e, pyarrow.ArrowException):
            fix = f"fix it where it says; or, if it is not {name}, {fix}"
        elif name == "json" and "surrogate" in reason:  # JSON after all: a "\ud83d" that pyarrow's parser refuses
            fix = "pass .jsonl files as --input instead, which reads half an emoji (a lone surrogate) as U+FFFD"
        # Raised in the pool's task thread, it reaches main() through a worker: one line, not a pool's traceback.
        raise MidgptError(utf16_or_32_advice(file) or f"{file}: not a readable {name} file ({reason}); {fix}") from None
    finally:
        hub_log.removeFilter(retries)
        builder_log.removeFilter(failed)


def tokenize(docs: list[str], val_fraction: float) -> dict[str, np.ndarray]:
    """Return one batch's uint16 tokens, EOT after each document, keyed by split."""
    enc, ids = gpt2(), {s: [np.zeros(0, np.uint16)] for s in SPLITS}
    for text in docs:
        if not text.strip():  # a lone EOT would teach the model nothing
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        split = "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"
        # uint16 per document: a batch's tokens as Python ints would cost ~30x the memory.
        # encode_ordinary never emits EOT, so the EOTs count the documents.
        ids[split].append(np.array(enc.encode_ordinary(text) + [enc.eot_token], dtype=np.uint16))
    return {s: np.concatenate(ids[s]) for s in SPLITS}


def tasks(documents):
    """Lists of consecutive documents, at most DOCS_PER_TASK of them and CHARS_PER_TASK characters but for one."""
    task, size = [], 0
    for text in documents:
        if task and (len(task) == DOCS_PER_TASK or size + len(text) > CHARS_PER_TASK):
            yield task
            task, size = [], 0
        task.append(text)
        size += len(text)
    if task:
        yield task


class Stopped(BaseException):
    """SIGINT or SIGTERM, raised in the main process so that the unfinished files are removed."""


def raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # not SIGHUP, unlike launch.py's (midgpt.cli.STOP_SIGNALS)


def quiet_worker():
    """Leave signals to the main process: Ctrl-C reaches every worker too, and each would print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # how the pool ends its workers
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def quiet_pool(num_proc: int):
    """A pool whose workers hold the stop signals until quiet_worker has set them."""
    # Otherwise a Ctrl-C in the moment a worker starts raised Stopped in it, which could leave the
    # pool's queue locked and the main process hung in its shutdown (seen under load).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return multiprocessing.Pool(num_proc, quiet_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def stop_workers(pool) -> None:
    """End the pool's workers: terminate, or kill them where terminate hangs."""
    # terminate() can wait for good on a worker blocked sending a result that nobody reads any more
    # (seen under load); by then it has stopped the pool from starting new workers. The locks of the
    # killed workers stay taken: main() leaves by os._exit, not through multiprocessing's exit handler.
    stopping = threading.Thread(target=pool.terminate, daemon=True)
    stopping.start()
    stopping.join(timeout=3)
    for worker in multiprocessing.active_children():
        worker.kill()


def prepare(documents, out_dir: Path, num_proc: int, val_fraction: float, source: dict) -> None:
    """Tokenize documents into out_dir's .tmp files, then rename them over the old ones, meta.json last."""
    made = not out_dir.exists()  # removed again if this run fails, as it then holds nothing
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, or a folder not ours to write
        raise MidgptError(f"cannot make --out_dir {out_dir} ({e.strerror}); "
                          "pass a directory you can write to") from None
    lock_out_dir(out_dir)  # before any .tmp file is touched: on a refusal they are the other one's
    tmp = {name: out_dir / f"{name}.tmp" for name in FILES}
    tokens, docs, sha = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), {s: hashlib.sha256() for s in SPLITS}
    batches = tasks(documents)
    start = time.perf_counter()
    pool = quiet_pool(num_proc)
    try:
        # delay: a run that fails at once (bad input, no Hub) prints only its one error line.
        with open(tmp["train.bin"], "wb") as train_f, open(tmp["val.bin"], "wb") as val_f, \
                tqdm(unit="doc", delay=2) as bar:
            files = {"train": train_f, "val": val_f}
            # imap keeps document order, so the output is the same for any num_proc.
            for ids in pool.imap(functools.partial(tokenize, val_fraction=val_fraction), batches):
                for s in SPLITS:
                    ids[s].tofile(files[s])  # appended now, never held: memory is per batch
                    sha[s].update(ids[s])
                    tokens[s] += len(ids[s])
                    docs[s] += int(np.count_nonzero(ids[s] == gpt2().eot_token))
                n_tokens = sum(tokens.values())
                bar.set_postfix(tokens=f"{n_tokens:,}", tok_s=f"{n_tokens / (time.perf_counter() - start):,.0f}",
                                refresh=False)
                bar.update(sum(docs.values()) - bar.n)
        pool.close()
        pool.join()
        # data.py cannot memory-map an empty split, and training needs both.
        if not any(docs.values()):
            raise MidgptError("the input holds no documents, only empty or whitespace-only text")
        inputs = source.get("input", [])
        txt = any(Path(path).suffix.lower() == ".txt" for path in inputs)
        hint = " (in .txt files, blank lines separate them)" if txt else ""
        if sum(docs.values()) == 1:  # no --val_fraction splits one document in two
            raise MidgptError(f"{inputs[0] if len(inputs) == 1 else 'the input'} holds one document, and train "
                              f"and val need one each: add documents{hint}")
        if empty := [s for s in SPLITS if docs[s] == 0]:
            raise MidgptError(f"no document went to {empty[0]} ({sum(docs.values())} documents, "
                              f"--val_fraction {val_fraction}); change --val_fraction or add documents{hint}")
        seconds, n_docs, n_tokens = time.perf_counter() - start, sum(docs.values()), sum(tokens.values())
        meta = {"tokenizer": "gpt2", "vocab_size": gpt2().n_vocab,
                **{f"{s}_tokens": tokens[s] for s in SPLITS}, **{f"{s}_documents": docs[s] for s in SPLITS},
                "val_fraction": val_fraction,  # what preparing the same data again takes, with the same text
                "sha256": {f"{s}.bin": sha[s].hexdigest() for s in SPLITS}, "source": source}
        tmp["meta.json"].write_text(json.dumps(meta))
        # The renames below take microseconds, and a stop in them would leave neither dataset whole.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    except BaseException:
        stop_workers(pool)
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):  # not the error in flight
                out_dir.rmdir()
        raise
    # Only now, when every new file is written, are the old replaced: a failed run leaves a complete dataset complete.
    replaced = replace_dataset(out_dir, tmp)
    print(f"{n_docs:,} documents, {n_tokens:,} tokens (val {tokens['val']:,}) in {seconds:.1f}s, "
          f"{n_tokens / seconds:,.0f} tokens/s -> {out_dir}{replaced}")


def main() -> None:
    parser = ArgumentParser(description=__doc__, prog="data/openwebtext/prepare.py")
    parser.add_argument("--input", nargs="+", action="extend", type=os.path.expanduser, metavar="FILES",
                        help=".txt (one document per blank-line-separated block), .jsonl or .parquet files")
    parser.add_argument("--dataset", help="Hugging Face dataset, without --input (default: Skylion007/openwebtext)")
    parser.add_argument("--data_files", nargs="+", action="extend",
                        help="data files for --dataset, e.g. --dataset parquet --data_files X")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # a job's share
    parser.add_argument("--num_proc", type=int, default=cpus, help=f"tokenizer processes (default: all {cpus} CPUs)")
    parser.add_argument("--val_fraction", type=float, help="share of documents for val (default: 0.0005 of "
                        "OpenWebText's 8M; 0.01 of your own files, which hold far fewer)")
    parser.add_argument("--out_dir", type=os.path.expanduser,
                        help="default: data/openwebtext, or data/bpe_corpus for your own files")
    for sig in STOP_SIGNALS:
        signal.signal(sig, raise_stopped)
    try:
        args = parser.parse_args()
        # An unset $VAR: Path("") is the working directory, and --dataset "" was OpenWebText's download.
        given = {"out_dir": [args.out_dir], "input": args.input or [], "dataset": [args.dataset],
                 "data_files": args.data_files or []}
        if empty := [flag for flag, values in given.items() if "" in values]:
            parser.error(f"--{empty[0]} is empty")
        if args.input and (args.dataset or args.data_files):
            parser.error("--dataset and --data_files read through Hugging Face datasets, --input reads its files "
                         "itself: pass one or the other")
        if args.dataset == "pandas":  # datasets refuses it further on, in a traceback
            parser.error(f"--dataset pandas reads pickles, which may run code: pass your files in another format "
                         f"({FORMATS})")
        # datasets reads a local path as your files, of a format it guesses (.txt: a document a line), as a Hub
        # dataset's: 0.05% of it to val, over data/openwebtext.
        if args.dataset not in (None, *FILE_BUILDERS) and os.path.exists(os.path.expanduser(args.dataset)):
            local = os.path.expanduser(args.dataset)
            example = os.path.join(args.dataset, "*.txt") if os.path.isdir(local) else args.dataset
            parser.error(f"--dataset {args.dataset} is a local {'directory' if os.path.isdir(local) else 'file'}, "
                         f"not a Hugging Face dataset: pass your files as --input {example} (.txt, .jsonl, .parquet), "
                         f"or as --dataset FORMAT --data_files FILE ... ({FORMATS})")
        if any(f.startswith(("http://", "https://")) for f in args.data_files or []) and not find_spec("aiohttp"):
            parser.error("--data_files over http(s) need aiohttp (pip install aiohttp); or download them and pass them "
                         "as --input")
        # Without files, datasets' builders read every file in the working directory.
        if args.dataset in FILE_BUILDERS and not args.data_files:
            parser.error(f"--dataset {args.dataset} reads the files you name: add --data_files FILE ..., "
                         "or pass them as --input FILE ...")
        if args.data_files and not args.dataset:  # they were ignored, and OpenWebText downloaded
            formats = {BUILDER_OF.get(Path(f).suffix.lower(), FORMATS) for f in args.data_files}
            parser.error(f"--data_files are read by --dataset, which names their format: add --dataset "
                         f"{formats.pop() if len(formats) == 1 else FORMATS}, or pass them as --input FILE ...")
        if args.dataset in FILE_BUILDERS:
            for f in (f for f in args.data_files if "://" not in f):  # the local ones
                path = os.path.expanduser(f)
                # A pattern that matched nothing was an empty dataset, or a traceback; a file named alone, missing
                # or a directory, datasets' "Unable to find" of either.
                if glob.has_magic(f):
                    if not glob.glob(path, recursive=True):
                        raise MidgptError(f"--data_files {f} matches no file; pass files that exist")
                elif os.path.isdir(path):
                    suffix = {builder: suffix for suffix, builder in BUILDER_OF.items()}.get(args.dataset, "")
                    raise MidgptError(f"--data_files {f} is a directory; pass its files, e.g. "
                                      f"{os.path.join(f, '*' + suffix)}")
                elif not os.path.exists(path):
                    raise MidgptError(f"--data_files {f}: no such file; pass files that exist")
            if args.dataset in TEXT_BUILDERS:
                check_text_files(args.data_files)
        own = args.input or args.dataset in FILE_BUILDERS  # your own text: far fewer documents than OpenWebText's 8M
        if args.val_fraction is None:
            args.val_fraction = 0.01 if own else 0.0005
        if args.out_dir is None:  # your own text never replaces a prepared OpenWebText
            args.out_dir = str(Path(__file__).resolve().parent.parent / ("bpe_corpus" if own else "openwebtext"))
        if not 0.0 < args.val_fraction < 1.0:  # 0 or 1 leaves a split empty
            raise MidgptError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
        if not 1 <= args.num_proc <= cpus:  # each one more copy of the tokenizer, in memory; 10,000 were a fork bomb
            raise MidgptError(f"--num_proc must be from 1 to {cpus}, the CPUs this process may use; "
                              f"got {args.num_proc}")
        gpt2()  # load the tokenizer once here, so forked workers inherit it
        if args.input:
            check_inputs(args.input)
            documents = itertools.chain.from_iterable(map(file_documents, args.input))
            source = {"input": list(map(os.path.abspath, args.input))}
        else:
            dataset = args.dataset or "Skylion007/openwebtext"
            documents = hf_documents(dataset, args.data_files)
            # Local files and patterns by absolute path, as --input's; URLs (hf://) as given.
            files = [f if "://" in f else os.path.abspath(os.path.expanduser(f)) for f in args.data_files or []]
            where = {"data_files": files} if files else {"revision": REVISION}
            source = {"dataset": dataset, **where}
        check_out_dir(Path(args.out_dir), "gpt2", source)
        prepare(documents, Path(args.out_dir), args.num_proc, args.val_fraction, source)
    except (MidgptError, OSError, UnicodeDecodeError) as e:
        leave(f"prepare.py: {e}", 1)
    except ModuleNotFoundError as e:  # parquet files and the Hub need the extra
        leave(f"prepare.py: {e}; install what .parquet files and the Hub need: pip install -e '.[openwebtext]'", 1)
    except Stopped as e:
        leave(f"prepare.py: stopped by {e}; nothing prepared before was replaced, and the unfinished "
              ".tmp files are removed", 128 + signal.Signals[str(e)])
    except Exception:  # the Hub's or a reader's own: the traceback is the report, but leaving must not hang
        traceback.print_exc()
        leave("prepare.py: failed (above); nothing prepared before was replaced", 1)


def leave(message: str, code: int):
    """Print message and exit at once: multiprocessing's exit handler would wait for the workers prepare() killed."""
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
