"""Run configuration: frozen dataclasses, command-line overrides, JSON round trip."""

import dataclasses
import difflib
import filecmp
import importlib
import importlib.util
import json
import math
import os
import pkgutil
import re
import struct
import sys
import traceback
import typing
from collections.abc import Sequence

from midgpt.errors import MidgptError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    block_size: int  # longest context, in tokens
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    rope_base: float = 10000.0
    # How the step runs, not what it computes: these may change when a run resumes (rundir.FREE_ON_RESUME).
    remat: str = "full"  # recompute in the backward pass: "full" (each layer), "dots" (all but weight matmuls), "none"
    scan_unroll: int = 1  # layers per iteration of the scan over layers; n_layer unrolls it fully
    # "einsum", or jax.nn.dot_product_attention's "xla" or "cudnn" (fused, GPU); "auto": cudnn on
    # NVIDIA GPUs (Ampere on) in bf16 for head widths it takes (a multiple of 8, to 128; 256 from
    # Hopper) when no attention dropout is drawn, einsum elsewhere (faster on CPUs)
    attention: str = "auto"

    @property
    def head_dim(self) -> int:  # C in array names
        return self.n_embd // self.n_head


@dataclasses.dataclass(frozen=True)
class Config:
    data_dir: str
    model: ModelConfig
    name: str = ""  # the named config it came from (launch.py --config); a resume keeps to it
    seed: int = 0
    max_steps: int = 5000
    batch_size: int = 64  # micro-batch rows; global batch is batch_size * g_accum_iters
    g_accum_iters: int = 1
    learning_rate: float = 1e-3  # peak
    warmup_steps: int = 100
    lr_decay_steps: int = 5000  # cosine reaches min_lr here
    min_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 1e-4  # independent: not multiplied by the peak lr
    grad_clip: float = 1.0  # the global gradient norm is clipped to this; 0: no clipping
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    # Training steps in one jitted call (a scan over their batches), so that the host dispatches once
    # for them; a call ends at every step where the loop logs, evaluates or saves, whatever the count.
    steps_per_call: int = 1
    param_dtype: str = "float32"  # the only choice (check_config says why); config.json names it
    # "bfloat16" (matmul inputs; sums in float32), "float32", or "auto": bfloat16, but float32 on a
    # CPU not known to multiply bf16 faster (precision.multiplies_bf16_faster). Like the model's "how the
    # step runs" fields, "auto" may change when a run resumes on another machine.
    compute_dtype: str = "auto"
    # Device mesh (replica, fsdp): one entry may be -1, "all remaining devices".
    mesh_shape: tuple[int, int] = (1, -1)
    shard_model: bool = True  # FSDP: shard parameters and optimiser state over the fsdp axis
    fsdp_min_size: int = 2**16  # parameters with fewer elements stay replicated
    checkpoint_interval: int = 500  # steps between checkpoints; one is also written at the end
    keep_checkpoints: int = 3  # the newest this many are kept


def steps_a_call(config: Config) -> int:
    """The steps a call runs: the most, up to steps_per_call, that divide every interval the loop acts at."""
    every = math.gcd(config.log_interval, config.eval_interval, config.checkpoint_interval)
    most = min(config.steps_per_call, every)
    # Found as pairs (i, every // i), i up to sqrt(every): counting up to `most` took minutes for intervals of 10**9.
    divisors = {d for i in range(1, math.isqrt(every) + 1) if every % i == 0 for d in (i, every // i)}
    return max(d for d in divisors if d <= most)


def config_names() -> list[str]:
    """The named configs: the modules of midgpt.configs."""
    return sorted(m.name for m in pkgutil.iter_modules(importlib.import_module("midgpt.configs").__path__))


def load_config(name: str) -> Config:
    """Return the `config` defined by module midgpt.configs.<name>."""
    available = config_names()
    # Check the name before importing so a typo never imports something else.
    if name not in available:
        hint = _did_you_mean(name, available)
        stem = os.path.splitext(os.path.basename(name))[0]
        folder = importlib.import_module("midgpt.configs").__path__[0]
        bundled = os.path.join(folder, f"{stem}.py")
        if stem in available and os.path.isfile(name) and filecmp.cmp(name, bundled, shallow=False):  # or a copy
            hint = f"; --config takes a config's name, not its file: --config={stem}"
        elif name.endswith(".py") or "/" in name or os.sep in name:  # a file of the user's: where it must go
            # Not under a name taken already: an edited copy of shakespeare_char.py would run the original.
            mine = f"my_{stem}" if stem in available else stem or "NAME"
            hint = (f"; --config takes a config's name, not a path: a config of your own is a module in {folder}, "
                    f"e.g. {os.path.join(folder, mine + '.py')} for --config={mine}")
        raise MidgptError(f"unknown config {name!r}{hint} (available: {', '.join(available)})")
    module = f"midgpt.configs.{name}"
    where = importlib.util.find_spec(module).origin
    try:
        config = getattr(importlib.import_module(module), "config", None)
    except Exception as e:  # the file is code, and its mistakes a user's: one line, at its line
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == where]
        line = e.lineno if isinstance(e, SyntaxError) else (lines[-1] if lines else None)
        typo = re.search(r"unexpected keyword argument '(\w+)'", str(e)) if isinstance(e, TypeError) else None
        fields = [leaf.rpartition(".")[2] for leaf in _leaf_types(Config)]
        raise MidgptError(f"{where}{f', line {line}' if line else ''}: {type(e).__name__}: "
                          f"{e.msg if isinstance(e, SyntaxError) else e}"
                          + (_did_you_mean(typo.group(1), fields) if typo else "")) from None
    # Checked as config.json is on resume: a run trained from a float n_layer could not be resumed.
    if not isinstance(config, Config):
        raise MidgptError(f"{where} must define `config`, a midgpt.config.Config" +
                          (f", not a {type(config).__name__}" if config is not None else ""))
    for field, group in typing.get_type_hints(Config).items():  # a dict's keys would be read as config.json's
        if dataclasses.is_dataclass(group) and not isinstance(value := getattr(config, field), group):
            raise MidgptError(f"{where}: each group of the config must be its dataclass ({field}="
                              f"{group.__name__}(...)), not a {type(value).__name__}")
    # Through JSON, as config.json reads back: a list where a tuple goes becomes the tuple, a bad type an error.
    try:
        checked = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    except (MidgptError, TypeError, ValueError) as e:  # json's: a value no JSON holds (a numpy number)
        raise MidgptError(f"{where}: {e}") from None
    return dataclasses.replace(checked, name=name)


def apply_overrides(config: Config, overrides: list[str], options: Sequence[str] = ()) -> Config:
    """Return config with each `--dotted.field=VALUE` applied in order.

    options: the command's own flags (no "--"), which a mistyped one reaches here as an override: suggested too.
    """
    types = {name: type_ for name, type_ in _leaf_types(type(config)).items() if name != "name"}  # nor suggested
    for arg in overrides:
        flag = arg.partition("=")[0].removeprefix("--")
        # --multi_host or --rundri=DIR would read as a malformed override, or an unknown field
        close = nearest(flag, [*types, *options]) if arg.startswith("--") and flag not in types else []
        if set(close) & set(options):
            shown = (f"--{c}" if c in options else repr(c) for c in close)
            raise MidgptError(f"unknown argument --{flag}; did you mean {' or '.join(shown)}?")
        if arg.startswith("--") and any(t.startswith(flag + ".") for t in types):  # --model=3, or --model alone
            raise MidgptError(f"config field {flag!r} is a group; set its fields, e.g. --{flag}.FIELD=VALUE")
        if not arg.startswith("--") or "=" not in arg:
            named = arg.startswith("--") and arg[2:3].strip()  # "--max_steps 100" came as "--max_steps"; not "--"
            if named and (bare := arg.split()[0][2:]) not in types:  # --debug, a flag of another command
                raise MidgptError(f"unknown argument --{bare}"
                                  + (_did_you_mean(bare, types) or f"; known fields: {', '.join(types)}"))
            example = f"{arg.split()[0]}=VALUE" if named else "--model.n_layer=2"
            raise MidgptError(f"malformed override {arg!r}; expected --FIELD=VALUE, e.g. {example}")
        name, _, text = arg[2:].partition("=")
        if name == "name":
            raise MidgptError("config field 'name' is the --config a run came from; it cannot be overridden")
        if name not in types:
            hint = _did_you_mean(name, types) or f"; known fields: {', '.join(types)}"
            raise MidgptError(f"unknown config field {name!r}{hint}")
        if name == "data_dir":  # the shell leaves the ~ of --data_dir=~/data to us
            text = os.path.expanduser(text)
        config = _replace(config, name, _parse(name, types[name], text))
    return config


def leaves(config: Config) -> dict:
    """Dotted name -> value, for every field that is not a group (model.n_layer, not model)."""
    return {name: get_field(config, name) for name in _leaf_types(type(config))}


def get_field(config, dotted: str):
    """The value of a dotted field (model.n_layer)."""
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def config_to_dict(config: Config) -> dict:
    """Plain nested dict of config, ready for json.dumps."""
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> Config:
    """Inverse of config_to_dict; bad keys or value types raise MidgptError."""
    return _from_dict(Config, d, prefix="")


def _leaf_types(cls: type, prefix: str = "") -> dict[str, type]:
    """Dotted name -> annotated type, for every non-dataclass field under cls."""
    hints = typing.get_type_hints(cls)
    types = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            types.update(_leaf_types(hints[f.name], f"{prefix}{f.name}."))
        else:
            types[prefix + f.name] = hints[f.name]
    return types


def _did_you_mean(name: str, choices) -> str:
    """"; did you mean 'x'?" naming the nearest choices, else ""."""
    close = nearest(name, choices)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def abbreviated(name: str, choices) -> list[str]:
    """The choices that name abbreviates, shortest first."""
    return sorted((c for c in choices if c.startswith(name) and c != name), key=len)


def nearest(name: str, choices) -> list[str]:
    """At most 3 choices, nearest first: those name abbreviates, else the closest by difflib ratio (none if none is)."""
    choices = list(choices)
    # By ratio, sample.py's --temp was nearest to --step, not to the --temperature it abbreviates.
    if shortened := abbreviated(name, choices):
        return shortened[:3]
    ratio = {c: difflib.SequenceMatcher(None, name, c).ratio() for c in choices}
    best = max(ratio.values(), default=0.0)
    # Near-ties only: 'model.n_layers' should suggest model.n_layer, not every model.n_* field.
    return sorted((c for c in ratio if ratio[c] >= max(0.6, best - 0.1)), key=lambda c: -ratio[c])[:3]


def _parse(name: str, type_: type, text: str):
    """Parse one command-line value by the field's annotated type."""
    try:
        if type_ is bool:
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        if typing.get_origin(type_) is tuple:  # "2,4" or "(2,4)"
            items = typing.get_args(type_)
            values = tuple(int(v) for v in text.strip("()").split(","))
            if len(values) != len(items):
                raise ValueError
            return values
        return type_(text)  # int("1.5") raises, so a fractional int is rejected
    except (KeyError, ValueError):
        expected = {bool: "bool (true/false/1/0)"}.get(type_, getattr(type_, "__name__", str(type_)))
        if typing.get_origin(type_) is tuple:
            expected = f"{len(typing.get_args(type_))} comma-separated ints"
        raise MidgptError(f"config field {name!r} expects {expected}, got {text!r}") from None


def _replace(obj, dotted: str, value):
    """dataclasses.replace along a dotted path, rebuilding each frozen parent."""
    head, _, rest = dotted.partition(".")
    if rest:
        value = _replace(getattr(obj, head), rest, value)
    return dataclasses.replace(obj, **{head: value})


def _from_dict(cls: type, d, prefix: str):
    """Build dataclass cls from dict d, checking keys and leaf types."""
    if not isinstance(d, dict):
        raise MidgptError(f"config field {prefix.rstrip('.') or 'root'!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise MidgptError(f"unknown config keys: {', '.join(prefix + k for k in unknown)}")
    # Every field, defaults too: a run resumed with a default it never had would silently be another run.
    # But for the name, which runs saved before configs had names lack.
    missing = sorted(set(hints) - set(d) - {"name"})
    if missing:
        raise MidgptError(f"missing config keys: {', '.join(prefix + k for k in missing)}")
    kwargs = {}
    for key, value in d.items():
        type_ = hints[key]
        if dataclasses.is_dataclass(type_):
            value = _from_dict(type_, value, f"{prefix}{key}.")
        # A hand-edited JSON file may write 0 for a float; Python's bool is an int but never a valid number here.
        elif type_ is float and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > sys.float_info.max:  # float() would raise OverflowError, a traceback
                raise MidgptError(f"config field {prefix + key!r} expects float, got an integer of {len(str(value))} "
                                  "digits, past any float")
            value = float(value)
        elif typing.get_origin(type_) is tuple:  # JSON has no tuples: it gives a list
            if not (isinstance(value, list) and len(value) == len(typing.get_args(type_))
                    and all(type(v) is int for v in value)):
                raise MidgptError(f"config field {prefix + key!r} expects {len(typing.get_args(type_))} ints, "
                                  f"got {value!r}")
            value = tuple(value)
        elif not isinstance(value, type_) or (type_ is int and isinstance(value, bool)):
            raise MidgptError(f"config field {prefix + key!r} expects {type_.__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


FLOAT32_TINY = 1.2e-38  # about float32's smallest normal number: XLA flushes a float32 below it to 0
FLOAT32_MAX = 3.4e38  # about its largest: past it, inf


def float32(x: float) -> float:
    """x rounded to float32, as the optimiser holds it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def check_config(config: Config) -> None:
    """Raise MidgptError for values that parse but cannot run."""
    m = config.model
    positive = {
        "model.vocab_size": m.vocab_size, "model.block_size": m.block_size, "model.n_layer": m.n_layer,
        "model.n_head": m.n_head, "model.n_embd": m.n_embd, "max_steps": config.max_steps,
        "batch_size": config.batch_size, "g_accum_iters": config.g_accum_iters,
        "eval_interval": config.eval_interval, "eval_iters": config.eval_iters,
        "log_interval": config.log_interval, "steps_per_call": config.steps_per_call,
        "learning_rate": config.learning_rate,
        "lr_decay_steps": config.lr_decay_steps, "checkpoint_interval": config.checkpoint_interval,
        "keep_checkpoints": config.keep_checkpoints, "model.scan_unroll": m.scan_unroll,
        "model.rope_base": m.rope_base,
    }
    for name, type_ in _leaf_types(Config).items():  # nan passes every comparison below
        if type_ is float and not math.isfinite(get_field(config, name)):
            raise MidgptError(f"config field {name!r} must be a finite number, got {get_field(config, name)}")
    if not config.data_dir:
        raise MidgptError("config field 'data_dir' is empty; give the folder that prepare.py wrote")
    for name, value in positive.items():
        if value <= 0:
            raise MidgptError(f"config field {name!r} must be positive, got {value}")
    # Far beyond any real run (GPT-3 took 3.2M tokens a step), and where counting the bytes and
    # the ways to split a batch would take minutes before the memory plan could refuse it.
    for name, micro_batches in (("g_accum_iters", config.g_accum_iters), ("eval_iters", config.eval_iters)):
        if (tokens := micro_batches * config.batch_size * m.block_size) >= 2**31:
            raise MidgptError(f"{name} x batch_size x model.block_size is {tokens:,} tokens at once, far beyond "
                              "any run (GPT-3 took 3.2M a step); lower them (below 2**31 together)")
    # Past int64, a traced shape was an OverflowError of numpy's; below 2**31, the memory plan refuses them.
    for name in ("model.vocab_size", "model.n_layer", "model.n_head", "model.n_embd"):
        if get_field(config, name) >= 2**31:
            raise MidgptError(f"config field {name!r} must be below 2**31 (a dimension of the model's arrays), "
                              f"got {get_field(config, name)}")
    # The step counter, and the schedule's counts beside it, are int32 in the jitted step.
    for name in ("max_steps", "warmup_steps", "lr_decay_steps"):
        if getattr(config, name) >= 2**30:
            raise MidgptError(f"config field {name!r} must be below 2**30 (steps are counted in int32), "
                              f"got {getattr(config, name)}")
    # The optimiser's arithmetic is float32: a learning_rate of 1e-300 there was 0, and the decay's
    # factor weight_decay / learning_rate inf, which made every weight NaN.
    too_large = config.learning_rate > FLOAT32_MAX
    if config.learning_rate < FLOAT32_TINY or too_large or config.weight_decay / config.learning_rate > FLOAT32_MAX:
        fix = "lower --learning_rate" if too_large else "raise --learning_rate or lower --weight_decay"
        raise MidgptError(f"learning_rate={config.learning_rate} with weight_decay={config.weight_decay} is beyond "
                          f"float32, in which the optimiser runs; {fix}")
    # numpy's generators, which draw the batches, take no negative seed; jax.random.key keeps 32 bits
    # (without jax_enable_x64), and the dropout key is key(seed + 1), so seed + 1 must stay below 2**32
    if not 0 <= config.seed < 2**32 - 1:
        raise MidgptError(f"config field 'seed' must be in [0, 2**32 - 1), got {config.seed}")
    if not 0 <= config.min_lr <= config.learning_rate:
        raise MidgptError(f"min_lr={config.min_lr} must be in [0, learning_rate={config.learning_rate}]")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(config, name) < 1:
            raise MidgptError(f"config field {name!r} must be in [0, 1), got {getattr(config, name)}")
        # 1 in float32: beta2's bias correction divided by 0 (every update 0, and the run "finished"), beta1's
        # made the first update inf.
        if float32(getattr(config, name)) == 1:
            raise MidgptError(f"{name}={getattr(config, name)} is 1 in float32, in which the optimiser runs; "
                              f"use at most {float32(1 - 2**-24)!r}")
    for name in ("weight_decay", "grad_clip", "fsdp_min_size"):  # grad_clip=0: no clipping, as in nanoGPT
        if getattr(config, name) < 0:
            raise MidgptError(f"config field {name!r} must be 0 or more, got {getattr(config, name)}")
    # Below float32's smallest normal number, XLA flushes a rate or a clip to 0, and no step moves a weight: the
    # run trained nothing and exited 0. The warmup's first step takes learning_rate / warmup_steps.
    first_lr = config.learning_rate / max(config.warmup_steps, 1)
    if first_lr < FLOAT32_TINY:
        raise MidgptError(f"learning_rate={config.learning_rate} over warmup_steps={config.warmup_steps} starts at "
                          f"{first_lr:.3g}, 0 in float32, in which the optimiser runs; raise --learning_rate or lower "
                          "--warmup_steps")
    if 0 < config.grad_clip < FLOAT32_TINY:
        raise MidgptError(f"grad_clip={config.grad_clip} is 0 in float32 and would zero every update; pass "
                          f"--grad_clip=0 for no clipping, or at least {FLOAT32_TINY}")
    # Independent of the learning rate, a step at its peak scales each decayed weight by 1 - weight_decay: 1
    # zeroed them every step, and the run sat at a uniform guess's loss with no error.
    if config.weight_decay >= 1:
        raise MidgptError(f"weight_decay={config.weight_decay} must be below 1: the decay is not multiplied by the "
                          "learning rate, so each step at the peak rate scales the weights by 1 - weight_decay "
                          "(AdamW's 0.1 at a rate of 1e-3 is 1e-4 here)")
    if m.n_embd % m.n_head or m.head_dim % 2:
        raise MidgptError(
            f"model.n_embd={m.n_embd} must split into model.n_head={m.n_head} heads of even width "
            "(rotary embeddings rotate pairs of features)"
        )
    # model.dropout draws its masks 8 bits at a time: a rate rounds to k/256, and k must be 1-255.
    if not (m.dropout == 0 or 0 < round(m.dropout * 256) < 256):
        raise MidgptError(f"config field 'model.dropout' must be 0 or from 1/256 to 255/256 (it is drawn in "
                          f"steps of 1/256), got {m.dropout}")
    if config.lr_decay_steps < 2:  # warmup takes at least one update, and the decay ends after it
        raise MidgptError(f"lr_decay_steps={config.lr_decay_steps} must be at least 2")
    if not 0 <= config.warmup_steps < config.lr_decay_steps:
        raise MidgptError(f"warmup_steps={config.warmup_steps} must be in [0, lr_decay_steps={config.lr_decay_steps}): "
                          "lower --warmup_steps or raise --lr_decay_steps")
    replica, fsdp = config.mesh_shape
    if (replica, fsdp).count(-1) > 1 or min(replica, fsdp) < -1 or 0 in (replica, fsdp):
        raise MidgptError(f"mesh_shape={replica},{fsdp} needs positive sizes, at most one of them -1 "
                          "(all remaining devices)")
    if m.attention not in ("auto", "einsum", "xla", "cudnn"):
        raise MidgptError(f"config field 'model.attention' must be auto, einsum, xla or cudnn, got {m.attention!r}")
    if m.attention in ("xla", "cudnn") and m.dropout > 0:
        raise MidgptError(f"model.attention={m.attention} (jax.nn.dot_product_attention) has no dropout; "
                          "set --model.dropout=0 or --model.attention=einsum")
    if m.remat not in ("full", "dots", "none"):
        raise MidgptError(f"config field 'model.remat' must be full, dots or none, got {m.remat!r}")
    # float16's range would need loss scaling: its gradients underflow (and Adam's second moment).
    if config.compute_dtype not in ("auto", "float32", "bfloat16"):
        raise MidgptError(f"config field 'compute_dtype' must be auto, float32 or bfloat16 (float16 would need loss "
                          f"scaling, which midgpt does not do), got {config.compute_dtype!r}")
    if config.param_dtype != "float32":  # bf16's 8 bits round away updates under 0.4% of a weight
        raise MidgptError(f"config field 'param_dtype' must be float32, got {config.param_dtype!r}: in bfloat16, "
                          "weight decay and the norm gains' updates round away; --compute_dtype=bfloat16 "
                          "already runs the matmuls in bfloat16")
