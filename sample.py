"""Generate text from a trained run.

python sample.py --rundir=DIR [--start=TEXT | --start=FILE:path] [--num_samples=N] [--max_new_tokens=M]
                 [--temperature=T] [--top_k=K] [--seed=S] [--step=STEP]
"""

import itertools
import os
import signal
import sys

from midgpt.cli import ArgumentParser, cache_compiled_programs, positive_int, run, say, start_devices
from midgpt.errors import MidgptError
from midgpt.rundir import read_run_config
from midgpt.tokenizer import TooLarge, read_utf8


# A prompt file larger is no prompt (/dev/zero, a disk image): read whole, it filled the memory.
PROMPT_MAX_BYTES = 64 << 20


def read_prompt(parser: ArgumentParser, start: str) -> str:
    """--start's text: the prompt as given, or the file that FILE:path names."""
    if start == "FILE:":  # an unset $PROMPT: "cannot read the prompt file : Is a directory"
        parser.error("--start=FILE: names no file; give FILE:path")
    if not start.startswith("FILE:"):
        if not start:
            parser.error("the prompt is empty; give --start at least one character")
        return start
    try:
        # ~ is expanded, as it is in --rundir. Its line ends as they are: main reads them as "\n"
        # unless the run's characters hold "\r" (text prepared with CRLF).
        text = read_utf8(path := os.path.expanduser(start.removeprefix("FILE:")), PROMPT_MAX_BYTES)
    except OSError as e:  # a missing file is not a usage error: no "see --help"
        raise MidgptError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
    except TooLarge as e:
        raise MidgptError(f"cannot read the prompt file {e}; the model sees only a prompt's end (its last block_size "
                          f"tokens): give that, e.g. tail -c 100000 {path} > end.txt") from None
    except MidgptError as e:  # not UTF-8: what to convert it from, not a usage error
        raise MidgptError(f"cannot read the prompt file {e}") from None
    if not text:  # named: as a missing file, not a usage error
        raise MidgptError(f"the prompt file {path} is empty; write the prompt in it")
    return text


def check_stdout_holds(meta: dict) -> None:
    """Refuse a stdout whose encoding cannot write every character the run may sample, before any text."""
    # A locale's ascii or latin-1 stdout stopped a sample in a traceback at its first emoji. GPT-2's text may
    # hold any character: a codec that writes these four is one of the whole of Unicode.
    can_come = "".join(meta["chars"]) if meta["tokenizer"] == "char" else "\xe9\u4e2d\ufffd\U0001f600"
    try:
        can_come.encode(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict")
    except (UnicodeEncodeError, LookupError):
        raise MidgptError(f"stdout writes {sys.stdout.encoding}, which cannot hold every character this run may "
                          "sample; set PYTHONIOENCODING=utf-8 (or a UTF-8 locale)") from None


def main(argv: list[str]) -> None:
    # Nothing to save: Ctrl-C ends it at once. Python's KeyboardInterrupt would wait for the
    # generation, which runs in C++ (minutes, for a long sample), and end in a traceback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--rundir", required=True, type=os.path.expanduser, help="a run directory made by launch.py")
    parser.add_argument("--start", default="\n",
                        help="the prompt, or FILE:path to read it from a file (default: a newline)")
    parser.add_argument("--num_samples", type=positive_int, default=1, help="samples to draw")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens to add to the prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=positive_int, default=None, help="draw from the k likeliest tokens only "
                        "(default: from all)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same text")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint to use (default: the newest that finished and restores)")
    args = parser.parse_args(argv)
    if args.rundir == "":  # an unset $RUNDIR: as launch.py says it
        parser.error("--rundir is empty")
    if args.num_samples >= 2**31:  # JAX indexes the samples in int32: it warned, then the memory check refused them
        parser.error(f"--num_samples must be below 2**31 (int32 indices), got {args.num_samples}")
    if not 0 <= args.max_new_tokens <= 2**30:
        parser.error(f"--max_new_tokens must be in [0, 2**30] (int32 positions), got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf"):  # also refuses nan, which would draw token 0 every time
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 <= args.seed < 2**32:  # jax.random.key keeps 32 bits: 2**32 would draw as 0 does
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")

    start = read_prompt(parser, args.start)
    config = read_run_config(args.rundir)  # a wrong --rundir told at once, not after JAX's import (a second)

    import jax  # only once the arguments and the run are good
    import jax.numpy as jnp

    cache_compiled_programs()
    start_devices()  # before the checkpoint's restore, whose error it would be

    from midgpt import memory, tokenizer
    from midgpt.model import cast_floats
    from midgpt.precision import compute_dtype
    from midgpt.sample import (check_samples_fit, fitting_memory, generate, generate_chunks, load_model,
                               prompt_key, run_meta)

    notes = []  # for stderr (stdout is the text alone), shown with the text
    config, model = load_model(args.rundir, args.step, say=notes.append, config=config)
    meta = run_meta(args.rundir, config, say=notes.append)
    model = cast_floats(model, jnp.dtype(compute_dtype(config.compute_dtype)))
    check_stdout_holds(meta)
    if args.start.startswith("FILE:") and not (meta["tokenizer"] == "char" and "\r" in meta["chars"]):
        start = start.replace("\r\n", "\n").replace("\r", "\n")  # as Python's text mode reads them
    try:
        ids = tokenizer.encode(meta, start)
    except tokenizer.UnknownCharacters as e:
        if args.start != parser.get_default("start"):
            # file:path is read as the prompt's text, a slip; FILE:path's characters are the file's own.
            from_file = args.start.startswith("FILE:")
            slip = not from_file and args.start[:5].lower() == "file:"
            where = f"the prompt file {args.start.removeprefix('FILE:')}" if from_file else "the prompt"
            raise MidgptError(f"{e}: leave them out of {where} (the run knows the characters of its data only)"
                              + ("; a prompt file is FILE:path, in capitals" if slip else "")) from None
        raise MidgptError(f"{e}, the default --start: pass --start=TEXT in this run's vocabulary") from None
    T = config.model.block_size
    if len(ids) > T:  # the model sees at most block_size tokens: a longer prompt keeps its end
        kept = tokenizer.last_tokens(meta, ids, T)
        notes.append(f"the prompt's first {len(ids) - len(kept)} tokens are left out: the model sees its last "
                     f"{len(kept)}")
        ids = kept

    # The notes first, with the text: an error before it is one line alone.
    def show(text: str, end: str = "\n") -> bool:
        for line in notes:
            print(line, file=sys.stderr)
        notes.clear()
        return say(text, end=end)  # False once stdout's reader is gone (`| head`): none reads what more is drawn

    # vocab: only the tokenizer's ids are drawn (the table may have more rows).
    sampling = dict(temperature=args.temperature, top_k=args.top_k, vocab=meta["vocab_size"])
    available, source, refuses = memory.device_memory()
    if available is not None and not refuses:  # on a CPU: past its memory, the kernel kills it without a word
        # One device samples: the host's memory whole, not a share of it for each of the simulated CPU devices.
        available, source = memory.host_memory()
        check_samples_fit(model, args.num_samples, len(ids), args.max_new_tokens, available, source, **sampling)
    # A prompt of many tokens can fill the memory already in its copy for each sample.
    with fitting_memory(args.num_samples, len(ids) + args.max_new_tokens):
        prompt_BxP = jnp.tile(jnp.asarray(ids, jnp.int32), (args.num_samples, 1))
        what = (model, prompt_BxP, args.max_new_tokens, prompt_key(args.seed, ids))
        if args.num_samples == 1:  # shown as it comes: a long sample on a CPU takes minutes
            new_ids = (jax.device_get(new_1xN)[0].tolist() for new_1xN in generate_chunks(*what, **sampling))
            for piece in tokenizer.decode_pieces(meta, itertools.chain([ids], new_ids)):
                if not show(piece, end=""):
                    return
            show("")
        else:
            for i, row in enumerate(jax.device_get(generate(*what, **sampling))):
                if not show(("-" * 40 + "\n" if i else "") + tokenizer.decode(meta, row.tolist())):
                    return


if __name__ == "__main__":
    run(main)
