"""Data pipeline promises: prepare.py's files, deterministic batches, clear errors."""

import bz2
import gzip
import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PREPARE, REPO_ROOT, small_files, this_tree_env
from midgpt.config import apply_overrides, load_config
from midgpt.data import GPT2_VOCAB_SIZE, get_batch, global_batch, load_meta, load_splits, load_tokens, prefetch
from midgpt.tokenizer import decode, encode
from midgpt.errors import MidgptError
from midgpt.files import lock_directory
from midgpt.prepare import FILES, replace_dataset
from midgpt.sharding import make_mesh


@pytest.fixture(scope="module")
def text(shakespeare_text):
    return Path(shakespeare_text).read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def meta(shakespeare_data_dir):
    return load_meta(shakespeare_data_dir)


def test_prepare_writes_only_complete_files_and_no_temp_files(shakespeare_data_dir):
    assert sorted(os.listdir(shakespeare_data_dir)) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_splits_first_90_percent_train_and_last_10_percent_val(shakespeare_data_dir, text, meta):
    train, val = load_tokens(shakespeare_data_dir, "train"), load_tokens(shakespeare_data_dir, "val")
    n_train = int(0.9 * len(text))
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val)) == (n_train, len(text) - n_train)
    assert decode(meta, val) == text[n_train:]
    assert decode(meta, np.concatenate([train, val])) == text
    assert encode(meta, text) == np.concatenate([train, val]).tolist()
    # What a resume compares to tell the data it trained on from other data of the same sizes.
    assert meta["sha256"] == {name: hashlib.sha256(Path(shakespeare_data_dir, name).read_bytes()).hexdigest()
                              for name in ("train.bin", "val.bin")}


def test_prepare_vocab_is_the_sorted_character_set(text, meta):
    assert meta["tokenizer"] == "char"
    assert meta["chars"] == sorted(set(text))
    assert meta["vocab_size"] == len(meta["chars"])


def test_prepare_with_missing_input_prints_one_line_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(PREPARE), "--input", str(tmp_path / "nope.txt"), "--out_dir", str(out_dir)],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr == f"prepare.py: input file not found: {tmp_path / 'nope.txt'}\n"
    assert not out_dir.exists()


def test_prepare_refuses_an_input_that_is_no_regular_file(tmp_path):
    # /dev/zero was read until memory ran out (7 GB in 10 s).
    result = subprocess.run([sys.executable, str(PREPARE), "--input", "/dev/zero", "--out_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr == (
        "prepare.py: /dev/zero is not a regular file (a pipe or a device); write its text to a file and pass that\n")
    assert not (tmp_path / "out").exists()


def test_prepare_that_cannot_write_is_one_line_and_leaves_a_prepared_dataset_as_it_was(shakespeare_text, tmp_path):
    out_dir = tmp_path / "out"
    command = [sys.executable, str(PREPARE), "--input", shakespeare_text, "--out_dir", str(out_dir)]
    assert subprocess.run(command, capture_output=True).returncode == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    # A full disk, played by a 256 KiB file size limit: train.bin takes 2 MiB (0.5 of the generated
    # text that stands in offline). meta.json was deleted first.
    result = subprocess.run([*small_files(256), *command], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"prepare.py: cannot write to {out_dir} (") and result.stderr.endswith(
        "nothing prepared before was replaced\n")
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # and no .tmp files


def test_prepare_again_over_other_text_says_so_and_over_the_same_says_nothing(shakespeare_text, tmp_path):
    # Prepared again in place, as it may be; but every run trained on the old data then refuses to resume.
    text = Path(shakespeare_text).read_text()
    (tmp_path / "a.txt").write_text(text[:20000])
    (tmp_path / "b.txt").write_text(text[:30000])
    prepare = lambda name: subprocess.run([sys.executable, str(PREPARE), "--input", str(tmp_path / name), "--out_dir",
                                           str(tmp_path / "out")], capture_output=True, text=True)
    first, same, other = prepare("a.txt"), prepare("a.txt"), prepare("b.txt")
    assert first.returncode == same.returncode == other.returncode == 0, other.stderr
    assert first.stdout == (f"vocab size {len(set(text[:20000]))}; train 18,000 tokens, val 2,000 tokens -> "
                            f"{tmp_path / 'out'}\n")
    assert same.stdout == first.stdout
    assert other.stdout.endswith(f"-> {tmp_path / 'out'}, over other data (train_tokens, val_tokens, sha256 differ): "
                                 "runs that trained on that data will not resume on this\n"), other.stdout
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["train_tokens"] == 27000


def test_prepare_refuses_an_out_dir_of_another_tokenizers_data_and_leaves_it_alone(shakespeare_text, tmp_path):
    out_dir = tmp_path / "bpe"  # as data/openwebtext/prepare.py leaves it
    out_dir.mkdir()
    (out_dir / "meta.json").write_text('{"tokenizer": "gpt2", "vocab_size": 50257}')
    result = subprocess.run([sys.executable, str(PREPARE), "--input", shakespeare_text, "--out_dir", str(out_dir)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: --out_dir {out_dir} holds data of another tokenizer ('gpt2', not 'char'), which this would "
        "replace; pass another --out_dir, or remove its train.bin, val.bin and meta.json first\n"), result.stderr
    assert os.listdir(out_dir) == ["meta.json"] and "gpt2" in (out_dir / "meta.json").read_text()


@pytest.mark.parametrize("script", ["shakespeare_char", "openwebtext"])
def test_an_out_dir_that_is_a_file_is_one_line_and_left_alone(shakespeare_text, tmp_path, script):
    out_file = tmp_path / "out"
    out_file.write_text("mine")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "data" / script / "prepare.py"), "--input",
                             shakespeare_text, "--out_dir", str(out_file)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: --out_dir {out_file} is a file, not a directory; pass another --out_dir\n"), result.stderr
    assert out_file.read_text() == "mine"


@pytest.mark.parametrize("script, name", [("shakespeare_char", "train.bin"), ("shakespeare_char", "meta.json"),
                                          ("openwebtext", "val.bin")])
def test_a_folder_where_a_dataset_file_goes_is_one_line_and_the_old_dataset_is_kept(shakespeare_text, tmp_path,
                                                                                    script, name):
    # Found at the renames: meta.json was already removed (the old dataset lost), and .tmp files were left.
    prepare = [sys.executable, str(REPO_ROOT / "data" / script / "prepare.py"), "--input", shakespeare_text,
               "--out_dir", str(tmp_path / "out")]
    assert subprocess.run(prepare, capture_output=True).returncode == 0
    (tmp_path / "out" / name).unlink()
    (tmp_path / "out" / name).mkdir()
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    result = subprocess.run(prepare, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: --out_dir {tmp_path / 'out'} holds a folder named {name}, where this file goes; move it away, "
        "or pass another --out_dir\n"), result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)


@pytest.mark.parametrize("script", ["shakespeare_char", "openwebtext"])
def test_a_second_prepare_into_the_same_out_dir_at_once_is_refused_and_mixes_nothing_in(shakespeare_text, tmp_path,
                                                                                        script):
    # Both wrote the same .tmp files and renamed each other's: a train.bin of both texts, and no meta.json.
    out_dir = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "data" / script / "prepare.py"), "--input", shakespeare_text,
               "--out_dir", str(out_dir), *(["--num_proc=1"] if script == "openwebtext" else [])]
    assert subprocess.run(command, capture_output=True).returncode == 0
    (out_dir / "train.bin.tmp").write_bytes(b"the first one's, half written")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    fd = lock_directory(out_dir, "held by the test")  # as the first one holds it while it writes
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    finally:
        os.close(fd)
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: another prepare.py is writing to {out_dir}; wait for it to end, or pass another --out_dir\n")
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert subprocess.run(command, capture_output=True).returncode == 0  # once it has ended
    assert sorted(os.listdir(out_dir)) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize("script", ["shakespeare_char", "openwebtext"])
def test_a_stop_signal_while_the_new_files_replace_the_old_is_ignored(shakespeare_text, tmp_path, script):
    # The microseconds of the renames, widened by a stop sent from the first: the stop left neither
    # dataset whole, and said that nothing was replaced.
    (tmp_path / "in.txt").write_text(Path(shakespeare_text).read_text()[:20000])
    prepare, out_dir = REPO_ROOT / "data" / script / "prepare.py", tmp_path / "out"
    args = [str(prepare), "--input", str(tmp_path / "in.txt"), "--out_dir", str(out_dir),
            *(["--val_fraction", "0.1"] if script == "openwebtext" else [])]  # 0.01 of 149 documents left val empty
    assert subprocess.run([sys.executable, *args], capture_output=True).returncode == 0
    expected = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    (out_dir / "val.bin").write_bytes(b"old")
    stop_at_the_first_rename = f"""
import os, runpy, signal, sys
replace = os.replace
def replace_then_stop(src, dst):
    replace(src, dst)
    if str(dst).endswith("train.bin"):
        os.kill(os.getpid(), signal.SIGTERM)
os.replace = replace_then_stop
sys.argv = {args!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    result = subprocess.run([sys.executable, "-c", stop_at_the_first_rename], capture_output=True, text=True)
    assert result.returncode == 0 and f"-> {out_dir}" in result.stdout, result.stderr
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == expected


def test_a_dataset_whose_replacement_fails_midway_keeps_no_meta_json_to_vouch_for_it(tmp_path):
    # A crash between two renames: meta.json, of either dataset, beside a mix of both would pass as whole.
    out_dir, new = tmp_path / "out", tmp_path / "new"
    out_dir.mkdir()
    new.mkdir()
    for name in FILES:  # meta.json's, JSON
        (out_dir / name).write_text(json.dumps(f"old {name}"))
        (new / name).write_text(json.dumps(f"new {name}"))
    (out_dir / "val.bin").unlink()
    (out_dir / "val.bin").mkdir()  # what a file cannot be renamed over: the second rename fails
    with pytest.raises(IsADirectoryError):
        replace_dataset(out_dir, {name: new / name for name in FILES})
    assert (out_dir / "train.bin").read_text() == '"new train.bin"' and not (out_dir / "meta.json").exists()


@pytest.mark.parametrize("script, flag", [(script, flag) for script in ("shakespeare_char", "openwebtext")
                                          for flag in ("--out_dir", "--input")]
                         + [("openwebtext", "--dataset"), ("openwebtext", "--data_files")])
def test_an_empty_path_is_refused_not_taken_for_the_working_directory(script, flag, tmp_path):
    # An unset $OUT: the data was written into the current directory; an unset $IN read <out_dir>/input.txt;
    # an unset $DATASET downloaded OpenWebText.
    args = ["--input", "x.txt", flag, ""] if flag == "--out_dir" else [flag, ""]
    result = subprocess.run([sys.executable, str(REPO_ROOT / "data" / script / "prepare.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0 and f"{flag} is empty" in result.stderr.splitlines()[-1], result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", ["shakespeare_char", "openwebtext"])
def test_prepare_takes_no_abbreviated_option_and_names_the_one_meant(script, tmp_path):
    # The Shakespeare script's plain argparse read --inp as --input, and answered a typo in a usage block.
    result = subprocess.run([sys.executable, str(REPO_ROOT / "data" / script / "prepare.py"), "--inp", "x.txt",
                             "--out_dir", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: unrecognized arguments: --inp x.txt; did you mean --input? (see python data/{script}/prepare.py "
        "--help)\n"), result.stderr
    assert os.listdir(tmp_path) == []


def test_prepare_refuses_a_text_too_short_for_two_splits(tmp_path):
    (tmp_path / "one.txt").write_text("a")
    result = subprocess.run([sys.executable, str(PREPARE), "--input", str(tmp_path / "one.txt"),
                             "--out_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode != 0 and "too few for a train and a val split" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_prepare_takes_65536_characters_and_sends_more_to_bpe(tmp_path):
    def prepare(n: int) -> subprocess.CompletedProcess:  # a text of n distinct characters, none a surrogate
        (tmp_path / f"{n}.txt").write_text("".join(map(chr, range(0x10000, 0x10000 + n))))
        return subprocess.run([sys.executable, str(PREPARE), "--input", str(tmp_path / f"{n}.txt"),
                               "--out_dir", str(tmp_path / f"out{n}")], capture_output=True, text=True)

    fits = prepare(2**16)  # ids 0 to 65535: uint16's every value
    assert fits.returncode == 0, fits.stderr
    assert load_meta(str(tmp_path / "out65536"))["vocab_size"] == 2**16
    result = prepare(2**16 + 1)
    assert result.returncode != 0 and result.stderr == (
        f"prepare.py: 65537 distinct characters do not fit uint16 token ids; for such text, use GPT-2 BPE: "
        f"python data/openwebtext/prepare.py --input {tmp_path}/65537.txt\n"), result.stderr
    assert not (tmp_path / "out65537").exists()


def test_prepare_drops_a_byte_order_mark(tmp_path):
    outputs = []
    for name, data in (("plain", b"hello\r\nworld\n" * 20), ("bom", b"\xef\xbb\xbf" + b"hello\r\nworld\n" * 20)):
        (tmp_path / f"{name}.txt").write_bytes(data)
        result = subprocess.run([sys.executable, str(PREPARE), "--input", str(tmp_path / f"{name}.txt"),
                                 "--out_dir", str(tmp_path / name)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        outputs.append([(tmp_path / name / f).read_bytes() for f in ("meta.json", "train.bin", "val.bin")])
    assert outputs[0] == outputs[1]
    assert "\r" in load_meta(tmp_path / "bom")["chars"]  # otherwise the text stays exactly as stored


@pytest.mark.parametrize("data, advice", [
    ("hello\nworld\n".encode("utf-16"), "UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; "
     "convert it, e.g. iconv -f utf-16 -t utf-8"),
    ("hello\nworld\n".encode("utf-32"), "UTF-32 text (it starts with a UTF-32 byte-order mark), not UTF-8; "
     "convert it, e.g. iconv -f utf-32 -t utf-8"),
    # The position is the file's, its UTF-8 byte-order mark counted.
    (b"\xef\xbb\xbf" + "hello\ncaf\xe9\n".encode("latin-1"), "not UTF-8 text (invalid continuation byte at "
     "byte 12); convert it, e.g. iconv -f latin1 -t utf-8"),
    # Told to convert it from latin1: text of its compressed bytes.
    (gzip.compress(b"hello\nworld\n"), "gzip-compressed, not text; decompress it first (e.g. gunzip -k FILE) and "
     "pass what it holds"),
    (bz2.compress(b"hello\nworld\n"), "bzip2-compressed, not text; decompress it first (e.g. bunzip2 -k FILE) and "
     "pass what it holds"),
    (lzma.compress(b"hello\nworld\n"), "xz-compressed, not text; decompress it first (e.g. unxz -k FILE) and "
     "pass what it holds"),
    # The first letters of bzip2's magic, in text that is not UTF-8.
    ("BZh caf\xe9\n".encode("latin-1"), "not UTF-8 text (invalid continuation byte at byte 7); convert it, e.g. "
     "iconv -f latin1 -t utf-8"),
], ids=["utf-16", "utf-32", "latin-1", "gzip", "bzip2", "xz", "BZh"])
def test_prepare_of_text_not_in_utf8_names_the_file_and_how_to_convert_it(tmp_path, data, advice):
    # It was the decoder's own words, which name neither the encoding to convert from nor how.
    (tmp_path / "in.txt").write_bytes(data)
    result = subprocess.run([sys.executable, str(PREPARE), "--input", str(tmp_path / "in.txt"),
                             "--out_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == f"prepare.py: {tmp_path / 'in.txt'}: {advice}\n", result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("encoding", ["utf-16le", "utf-16be", "utf-32le", "utf-32be"])
def test_prepare_refuses_utf16_without_a_byte_order_mark_not_taking_its_nuls_for_characters(tmp_path, encoding):
    # Its ASCII is valid UTF-8, a NUL beside each letter: it was prepared, "\x00" the commonest character.
    # UTF-32 was told to convert from UTF-16.
    (tmp_path / "in.txt").write_bytes("hello\nworld\n".encode(encoding) * 20)
    result = subprocess.run([sys.executable, str(PREPARE), "--input", str(tmp_path / "in.txt"),
                             "--out_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == (
        f"prepare.py: {tmp_path / 'in.txt'}: holds NUL characters, as {encoding[:6].upper()} text without a byte-order "
        f"mark does when read as UTF-8; convert it to UTF-8, e.g. iconv -f {encoding} -t utf-8\n"), result.stderr
    assert not (tmp_path / "out").exists()


def test_a_binary_file_with_nuls_at_odd_and_even_bytes_alike_is_not_told_it_is_utf16(tmp_path):
    # A parquet given as text: its advice is its format's, not to convert it from UTF-16 with iconv.
    from midgpt.tokenizer import utf16_no_mark_advice

    noise = np.random.default_rng(0).integers(1, 256, 4096, dtype=np.uint8)
    noise[::3] = 0
    (tmp_path / "binary.txt").write_bytes(noise.tobytes())
    (tmp_path / "utf16.txt").write_bytes("hello\nworld\n".encode("utf-16le") * 20)
    assert utf16_no_mark_advice(tmp_path / "binary.txt") is None
    assert "iconv -f utf-16le" in utf16_no_mark_advice(tmp_path / "utf16.txt")


def test_an_empty_token_file_is_one_line_error(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(MidgptError, match="train.bin is empty"):
        load_tokens(str(tmp_path), "train")


@pytest.mark.parametrize("name, content, fragment", [
    ("train.bin", b"\x01\x00\x02", "odd number of bytes"),  # a copy cut short: np.memmap would raise
    ("train.bin", None, "train.bin is not a file"),  # a folder: np.memmap's IsADirectoryError
    ("meta.json", b'{"vocab_size": 6', "cannot read"),
    ("meta.json", b"\xff\xfe", "cannot read"),
    ("meta.json", b'{"tokenizer": "char"}', "names no vocab_size"),
])
def test_a_damaged_data_file_is_one_line_saying_to_prepare_again(tmp_path, name, content, fragment):
    if content is None:
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(MidgptError, match=fragment) as info:
        load_tokens(str(tmp_path), "train") if name == "train.bin" else load_meta(str(tmp_path))
    assert "prepare the data again" in str(info.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_shorter_than_its_meta_json_says_is_one_line(shakespeare_data_dir, tmp_path, split):
    # Cut at an even byte, as a copy cut short may be: the odd-size check cannot see it.
    for name in ("meta.json", "train.bin", "val.bin"):
        (tmp_path / name).write_bytes((Path(shakespeare_data_dir) / name).read_bytes())
    (tmp_path / f"{split}.bin").write_bytes((tmp_path / f"{split}.bin").read_bytes()[:1000])
    config = apply_overrides(load_config("shakespeare_char_cpu"), [f"--data_dir={tmp_path}"])
    with pytest.raises(MidgptError, match=f"{split}.bin holds 500 tokens but its meta.json says "
                                          f"{load_meta(shakespeare_data_dir)[f'{split}_tokens']}; prepare the data "
                                          "again"):
        load_splits(config)


def test_a_split_too_short_for_one_window_says_what_would_give_one(shakespeare_data_dir, tmp_path):
    val_tokens = load_meta(shakespeare_data_dir)["val_tokens"]
    config = apply_overrides(load_config("shakespeare_char_cpu"), [f"--data_dir={shakespeare_data_dir}",
                                                                    f"--model.block_size={val_tokens}"])
    with pytest.raises(MidgptError) as info:
        load_splits(config)
    assert str(info.value) == (
        f"{shakespeare_data_dir}/val.bin holds {val_tokens} tokens, too few for one window of model.block_size + 1 = "
        f"{val_tokens + 1}; prepare it from more text, or train a smaller --model.block_size")
    load_splits(apply_overrides(config, [f"--model.block_size={val_tokens - 1}"]))  # one window exactly
    # Your own text through the GPT-2 prepare script: its val split is a fraction of it, which can be raised.
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    np.arange(1000, dtype=np.uint16).tofile(bpe / "train.bin")
    np.arange(20, dtype=np.uint16).tofile(bpe / "val.bin")
    (bpe / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257}))
    with pytest.raises(MidgptError) as info:
        load_splits(apply_overrides(load_config("bpe_corpus"), [f"--data_dir={bpe}", "--model.block_size=32"]))
    assert str(info.value) == (f"{bpe}/val.bin holds 20 tokens, too few for one window of model.block_size + 1 = 33; "
                               "prepare it from more text, or with a larger --val_fraction, or train a smaller "
                               "--model.block_size")


def test_a_missing_file_outside_data_names_both_prepare_scripts_with_its_directory(tmp_path):
    with pytest.raises(MidgptError) as info:
        load_meta(str(tmp_path))
    for script in ("shakespeare_char", "openwebtext"):
        assert f"data/{script}/prepare.py --input" in str(info.value)
    assert str(info.value).count(f"--out_dir {tmp_path}") == 2


def test_a_run_directory_passed_as_data_is_told_which_data_its_run_read(tmp_path):
    # The usual advice, to prepare data there, is what prepare.py refuses for a run's folder.
    (tmp_path / "config.json").write_text('{"data_dir": "data/shakespeare_char"}')
    with pytest.raises(MidgptError) as info:
        load_meta(str(tmp_path))
    assert str(info.value) == (f"{tmp_path} is a run directory, not prepared data; pass the folder that prepare.py "
                               "wrote, as that run did: --data_dir=data/shakespeare_char")


def test_a_text_file_passed_as_data_is_told_to_prepare_it_into_a_folder(tmp_path):
    # It was "not found", with advice to write prepared data at the text's own path.
    text = tmp_path / "input.txt"
    text.write_text("to be or not to be")
    with pytest.raises(MidgptError) as info:
        load_meta(str(text), vocab_size=65)
    assert str(info.value) == (f"data_dir {text} is a file, not a folder of prepared data; run python "
                               f"data/shakespeare_char/prepare.py --input {text} --out_dir DIR (characters), "
                               "then pass --data_dir=DIR")


def test_same_key_gives_the_same_batch(shakespeare_data_dir):
    tokens = load_tokens(shakespeare_data_dir, "train")
    x1_BxT, y1_BxT = get_batch(tokens, (0, 5), 8, 32)
    x2_BxT, y2_BxT = get_batch(tokens, (0, 5), 8, 32)
    np.testing.assert_array_equal(x1_BxT, x2_BxT)
    np.testing.assert_array_equal(y1_BxT, y2_BxT)


def test_different_steps_give_different_batches(shakespeare_data_dir):
    tokens = load_tokens(shakespeare_data_dir, "train")
    assert not np.array_equal(get_batch(tokens, (0, 1), 8, 32)[0], get_batch(tokens, (0, 2), 8, 32)[0])


def test_batch_is_int32_real_windows_with_y_shifted_by_one(shakespeare_data_dir, text, meta):
    tokens = load_tokens(shakespeare_data_dir, "train")
    x_BxT, y_BxT = get_batch(tokens, (3, 0), 8, 64)
    assert x_BxT.shape == y_BxT.shape == (8, 64)
    assert x_BxT.dtype == y_BxT.dtype == np.int32
    np.testing.assert_array_equal(x_BxT[:, 1:], y_BxT[:, :-1])
    train_text = text[: len(tokens)]
    for x_T, y_T in zip(x_BxT, y_BxT):
        assert decode(meta, [*x_T, y_T[-1]]) in train_text


def test_windows_reach_every_start_offset_and_stay_in_bounds():
    tokens = np.arange(10, dtype=np.uint16)
    starts = {int(x_T[0]) for step in range(50) for x_T in get_batch(tokens, (0, step), 4, 4)[0]}
    assert starts == set(range(6))  # offset 5 uses the last token as the final target


def test_a_token_id_past_the_vocabulary_is_named_with_its_file_not_left_to_diverge(tmp_path):
    config = load_config("shakespeare_char_cpu")  # 65 ids
    mesh = make_mesh(config)
    tokens_N = np.full(1000, 7, np.uint16)
    (tmp_path / "train.bin").write_bytes(tokens_N.tobytes())
    x_GxBxT, _ = global_batch(load_tokens(str(tmp_path), "train"), (0, 1), 1, config, mesh)
    assert int(x_GxBxT.max()) == 7
    tokens_N[500] = 65535  # as a damaged file may hold, in every window that a batch of 12 of 64 draws
    (tmp_path / "train.bin").write_bytes(tokens_N[436:565].tobytes())
    with pytest.raises(MidgptError, match=rf"^{tmp_path}/train.bin holds token id 65535, past "
                                          r"model.vocab_size=65: it is damaged; prepare the data again$"):
        global_batch(load_tokens(str(tmp_path), "train"), (0, 1), 1, config, mesh)


CHILD = """
import sys
import numpy as np
from midgpt.data import get_batch, load_tokens
data_dir, start, stop, out = sys.argv[1:]
x_BxT, y_BxT = get_batch(load_tokens(data_dir, "train"), (7, 3), 8, 16, rows=slice(int(start), int(stop)))
np.savez(out, x=x_BxT, y=y_BxT)
"""


def test_two_processes_rows_concatenate_to_the_global_batch(shakespeare_data_dir, tmp_path):
    env = this_tree_env()
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, shakespeare_data_dir, str(start), str(stop),
                          str(tmp_path / f"{i}.npz")], env=env)
        for i, (start, stop) in enumerate([(0, 4), (4, 8)])
    ]
    assert [p.wait() for p in procs] == [0, 0]
    parts = [np.load(tmp_path / f"{i}.npz") for i in range(2)]
    x_BxT, y_BxT = get_batch(load_tokens(shakespeare_data_dir, "train"), (7, 3), 8, 16)
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), x_BxT)
    np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts]), y_BxT)


def test_missing_data_dir_error_names_the_path_and_prepare_script(tmp_path):
    with pytest.raises(MidgptError, match="prepare.py") as info:
        load_tokens(str(tmp_path / "no_such_dir"), "train")
    assert str(tmp_path / "no_such_dir") in str(info.value)
    with pytest.raises(MidgptError, match="meta.json"):
        load_meta(str(tmp_path))


@pytest.mark.parametrize("config, script", [("bpe_corpus", "openwebtext"),
                                            ("shakespeare_char_cpu", "shakespeare_char")])
def test_missing_data_is_told_to_be_prepared_with_the_tokenizer_the_model_can_read(tmp_path, config, script):
    # bpe_corpus's 50304 ids are GPT-2's: characters, suggested first, gave it data it cannot use well.
    config = apply_overrides(load_config(config), [f"--data_dir={tmp_path}/mine"])
    with pytest.raises(MidgptError) as error:
        load_splits(config)
    assert str(error.value).count("prepare.py") == 1 and f"python data/{script}/prepare.py --input " in str(error.value)


def test_encode_rejects_unknown_characters_naming_them(meta):
    with pytest.raises(MidgptError, match="€") as info:
        encode(meta, "hello € world ¥")
    assert "¥" in str(info.value)
    # A prompt in another script names its first 20: all 20,989 of one were a 147 kB line.
    with pytest.raises(MidgptError) as info:
        encode(meta, "".join(map(chr, range(0x4E00, 0x4E00 + 25))))
    assert str(info.value) == f"characters not in the vocabulary: {[chr(0x4E00 + i) for i in range(20)]} and 5 more"


def test_missing_data_error_names_the_datasets_own_prepare_script(tmp_path):
    (tmp_path / "prepare.py").write_text("")
    with pytest.raises(MidgptError, match=f"run python {tmp_path}/prepare.py"):
        load_meta(str(tmp_path))


def test_a_relative_data_dir_run_from_outside_the_repository_names_it(tmp_path, monkeypatch):
    # The configs' data/NAME is relative: launch.py run from another directory said to prepare data that was there.
    from midgpt.data import _require
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MidgptError) as error:
        _require("data/shakespeare_char", "prepare.py")  # what the clone always holds, unlike its prepared data
    root = REPO_ROOT.resolve()
    assert str(error.value) == (f"data/shakespeare_char not found in {os.getcwd()}; run from the repository ({root}) "
                                f"or pass --data_dir={root}/data/shakespeare_char")
    with pytest.raises(MidgptError, match="to create it"):  # where the clone has none either: prepare it
        _require("data/no_such_dataset", "meta.json")


def test_a_token_id_of_exactly_the_vocabulary_size_in_a_target_only_is_refused(tmp_path):
    # One window of 64 + 1 tokens: the last is a target only, never an input.
    config = load_config("shakespeare_char_cpu")  # 65 ids, block_size 64
    tokens_N = np.full(config.model.block_size + 1, 7, np.uint16)
    tokens_N[-1] = config.model.vocab_size
    (tmp_path / "train.bin").write_bytes(tokens_N.tobytes())
    with pytest.raises(MidgptError, match=f"holds token id {config.model.vocab_size}, past model.vocab_size"):
        global_batch(load_tokens(str(tmp_path), "train"), (0, 1), 1, config, make_mesh(config))


def test_a_model_vocabulary_one_short_of_the_datas_is_refused(shakespeare_data_dir, meta):
    config = apply_overrides(load_config("shakespeare_char_cpu"), [
        f"--data_dir={shakespeare_data_dir}", f"--model.vocab_size={meta['vocab_size'] - 1}"])
    with pytest.raises(MidgptError, match=f"set --model.vocab_size={meta['vocab_size']} or more"):
        load_splits(config)


def test_the_micro_batches_of_a_step_are_the_rows_of_one_global_batch(shakespeare_data_dir):
    config = load_config("shakespeare_char_cpu")
    B, T = config.batch_size, config.model.block_size
    tokens = load_tokens(shakespeare_data_dir, "train")
    x_GxBxT, y_GxBxT = global_batch(tokens, (0, 1), 3, config, make_mesh(config))
    x_BxT, y_BxT = get_batch(tokens, (0, 1), 3 * B, T)
    np.testing.assert_array_equal(np.asarray(x_GxBxT), x_BxT.reshape(3, B, T))
    np.testing.assert_array_equal(np.asarray(y_GxBxT), y_BxT.reshape(3, B, T))


@pytest.mark.parametrize("meta_json", [{"tokenizer": "gpt2", "vocab_size": 50304},  # a padded table's, not GPT-2's
                                       {"tokenizer": "char", "vocab_size": 2, "chars": ["a", "bc"]}])
def test_a_meta_json_of_no_tokenizer_is_refused(tmp_path, meta_json):
    (tmp_path / "meta.json").write_text(json.dumps(meta_json))
    with pytest.raises(MidgptError, match="describes no tokenizer"):
        load_meta(str(tmp_path))


def test_missing_data_for_gpt2s_own_vocabulary_is_told_to_prepare_bpe(tmp_path):
    config = apply_overrides(load_config("shakespeare_char_cpu"), [
        f"--data_dir={tmp_path}/mine", f"--model.vocab_size={GPT2_VOCAB_SIZE}"])
    with pytest.raises(MidgptError, match="python data/openwebtext/prepare.py --input "):
        load_splits(config)


def test_prefetch_makes_each_step_once_in_order():
    made = []
    assert list(prefetch(lambda step: made.append(step) or step * 10, range(3, 6))) == [(3, 30), (4, 40), (5, 50)]
    assert made == [3, 4, 5] and list(prefetch(made.append, range(0))) == []
