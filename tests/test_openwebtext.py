"""data/openwebtext/prepare.py: exact GPT-2 BPE round trips, a deterministic split, bounded memory, safe failure."""

import collections
import contextlib
import csv
import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, this_tree_env
from test_sharding import free_port
from midgpt.errors import MidgptError
from midgpt.tokenizer import encode, gpt2

PREPARE = REPO_ROOT / "data" / "openwebtext" / "prepare.py"
WORDS = ("the of and to in is was for that with as on by he she it they at from his her an were are "
         "which this be or had not but first one their new after who been also time two would city "
         "year state school world people government between during house music river café naïve "
         "Zürich 東京 — “quoted” don't 1987 3.14 e-mail").split()


def iter_documents(seed: int):
    """Endless English-like documents of 1-4 lines, none blank, so every format can hold them exactly."""
    rng = random.Random(seed)
    while True:
        yield "\n".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 40))).capitalize() + rng.choice(".!?:")
                        for _ in range(rng.randint(1, 4)))


def write_corpus(path, docs: list[str]) -> str:
    """Write docs to path in the format its extension names; return the path as a string."""
    if path.suffix == ".txt":
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    else:  # small row groups, so the reader really walks several batches
        pq.write_table(pa.table({"id": range(len(docs)), "text": docs}), path, row_group_size=300)
    return str(path)


def run_prepare(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run prepare.py with args, capturing its output."""
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd)


def split_docs(out_dir, split: str) -> list[str]:
    """Decode <split>.bin back into documents, cutting at EOT."""
    ids = np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16)
    assert len(ids) and ids[-1] == gpt2().eot_token
    docs_with_eot = np.split(ids, np.flatnonzero(ids == gpt2().eot_token) + 1)[:-1]
    return [gpt2().decode(doc[:-1].tolist()) for doc in docs_with_eot]


def read_bins(out_dir) -> dict[str, bytes]:
    """The bytes of train.bin and val.bin."""
    return {name: (out_dir / name).read_bytes() for name in ("train.bin", "val.bin")}


# More documents than prepare.py's 1024 per task, so ordering across worker tasks is exercised.
DOCS = list(itertools.islice(iter_documents(seed=0), 2500))


def test_offline_gpt2_bpe_matches_known_ids():
    assert gpt2().encode_ordinary("Hello world") == [15496, 995]
    assert gpt2().eot_token == 50256
    # A prompt (sample.py's --start) may begin a document as the training data does.
    assert encode({"tokenizer": "gpt2"}, "<|endoftext|>Hello world") == [50256, 15496, 995]


def test_gpt2_bpe_is_read_without_the_network(tmp_path):
    # A proxy that takes the connection and never answers, as a firewall may: tiktoken's download (requests, no
    # timeout) waited on it forever, and sample.py and prepare.py with it. An empty tiktoken cache: no copy to find.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        proxy = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = {k: v for k, v in this_tree_env().items() if k.lower() != "no_proxy"}
        env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, TIKTOKEN_CACHE_DIR=str(tmp_path))
        result = subprocess.run([sys.executable, "-c", "from midgpt.tokenizer import gpt2; print(gpt2().encode('Hi'))"],
                                env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout == f"{gpt2().encode('Hi')}\n", result.stderr


def test_every_format_gives_the_same_exact_round_trip(tmp_path):
    # A document may quote the end-of-text token as text (it is not the end of that document), and a .txt
    # document's lines keep their indentation and trailing spaces.
    docs = [*DOCS[:1200], "Quotes <|endoftext|> as text.", "    def f():\n\treturn 1  ", *DOCS[1200:]]
    expected_tokens = sum(len(gpt2().encode_ordinary(d)) + 1 for d in docs)
    outputs = {}
    for ext in ("txt", "jsonl", "parquet"):
        corpus = write_corpus(tmp_path / f"corpus.{ext}", docs)
        out_dir = tmp_path / ext
        result = run_prepare("--input", os.path.basename(corpus), "--out_dir", out_dir, "--num_proc", 2,
                             "--val_fraction", 0.1, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        meta = json.loads((out_dir / "meta.json").read_text())
        assert meta["source"] == {"input": [corpus]}  # absolute: the path as typed means nothing elsewhere
        assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
        assert meta["train_tokens"] + meta["val_tokens"] == expected_tokens
        for split in ("train", "val"):  # data.py checks each file's length against its count
            assert meta[f"{split}_tokens"] == os.path.getsize(out_dir / f"{split}.bin") // 2
        assert meta["train_documents"] + meta["val_documents"] == len(docs)
        train, val = split_docs(out_dir, "train"), split_docs(out_dir, "val")
        assert (len(train), len(val)) == (meta["train_documents"], meta["val_documents"])
        assert 0.05 * len(docs) < len(val) < 0.15 * len(docs)
        assert collections.Counter(train + val) == collections.Counter(docs)
        # Each split keeps the corpus order; val holds the documents that --help's rule sends there.
        assert train == [d for d in docs if d not in set(val)]
        assert val == [d for d in docs if int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big") < 0.1 * 2**64]
        outputs[ext] = read_bins(out_dir)
    assert outputs["txt"] == outputs["jsonl"] == outputs["parquet"]


def test_an_upper_case_extension_reads_as_its_lower_case(tmp_path):
    # NOTES.TXT was refused as an unknown extension.
    lower = write_corpus(tmp_path / "corpus.jsonl", DOCS[:200])
    upper = tmp_path / "CORPUS.JSONL"
    shutil.copy(lower, upper)
    for corpus, out_dir in ((lower, tmp_path / "lower"), (upper, tmp_path / "upper")):
        result = run_prepare("--input", corpus, "--out_dir", out_dir, "--val_fraction", 0.1)
        assert result.returncode == 0, result.stderr
    assert read_bins(tmp_path / "upper") == read_bins(tmp_path / "lower")


def test_split_is_deterministic_and_independent_of_num_proc(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCS)
    outputs = []
    for run, num_proc in enumerate((2, 2, 1)):
        out_dir = tmp_path / f"run{run}"
        result = run_prepare("--input", corpus, "--out_dir", out_dir, "--num_proc", num_proc, "--val_fraction", 0.1)
        assert result.returncode == 0, result.stderr
        bins = read_bins(out_dir)
        meta = json.loads((out_dir / "meta.json").read_text())
        assert meta["sha256"] == {name: hashlib.sha256(data).hexdigest() for name, data in bins.items()}
        outputs.append(bins)
    assert outputs[0] == outputs[1] == outputs[2]


def test_blank_line_blocks_are_documents(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\nfirst line\nsecond line\n\n\n \nnext doc\n\nlast doc", encoding="utf-8")
    result = run_prepare("--input", corpus, "--out_dir", tmp_path / "out", "--val_fraction", 0.5)
    assert result.returncode == 0, result.stderr
    docs = split_docs(tmp_path / "out", "train") + split_docs(tmp_path / "out", "val")
    assert sorted(docs) == sorted(["first line\nsecond line", "next doc", "last doc"])


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_empty_rows_are_no_documents(tmp_path, ext):
    docs = DOCS[:40]
    with_empty = [d for i, doc in enumerate(docs) for d in ([doc, "", " \n\t"] if i % 7 == 0 else [doc])]
    outputs = []
    for name, corpus_docs in (("clean", docs), ("with_empty", with_empty)):
        corpus = write_corpus(tmp_path / f"{name}.{ext}", corpus_docs)
        if ext == "jsonl" and name == "with_empty":  # and lines with no JSON at all: a blank one, one of spaces
            path = tmp_path / f"{name}.{ext}"
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("\n" + "".join(lines[:5]) + " \t\n" + "".join(lines[5:]) + "\n")
        result = run_prepare("--input", corpus, "--out_dir", tmp_path / name, "--val_fraction", 0.1)
        assert result.returncode == 0, result.stderr
        outputs.append((read_bins(tmp_path / name), json.loads((tmp_path / name / "meta.json").read_text())))
    (clean_bins, clean_meta), (bins, meta) = outputs
    assert bins == clean_bins
    assert meta["train_documents"] + meta["val_documents"] == len(docs)


def test_a_lone_surrogate_in_jsonl_becomes_a_replacement_character(tmp_path):
    # json.loads makes "\ud83d" (half an emoji, cut by a scraper) a string that UTF-8 cannot encode.
    corpus = tmp_path / "cut.jsonl"
    corpus.write_text('{"text": "broken emoji \\ud83d here"}\n'
                      + "".join(json.dumps({"text": d}) + "\n" for d in DOCS[:20]))
    result = run_prepare("--input", corpus, "--out_dir", tmp_path / "out", "--val_fraction", 0.1)
    assert result.returncode == 0, result.stderr
    assert "broken emoji \ufffd here" in split_docs(tmp_path / "out", "train") + split_docs(tmp_path / "out", "val")
    # pyarrow's JSON reader refuses it, and the line said to pass the file's format, which --dataset json is.
    result = run_prepare("--dataset", "json", "--data_files", corpus, "--out_dir", tmp_path / "out_json")
    fix = "; pass .jsonl files as --input instead, which reads half an emoji (a lone surrogate) as U+FFFD\n"
    assert result.returncode == 1 and result.stderr.endswith(fix), result.stderr


@pytest.mark.parametrize("val_fraction", ["0", "1"])
def test_a_val_fraction_that_leaves_a_split_empty_is_refused_before_tokenizing(tmp_path, val_fraction):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCS[:20])
    result = run_prepare("--input", corpus, "--out_dir", tmp_path / "out", "--val_fraction", val_fraction)
    assert result.returncode == 1 and "--val_fraction must be between 0 and 1" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("num_proc", [0, len(os.sched_getaffinity(0)) + 1, 10_000])
def test_more_tokenizer_processes_than_cpus_are_refused_before_any_starts(tmp_path, num_proc):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCS[:20])
    result = run_prepare("--input", corpus, "--out_dir", tmp_path / "out", "--num_proc", num_proc)
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: --num_proc must be from 1 to {len(os.sched_getaffinity(0))}, the CPUs this process may use; "
        f"got {num_proc}\n"), result.stderr
    assert not (tmp_path / "out").exists()


def test_your_own_text_gets_a_val_split_by_default(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCS[:1000])  # at OpenWebText's 0.0005, none would be val
    result = run_prepare("--input", corpus, "--out_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert 3 <= json.loads((tmp_path / "out" / "meta.json").read_text())["val_documents"] <= 25


def hf_env(tmp_path) -> dict:
    """Environment that keeps datasets off the network and out of the user's cache."""
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


def test_hugging_face_streaming_route_matches_local_files(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.parquet", DOCS)
    common = ("--num_proc", 2, "--val_fraction", 0.1)
    hf = run_prepare("--dataset", "parquet", "--data_files", corpus, "--out_dir", tmp_path / "hf_out", *common,
                     env=hf_env(tmp_path))
    assert hf.returncode == 0, hf.stderr
    local = run_prepare("--input", corpus, "--out_dir", tmp_path / "local_out", *common)
    assert local.returncode == 0, local.stderr
    assert read_bins(tmp_path / "hf_out") == read_bins(tmp_path / "local_out")
    assert json.loads((tmp_path / "hf_out" / "meta.json").read_text())["source"]["dataset"] == "parquet"
    # Your own text, as --input's: 1% to val by default (OpenWebText's 0.05% left none of these 400), and its
    # path in meta.json absolute, as given relative.
    # A copy of the script, whose data/ folder is tmp_path's: the default --out_dir is your own text's.
    script = tmp_path / "data" / "openwebtext" / "prepare.py"
    script.parent.mkdir(parents=True)
    shutil.copy(PREPARE, script)
    own = subprocess.run([sys.executable, str(script), "--dataset", "parquet", "--data_files", "corpus.*",
                          "--num_proc", "2"], capture_output=True, text=True, env=hf_env(tmp_path), cwd=tmp_path)
    assert own.returncode == 0, own.stderr
    meta = json.loads((tmp_path / "data" / "bpe_corpus" / "meta.json").read_text())
    assert meta["source"]["data_files"] == [f"{tmp_path}/corpus.*"] and meta["val_documents"] > 0
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": pa.array(DOCS[:5] + [None], pa.string())}), nulls)
    result = run_prepare("--dataset", "parquet", "--data_files", nulls, "--out_dir", tmp_path / "nulls",
                         env=hf_env(tmp_path))
    assert result.returncode == 1 and result.stderr == (
        "prepare.py: parquet: a row's 'text' is null; drop such rows, or fill them with '' (empty texts are skipped)\n"
    ), result.stderr


def test_text_and_csv_data_files_hold_the_documents_that_input_reads(tmp_path):
    # --dataset text made each line a document, without its newline; a csv's "NA", "null" or "" were nulls, refused.
    docs = DOCS[:300] + ["NA", "null", "NaN"]
    # Whitespace-only lines separate documents too: datasets' paragraphs end at "\n\n" alone.
    separators = itertools.cycle(["\n\n", "\n \n", "\n\n\n", "\n\t\n \n"])
    (tmp_path / "corpus.txt").write_text("".join(doc + next(separators) for doc in docs))
    with open(tmp_path / "corpus.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text"], *([d] for d in docs), [""]])  # "" is an empty document: skipped
    common = ("--num_proc", 1, "--val_fraction", 0.1)
    local = run_prepare("--input", tmp_path / "corpus.txt", "--out_dir", tmp_path / "local", *common)
    assert local.returncode == 0, local.stderr
    for dataset in ("text", "csv"):
        hf = run_prepare("--dataset", dataset, "--data_files", tmp_path / f"corpus.{dataset.replace('text', 'txt')}",
                         "--out_dir", tmp_path / dataset, *common, env=hf_env(tmp_path))
        assert hf.returncode == 0, hf.stderr
        assert read_bins(tmp_path / dataset) == read_bins(tmp_path / "local"), dataset
    assert sorted(split_docs(tmp_path / "local", "train") + split_docs(tmp_path / "local", "val")) == sorted(docs)


def test_https_data_files_without_aiohttp_are_told_to_install_it(tmp_path):
    if importlib.util.find_spec("aiohttp"):
        pytest.skip("aiohttp is installed: the file would be fetched")
    result = run_prepare("--dataset", "json", "--data_files", "https://example.com/x.jsonl", "--out_dir",
                         tmp_path / "out")
    assert result.returncode == 1 and result.stderr == (  # was fsspec's ImportError, in a traceback
        "prepare.py: --data_files over http(s) need aiohttp (pip install aiohttp); or download them and pass them "
        "as --input (see python data/openwebtext/prepare.py --help)\n")


def test_remote_data_files_out_of_reach_are_one_line(tmp_path):
    # huggingface_hub's HTTP client raised its own ConnectError, no ConnectionError: a traceback.
    result = run_prepare("--dataset", "json", "--data_files", "hf://datasets/someone/corpus/x.jsonl",
                         "--out_dir", tmp_path / "out", env=hf_env(tmp_path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("prepare.py: could not reach the Hugging Face Hub for json (")
    assert result.stderr.endswith("); download them and pass them as --input instead\n")
    assert not (tmp_path / "out").exists()


def prepared(tmp_path):
    """A dataset prepared from your own text in tmp_path/out: its directory, and its files' bytes by name."""
    out_dir = tmp_path / "out"
    result = run_prepare("--input", write_corpus(tmp_path / "corpus.txt", DOCS[:200]), "--out_dir", out_dir,
                         "--val_fraction", 0.1)
    assert result.returncode == 0, result.stderr
    return out_dir, {path.name: path.read_bytes() for path in out_dir.iterdir()}


@pytest.mark.parametrize("flags, refusal", [
    (["--dataset", "text"], "--dataset text reads the files you name: add --data_files FILE ..., or pass them as "
                            "--input FILE ..."),
    (["--dataset", "parquet"], "--dataset parquet reads the files you name: add --data_files FILE ..."),
    (["--data_files", "notes.parquet"], "--data_files are read by --dataset, which names their format: add "
                                        "--dataset parquet, or pass them as --input FILE ..."),
    (["--data_files", "notes.txt", "notes.parquet"], "--data_files are read by --dataset, which names their format: "
                                                     "add --dataset json, parquet, csv, text or arrow, or pass"),
    # datasets' own refusal came as a traceback.
    # A local folder or file was read as a Hub dataset: a .txt's lines as documents, 0.05% to val.
    (["--dataset", "."], "--dataset . is a local directory, not a Hugging Face dataset: pass your files as --input "
                         "./*.txt (.txt, .jsonl, .parquet), or as --dataset FORMAT --data_files FILE ... (json, "),
    (["--dataset", "notes.txt"], "--dataset notes.txt is a local file, not a Hugging Face dataset: pass your files "
                                 "as --input notes.txt (.txt"),
    (["--dataset", "pandas", "--data_files", "notes.pkl"], "--dataset pandas reads pickles, which may run code: pass "
                                                           "your files in another format (json, parquet, csv, text "),
])
def test_a_file_builder_without_data_files_or_data_files_without_one_is_refused(tmp_path, flags, refusal):
    # --dataset text alone tokenized every file in the working directory (notes.txt: a dataset of your notes);
    # --data_files alone were ignored, and OpenWebText downloaded in their place.
    out_dir, before = prepared(tmp_path)
    (tmp_path / "notes").mkdir()
    write_corpus(tmp_path / "notes" / "notes.txt", DOCS[:20])
    result = run_prepare(*flags, "--out_dir", out_dir, "--val_fraction", 0.5, env=hf_env(tmp_path),
                         cwd=tmp_path / "notes")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"prepare.py: {refusal}"), result.stderr
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


@pytest.mark.parametrize("dataset, given, reason", [
    ("json", "notes.txt", "not a readable json file (JSON parse error: Invalid value. in row 0)"),
    ("parquet", "notes.txt", "not a readable parquet file (Parquet magic bytes not found in footer."),
    ("text", "corpus.parquet", "not a readable text file (not UTF-8: invalid start byte)"),  # named as given
    # Of their format, but malformed: pandas' ParserError, datasets' ValueError.
    ("csv", "unclosed.csv", "not a readable csv file (Error tokenizing data. C error: EOF inside string starting at "
                            "row 1); fix it where it says; or, if it is not csv,"),
    ("json", "array.jsonl", "not a readable json file (Trailing data at position 5); fix it where it says; or, if it "
                            "is not json,"),
])
def test_data_files_of_another_format_or_malformed_are_one_line_naming_the_file(tmp_path, dataset, given, reason):
    # Each was a traceback from multiprocessing's pool (and datasets' own line before it), then "failed (above)".
    out_dir, before = prepared(tmp_path)
    (tmp_path / "notes.txt").write_text("my notes\n\nnot a corpus\n")
    (tmp_path / "unclosed.csv").write_text('text\n"hello\nworld\n')
    (tmp_path / "array.jsonl").write_text('[1,2]\n{"text": "x"}\n')
    write_corpus(tmp_path / "corpus.parquet", DOCS[:20])
    result = run_prepare("--dataset", dataset, "--data_files", tmp_path / given, "--out_dir", out_dir,
                         env=hf_env(tmp_path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"prepare.py: {tmp_path / given}: {reason}"), result.stderr
    assert result.stderr.endswith(" pass its format as --dataset: json, parquet, csv, text or arrow\n")
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


@pytest.mark.parametrize("dataset, files, refusal", [
    ("json", ["none/*.jsonl"], "--data_files none/*.jsonl matches no file; pass files that exist"),  # a traceback
    ("parquet", ["none/*.parquet"], "--data_files none/*.parquet matches no file; pass files that exist"),
    ("text", ["none/*.txt"], "--data_files none/*.txt matches no file; pass files that exist"),  # "no documents"
    # A pattern among others that matched nothing was ignored.
    ("json", ["corpus.jsonl", "none/*.jsonl"], "--data_files none/*.jsonl matches no file; pass files that exist"),
    ("json", ["empty.jsonl"], "empty.jsonl: no rows to read (empty files?); pass files that hold text"),  # a traceback
    ("csv", ["empty.csv"], "empty.csv: no rows to read (empty files?); pass files that hold text"),  # a traceback
    # Datasets' "Unable to find" of both.
    ("json", ["corpus.jsonl", "absent.jsonl"], "--data_files absent.jsonl: no such file; pass files that exist"),
    ("csv", ["folder"], "--data_files folder is a directory; pass its files, e.g. folder/*.csv"),
])
def test_data_files_that_match_nothing_or_hold_no_rows_are_one_line(tmp_path, dataset, files, refusal):
    out_dir, before = prepared(tmp_path)
    (tmp_path / "folder").mkdir()
    write_corpus(tmp_path / "corpus.jsonl", DOCS[:20])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.csv").write_text("")
    result = run_prepare("--dataset", dataset, "--data_files", *files, "--out_dir", out_dir, env=hf_env(tmp_path),
                         cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == f"prepare.py: {refusal}\n", result.stderr
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


@pytest.mark.parametrize("dataset, name, text", [
    ("json", "notes.jsonl", '{"text": "café"}\n'), ("csv", "notes.csv", "text\ncafé\n"),
    ("text", "notes.txt", "café\n")])
def test_data_files_in_latin1_are_told_to_convert_them_too(tmp_path, dataset, name, text):
    # They were told only "pass its format as --dataset", which they had.
    out_dir, before = prepared(tmp_path)
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    result = run_prepare("--dataset", dataset, "--data_files", tmp_path / name, "--out_dir", out_dir,
                         env=hf_env(tmp_path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"prepare.py: {tmp_path / name}: not a readable {dataset} file (not UTF-8: ")
    assert "; if it is text, convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8); if not, pass its format as " \
           "--dataset: json, parquet, csv, text or arrow\n" in result.stderr, result.stderr
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


@pytest.mark.parametrize("dataset, name", [("json", "notes.jsonl"), ("text", "notes.txt")])
def test_data_files_in_utf16_are_told_to_convert_from_it_not_to_change_format(tmp_path, dataset, name):
    # They were told "pass its format as --dataset", which they had.
    out_dir, before = prepared(tmp_path)
    text = '{"text": "my notes"}\n' if dataset == "json" else "my notes\n\nnot a corpus\n"
    (tmp_path / name).write_text(text, encoding="utf-16")
    result = run_prepare("--dataset", dataset, "--data_files", tmp_path / name, "--out_dir", out_dir,
                         env=hf_env(tmp_path))
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: {tmp_path / name}: UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; "
        "convert it, e.g. iconv -f utf-16 -t utf-8\n"), result.stderr
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


@pytest.mark.parametrize("dataset, name", [("json", "notes.jsonl"), ("csv", "notes.csv"), ("text", "notes.txt")])
def test_data_files_in_utf16_without_a_byte_order_mark_are_refused_not_read_with_nuls(tmp_path, dataset, name):
    # Its ASCII is valid UTF-8: text was prepared with a NUL beside each letter, a csv had no column 'text'
    # (but 't\x00e\x00x\x00t\x00'), and json was told to pass its format as --dataset.
    out_dir, before = prepared(tmp_path)
    text = {"json": '{"text": "my notes"}\n', "csv": "text\nmy notes\n"}.get(dataset, "my notes\n\nnot a corpus\n")
    (tmp_path / name).write_bytes(text.encode("utf-16le"))
    result = run_prepare("--dataset", dataset, "--data_files", tmp_path / "notes.*", "--out_dir", out_dir,
                         env=hf_env(tmp_path))
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: {tmp_path / name}: holds NUL characters, as UTF-16 text without a byte-order mark does when "
        "read as UTF-8; convert it to UTF-8, e.g. iconv -f utf-16le -t utf-8\n"), result.stderr
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


@pytest.mark.parametrize("held, given, refused", [
    ({"dataset": "Skylion007/openwebtext", "revision": "r"},
     {"dataset": "Skylion007/openwebtext", "revision": "r"}, ""),
    ({"dataset": "Skylion007/openwebtext"}, {"input": ["/my.txt"]},
     "(Skylion007/openwebtext), not from your own files"),
    ({"dataset": "Skylion007/openwebtext"}, {"dataset": "json", "data_files": ["/my.jsonl"]},
     "not from your own files"),
    ({"dataset": "Skylion007/openwebtext"}, {"dataset": "other/corpus"}, "(Skylion007/openwebtext), not from other/"),
    ({"dataset": "json", "data_files": ["/my.jsonl"]}, {"input": ["/my.txt"]}, ""),  # your own text, replaced in place
    # A part of a Hub dataset is the Hub's: its download is kept from your own text.
    ({"dataset": "allenai/c4", "data_files": ["en/c4-train.0000*"]}, {"input": ["/my.txt"]}, "(allenai/c4)"),
])
def test_an_out_dir_of_a_hub_dataset_is_replaced_only_by_the_same_one(tmp_path, held, given, refused):
    # Running the default prepare.py again over its own OpenWebText was refused as "not from local files".
    from midgpt.errors import MidgptError
    from midgpt.prepare import check_out_dir

    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "source": held}))
    if not refused:
        check_out_dir(tmp_path, "gpt2", given)
    else:
        with pytest.raises(MidgptError, match=re.escape(refused)):
            check_out_dir(tmp_path, "gpt2", given)


def test_unreachable_hub_says_to_pass_input(tmp_path):
    result = run_prepare("--out_dir", tmp_path / "out", env=hf_env(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "--input" in result.stderr and "Hub" in result.stderr
    assert not list((tmp_path / "out").glob("*"))


@pytest.mark.slow  # huggingface_hub's 5 retries, 23 s of backoff
def test_a_hub_that_does_not_answer_is_retried_in_one_line_then_told_to_pass_input(tmp_path):
    # Each retry was two lines of huggingface_hub's, eleven in all, before the error line.
    hub = f"http://127.0.0.1:{free_port()}"  # refuses every connection, offline or not
    result = run_prepare("--out_dir", tmp_path / "out",
                         env={**os.environ, "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path)})
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 2, result.stderr
    assert re.fullmatch(r"prepare.py: a request to the Hugging Face Hub for Skylion007/openwebtext failed \('.*'\); "
                        r"retrying, up to 5 times a request", lines[0]), lines[0]
    assert lines[1].startswith("prepare.py: could not reach the Hugging Face Hub") and "--input" in lines[1]


def bad_inputs(tmp_path) -> dict:
    """One bad --input per failure case, keyed by the case's name."""
    jsonl = tmp_path / "no_text.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    parquet = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), parquet)
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    (tmp_path / "truncated.parquet").write_bytes(b"PAR1 not the rest")
    pq.write_table(pa.table({"text": [b"bytes", b"not strings"]}), tmp_path / "bytes.parquet")
    # The bad byte far into the file: past the first read buffer, whose offsets the decoder would give.
    (tmp_path / "latin1.txt").write_bytes("fine text\n\n".encode() * 20_000 + "café".encode("latin-1"))
    # A footer that reads over a damaged page: the first string's length prefix made huge.
    pq.write_table(pa.table({"text": ["first document", "second"]}), tmp_path / "damaged.parquet",
                   compression="none", use_dictionary=False)
    data = (tmp_path / "damaged.parquet").read_bytes()
    at = data.index(b"first document") - 4
    (tmp_path / "damaged.parquet").write_bytes(data[:at] + b"\xff\xff\xff\x7f" + data[at + 4:])
    # A null text in the second batch read, so its row number counts across batches.
    pq.write_table(pa.table({"text": DOCS[:1100] + [None]}), tmp_path / "null.parquet", row_group_size=300)
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe.txt")  # as <(zcat a.txt.gz) passes, but for its name
    (tmp_path / "not_json.jsonl").write_text('{"text": "fine"}\n{"text": "cut short\n')
    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(b"hello\n\nworld\n"))
    (tmp_path / "gzip.jsonl").write_bytes(gzip.compress(b'{"text": "hello"}\n'))
    (tmp_path / "deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 200_000 + "\n")
    (tmp_path / "long_int.jsonl").write_text('{"text": "fine", "id": ' + "1" * 5000 + "}\n")
    return {"null row 1101": tmp_path / "null.parquet", "missing file": tmp_path / "absent.txt",
            "unknown extension": tmp_path / "corpus.csv",
            "a folder": tmp_path / "folder", "a pipe": tmp_path / "pipe.txt",
            "jsonl line not JSON": tmp_path / "not_json.jsonl", "jsonl nested too deep": tmp_path / "deep.jsonl",
            "jsonl int too long": tmp_path / "long_int.jsonl", "a .gz file": tmp_path / "corpus.txt.gz",
            "gzip named .jsonl": tmp_path / "gzip.jsonl",
            "jsonl line without text": jsonl, "parquet without text": parquet,
            "not parquet": tmp_path / "truncated.parquet", "parquet of bytes": tmp_path / "bytes.parquet",
            "not UTF-8": tmp_path / "latin1.txt", "damaged parquet page": tmp_path / "damaged.parquet"}


@pytest.mark.parametrize("case", ["missing file", "unknown extension", "jsonl line without text",
                                  "parquet without text",
                                  "not parquet", "parquet of bytes", "not UTF-8", "damaged parquet page",
                                  "null row 1101", "a folder", "a pipe", "jsonl line not JSON",
                                  "jsonl nested too deep", "jsonl int too long", "a .gz file", "gzip named .jsonl"])
def test_bad_input_is_one_line_naming_the_file_and_writes_nothing(tmp_path, case):
    out_dir, bad = tmp_path / "out", bad_inputs(tmp_path)[case]
    result = run_prepare("--input", bad, "--out_dir", out_dir)
    assert result.returncode == 1
    assert result.stderr.startswith("prepare.py: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and str(bad) in result.stderr
    fragment = {"null row 1101": "row 1101's 'text' is null; drop such rows, or fill them with ''",
                "a folder": "is a directory; pass its files",  # it was "input file not found"
                "a pipe": "pipe.txt is not a regular file (a pipe or a device); write its text",  # was "not found"
                "jsonl line not JSON": "not_json.jsonl:2: not JSON (",
                # A RecursionError and a ValueError (of Python's 4300-digit limit), in tracebacks.
                "jsonl nested too deep": "deep.jsonl:2: JSON that Python cannot read (maximum recursion depth "
                                         "exceeded while decoding a JSON array",
                "jsonl int too long": "long_int.jsonl:1: JSON that Python cannot read (Exceeds the limit (4300 "
                                      "digits) for integer string conversion",
                # "unknown extension '.gz'", and of the other, to convert it from latin1.
                "a .gz file": "corpus.txt.gz: gzip-compressed, not text; decompress it first (e.g. gunzip -k FILE)",
                "gzip named .jsonl": "gzip.jsonl: gzip-compressed, not text; decompress it first",
                "not UTF-8": "latin1.txt: not UTF-8 text (unexpected end of data); convert it, e.g. iconv",
                }.get(case, "")
    assert fragment in result.stderr, result.stderr
    assert not out_dir.exists()  # not even made empty


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_utf16_or_utf32_file_is_told_to_convert_from_its_own_encoding(tmp_path, encoding, name, suffix):
    # Windows' "Unicode" text: it was told iconv -f latin1, which makes valid UTF-8 of NULs between the letters.
    bad = tmp_path / f"windows{suffix}"
    text = "\n\n".join(DOCS[:20]) if suffix == ".txt" else "".join(json.dumps({"text": d}) + "\n" for d in DOCS[:20])
    bad.write_text("\ufeff" * (encoding == "utf-16-be") + text, encoding=encoding)  # -be writes no mark itself
    result = run_prepare("--input", bad, "--out_dir", tmp_path / "out")
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: {bad}: {name} text (it starts with a {name} byte-order mark), not UTF-8; convert it, "
        f"e.g. iconv -f {name.lower()} -t utf-8\n"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix, encoding, ascii", [(".txt", "utf-16le", True), (".txt", "utf-16be", True),
                                                     (".jsonl", "utf-16le", True), (".txt", "utf-16le", False)])
def test_a_utf16_file_without_a_byte_order_mark_is_refused_not_tokenized_with_nuls(tmp_path, suffix, encoding, ascii):
    # Its ASCII is valid UTF-8, a NUL beside each letter: it was prepared so, or was one document (blank lines NULs).
    # Not all ASCII, it is no UTF-8, and was told to convert from latin1: NULs again.
    docs = [d.encode("ascii", "ignore").decode() if ascii else d for d in DOCS[:20]]
    bad = tmp_path / f"windows{suffix}"
    text = "\n\n".join(docs) if suffix == ".txt" else "".join(json.dumps({"text": d}) + "\n" for d in docs)
    bad.write_bytes(text.encode(encoding))
    fine = write_corpus(tmp_path / "fine.txt", DOCS[20:40])  # the first file, whose documents went through
    result = run_prepare("--input", fine, bad, "--out_dir", tmp_path / "out")
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: {bad}: holds NUL characters, as UTF-16 text without a byte-order mark does when read as UTF-8; "
        f"convert it to UTF-8, e.g. iconv -f {encoding} -t utf-8\n"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["one.txt", "ONE.TXT", "one.jsonl"])
def test_a_split_left_empty_says_how_to_fill_it(tmp_path, name):
    corpus = write_corpus(tmp_path / name.lower(), DOCS[:3])
    os.rename(corpus, tmp_path / name)
    result = run_prepare("--input", tmp_path / name, "--out_dir", tmp_path / "out", "--val_fraction", 1e-9)
    hint = " (in .txt files, blank lines separate them)" if name.lower().endswith(".txt") else ""
    assert result.returncode == 1 and result.stderr == ("prepare.py: no document went to val (3 documents, "
                                                        f"--val_fraction 1e-09); change --val_fraction or add documents"
                                                        f"{hint}\n"), result.stderr


@pytest.mark.parametrize("name, hint", [("one.txt", " (in .txt files, blank lines separate them)"), ("one.jsonl", "")])
def test_an_input_of_one_document_says_so(tmp_path, name, hint):
    # It was told to change --val_fraction, which cannot split one document, "(1 documents, ...)".
    corpus = write_corpus(tmp_path / name, DOCS[:1])
    result = run_prepare("--input", corpus, "--out_dir", tmp_path / "out")
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: {corpus} holds one document, and train and val need one each: add documents{hint}\n"), \
        result.stderr
    assert not (tmp_path / "out").exists()


def test_an_input_of_no_documents_says_so(tmp_path):
    (tmp_path / "blank.txt").write_text("\n \n\t\n")  # it was told to change --val_fraction
    result = run_prepare("--input", tmp_path / "blank.txt", "--out_dir", tmp_path / "out")
    assert result.returncode == 1 and result.stderr == (
        "prepare.py: the input holds no documents, only empty or whitespace-only text\n"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("held, refusal", [
    ({"config.json": "{}"}, "holds a run (config.json), not data; pass another --out_dir"),
    ({"meta.json": '{"tokenizer": "char"}'}, "holds data of another tokenizer ('char', not 'gpt2'), which this would "
                                             "replace; pass another --out_dir, or remove its train.bin, val.bin and "
                                             "meta.json first"),
    ({"meta.json": '{"tokenizer": "gpt2", "source": {"dataset": "Skylion007/openwebtext"}}'},
     "holds a dataset prepared from the Hub (Skylion007/openwebtext), not from your own files"),
])
def test_an_out_dir_of_a_run_or_other_data_is_refused_and_left_alone(tmp_path, held, refusal):
    # Your own text went over them without a word: a run's folder, Shakespeare's characters, a downloaded OpenWebText.
    corpus, out_dir = write_corpus(tmp_path / "corpus.txt", DOCS[:20]), tmp_path / "out"
    out_dir.mkdir()
    for name, text in held.items():
        (out_dir / name).write_text(text)
    result = run_prepare("--input", corpus, "--out_dir", out_dir)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and refusal in result.stderr, result.stderr
    assert {p.name: p.read_text() for p in out_dir.iterdir()} == held


def test_a_dictionary_encoded_text_column_reads_as_strings(tmp_path):
    plain = write_corpus(tmp_path / "plain.parquet", DOCS[:300])
    encoded = tmp_path / "encoded.parquet"  # as pandas writes a categorical column
    pq.write_table(pa.table({"text": pa.array(DOCS[:300]).dictionary_encode()}), encoded)
    assert pa.types.is_dictionary(pq.ParquetFile(encoded).schema_arrow.field("text").type)
    for corpus, out_dir in ((plain, tmp_path / "plain"), (encoded, tmp_path / "encoded")):
        result = run_prepare("--input", corpus, "--out_dir", out_dir, "--val_fraction", 0.1)
        assert result.returncode == 0, result.stderr
    assert read_bins(tmp_path / "encoded") == read_bins(tmp_path / "plain")


@pytest.mark.parametrize("hub_flag", [["--dataset", "parquet"], ["--data_files", "x.parquet"]])
def test_hub_flags_with_input_are_refused_not_ignored(tmp_path, hub_flag):
    corpus = write_corpus(tmp_path / "corpus.txt", DOCS[:20])
    result = run_prepare("--input", corpus, *hub_flag, "--out_dir", tmp_path / "out")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "--dataset and --data_files read through Hugging Face datasets, --input reads its files itself: pass one " \
           "or the other" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_a_prepared_dataset_as_it_was(tmp_path):
    corpus, out_dir = write_corpus(tmp_path / "corpus.txt", DOCS[:200]), tmp_path / "out"
    assert run_prepare("--input", corpus, "--out_dir", out_dir, "--val_fraction", 0.1).returncode == 0
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    broken = tmp_path / "broken.jsonl"  # found only when its turn comes, after corpus.txt's documents
    broken.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    result = run_prepare("--input", corpus, broken, "--out_dir", out_dir, "--val_fraction", 0.1)
    assert result.returncode == 1 and "broken.jsonl:2" in result.stderr, result.stderr
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


def test_a_txt_document_too_large_to_hold_is_refused_naming_blank_lines(tmp_path):
    corpus = tmp_path / "lines.txt"  # one document per line, as in a .jsonl: one block of 70M characters
    corpus.write_text(("x" * 999 + "\n") * 70_000)
    result = run_prepare("--input", corpus, "--out_dir", tmp_path / "out")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr == (f"prepare.py: {corpus}:67109: a document of over 64M characters; in .txt files, blank "
                             "lines separate documents (or use .jsonl, one per line)\n")
    assert not (tmp_path / "out").exists()  # not even made empty


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_the_largest_document_allowed_is_read_and_one_character_more_refused(tmp_path, suffix):
    spec = importlib.util.spec_from_file_location("prepare_openwebtext", PREPARE)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    limit = prepare.MAX_DOCUMENT
    for size in (limit, limit + 1):  # newlines do not count: a .txt block's last, or a .jsonl line's
        corpus = tmp_path / f"{size}{suffix}"
        if suffix == ".txt":  # two lines: the "\n" between them is the document's
            corpus.write_text("x" * (size // 2) + "\n" + "x" * (size - size // 2 - 1) + "\n\n")
        else:
            corpus.write_text('{"text": "' + "x" * (size - 12) + '"}\n')
        if size == limit:
            assert [len(doc) for doc in prepare.file_documents(str(corpus))] == [limit - 12 * (suffix == ".jsonl")]
        else:
            refusal = re.escape(str(corpus)) + ":[12]: a (document|line) of over 64M characters"
            with pytest.raises(MidgptError, match=refusal):
                list(prepare.file_documents(str(corpus)))


@pytest.mark.parametrize("suffix, refusal", [(".txt", ":1: a document of over 64M characters"),
                                             (".jsonl", ":1: a line of over 64M characters, more than one "
                                                        "document may hold; split that document, or leave it out")])
def test_a_file_without_newlines_is_refused_without_reading_it_whole(tmp_path, suffix, refusal):
    corpus = tmp_path / f"one-line{suffix}"  # 512M characters, and not one newline
    with open(corpus, "w") as f:
        for _ in range(512):
            f.write("x" * (1 << 20))
    # Linux starts a child's peak memory at its parent's peak (this test process's, over a gigabyte under
    # pytest-xdist): a small Python in between runs prepare.py and prints its child's peak, in KiB.
    peak_of_child = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                     "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", peak_of_child, sys.executable, str(PREPARE), "--input", corpus,
                             "--out_dir", tmp_path / "out"], capture_output=True, text=True)
    assert result.returncode == 1 and refusal in result.stderr, result.stderr
    # Its first 64M characters, as the largest document allowed, on top of Python, numpy and the tokenizer (about
    # 230 MiB in all here); read whole, the line took 1.1 GiB.
    assert int(result.stdout) * 1024 < 512 << 20


def test_repeated_input_flags_add_up_and_a_byte_order_mark_is_not_text(tmp_path):
    # Windows editors save UTF-8 with a byte-order mark; it would become three tokens of the first document.
    (tmp_path / "a.txt").write_text("\ufeffFirst doc.", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('\ufeff{"text": "Second doc."}\n', encoding="utf-8")
    corpus, out_dir = write_corpus(tmp_path / "corpus.txt", DOCS[:100]), tmp_path / "out"
    result = run_prepare("--input", tmp_path / "a.txt", "--input", tmp_path / "b.jsonl", corpus,
                         "--out_dir", out_dir, "--val_fraction", 0.1)
    assert result.returncode == 0, result.stderr
    train, val = split_docs(out_dir, "train"), split_docs(out_dir, "val")
    assert len(train + val) == 102  # and in the order the inputs were given:
    given = ["First doc.", "Second doc.", *DOCS[:100]]
    assert (train, val) == ([d for d in given if d not in set(val)], [d for d in given if d in set(val)])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[int, str]:
    """~2 MB and ~20 MB .txt corpora, keyed by size in MB."""
    root = tmp_path_factory.mktemp("corpora")
    paths = {}
    for mb in (2, 20):
        docs, size = [], 0
        for doc in iter_documents(seed=mb):
            if size >= mb * 2**20:
                break
            docs.append(doc)
            size += len(doc.encode()) + 2
        paths[mb] = write_corpus(root / f"corpus_{mb}mb.txt", docs)
    return paths


def peak_rss_kb(*args) -> int:
    """Peak RSS of prepare.py's largest process, measured in a wrapper so each run stands alone."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, str(PREPARE), *map(str, args)],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def test_peak_memory_stays_flat_as_corpus_grows_tenfold(tmp_path, corpora):
    small, large = (peak_rss_kb("--input", corpora[mb], "--out_dir", tmp_path / str(mb), "--num_proc", 2)
                    for mb in (2, 20))
    # Tighter than 1.5x + 100 MB, which would pass even with the 20 MB corpus read whole (+78 MB measured).
    assert large < small + 32 * 1024, f"peak RSS {small} KiB on 2 MB, {large} KiB on 20 MB"


def test_peak_memory_stays_flat_as_a_corpus_of_long_documents_grows_tenfold(tmp_path):
    # Books, one a line: 1024 of them were one task, so a corpus of fewer was held whole (+130 MB measured here).
    book = " ".join(itertools.islice(iter_documents(seed=1), 3000))[:256 * 1024]
    for mb in (2, 20):
        (tmp_path / f"books_{mb}mb.jsonl").write_text(
            "".join(json.dumps({"text": f"Book {i}. {book}"}) + "\n" for i in range(mb * 4)), encoding="utf-8")
    small, large = (peak_rss_kb("--input", tmp_path / f"books_{mb}mb.jsonl", "--out_dir", tmp_path / str(mb),
                                "--num_proc", 2, "--val_fraction", 0.3) for mb in (2, 20))
    assert large < small + 32 * 1024, f"peak RSS {small} KiB on 2 MB, {large} KiB on 20 MB"


def test_a_run_on_data_prepared_again_with_another_val_fraction_is_told_the_one_it_trained_with(tmp_path):
    # The same text with another --val_fraction is other data; the run's meta.json did not say which one it had.
    from midgpt.config import config_to_dict, load_config
    from midgpt.data import check_same_data

    corpus = write_corpus(tmp_path / "mine.txt", DOCS[:300])
    first = run_prepare("--input", corpus, "--out_dir", tmp_path / "data", "--val_fraction", 0.3)
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["val_fraction"] == 0.3
    rundir = tmp_path / "run"  # what launch.py leaves: its config, and a copy of its data's meta.json
    rundir.mkdir()
    config = {**config_to_dict(load_config("bpe_corpus")), "data_dir": str(tmp_path / "data")}
    (rundir / "config.json").write_text(json.dumps(config))
    shutil.copy(tmp_path / "data" / "meta.json", rundir)
    check_same_data(str(rundir), str(tmp_path / "data"))
    assert run_prepare("--input", corpus, "--out_dir", tmp_path / "data").returncode == 0  # the default, 0.01
    with pytest.raises(MidgptError, match=r"or prepare it again from the same text with --val_fraction 0\.3, or "):
        check_same_data(str(rundir), str(tmp_path / "data"))


def test_killed_preparation_leaves_nothing_that_looks_complete(tmp_path, corpora):
    out_dir = tmp_path / "out"
    # The same file ten times: still running long after the first tokens land.
    proc = subprocess.Popen([sys.executable, str(PREPARE), "--input", *[corpora[20]] * 10,
                             "--out_dir", str(out_dir), "--num_proc", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        tmp = out_dir / "train.bin.tmp"
        while not (tmp.exists() and tmp.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "prepare.py finished before it could be killed"
    finally:
        # The whole session, workers included, so nothing of this run outlives the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert tmp.stat().st_size > 0
    assert not {"train.bin", "val.bin", "meta.json"} & {p.name for p in out_dir.iterdir()}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_stop_signal_ends_with_one_line_and_removes_the_unfinished_files(tmp_path, corpora, sig):
    out_dir, small = tmp_path / "out", write_corpus(tmp_path / "small.txt", DOCS[:200])
    assert run_prepare("--input", small, "--out_dir", out_dir, "--val_fraction", 0.1).returncode == 0
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    proc = subprocess.Popen([sys.executable, str(PREPARE), "--input", *[corpora[20]] * 10,
                             "--out_dir", str(out_dir), "--num_proc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (out_dir / "train.bin.tmp").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Ctrl-C reaches the whole process group, workers included; `kill` reaches the main process only.
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"prepare.py: stopped by {sig.name}; nothing prepared before was replaced")
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before  # no .tmp files either
