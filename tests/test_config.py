"""Config promises: typed overrides by dotted name, helpful errors, JSON round trip, named configs."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from midgpt import configs
from midgpt.config import (Config, ModelConfig, apply_overrides, check_config, config_from_dict, config_to_dict,
                           load_config)
from midgpt.errors import MidgptError
from midgpt.rundir import check_saved_config, read_config_json, resume_config, runs_near, saved_steps

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def config():
    return load_config("shakespeare_char_cpu")


def test_top_level_and_nested_overrides_are_parsed_by_field_type(config):
    new = apply_overrides(
        config, ["--max_steps=100", "--learning_rate=1e-3", "--data_dir=elsewhere", "--model.n_layer=2",
                 "--model.dropout=0.5"]
    )
    assert new.max_steps == 100 and type(new.max_steps) is int
    assert new.learning_rate == 1e-3 and type(new.learning_rate) is float
    assert new.data_dir == "elsewhere"
    assert new.model.n_layer == 2 and type(new.model.n_layer) is int
    assert new.model.dropout == 0.5 and type(new.model.dropout) is float
    # Untouched fields survive, and the input config is left alone.
    assert new.model.n_embd == config.model.n_embd and new.batch_size == config.batch_size
    assert config.max_steps == 2000 and config.model.n_layer == 4


def test_later_override_of_same_field_wins(config):
    assert apply_overrides(config, ["--max_steps=1", "--max_steps=7"]).max_steps == 7


def test_float_field_accepts_a_whole_number_as_float(config):
    new = apply_overrides(config, ["--min_lr=0"])
    assert new.min_lr == 0.0 and type(new.min_lr) is float


@pytest.mark.parametrize("text, expected", [("true", True), ("True", True), ("1", True), ("false", False),
                                            ("0", False)])
def test_bool_override_accepts_true_false_1_0(text, expected):
    @dataclasses.dataclass(frozen=True)
    class WithFlag:
        flag: bool = False

    assert apply_overrides(WithFlag(), [f"--flag={text}"]).flag is expected


def test_bool_override_rejects_other_words():
    @dataclasses.dataclass(frozen=True)
    class WithFlag:
        flag: bool = False

    with pytest.raises(MidgptError, match="'flag'.*bool.*'yes'"):
        apply_overrides(WithFlag(), ["--flag=yes"])


def test_unknown_field_error_names_the_field_and_close_matches(config):
    with pytest.raises(MidgptError) as info:
        apply_overrides(config, ["--model.n_layers=2"])
    assert str(info.value) == "unknown config field 'model.n_layers'; did you mean 'model.n_layer'?"
    with pytest.raises(MidgptError, match="'max_step'.*did you mean 'max_steps'"):
        apply_overrides(config, ["--max_step=3"])


def test_a_mistyped_flag_of_the_command_is_suggested_and_a_field_is_still_a_field(config):
    options = ["rundir", "multihost", "steps"]
    with pytest.raises(MidgptError) as info:
        apply_overrides(config, ["--multi_host"], options)  # no "=": it was a malformed override
    assert str(info.value) == "unknown argument --multi_host; did you mean --multihost?"
    with pytest.raises(MidgptError) as info:
        apply_overrides(config, ["--rundri=out"], options)
    assert str(info.value) == "unknown argument --rundri; did you mean --rundir?"
    with pytest.raises(MidgptError) as info:
        apply_overrides(config, ["--max_step=3"], options)  # nearer a field than --steps
    assert str(info.value) == "unknown config field 'max_step'; did you mean 'max_steps'?"
    assert apply_overrides(config, ["--max_steps=3"], options).max_steps == 3


def test_a_command_without_config_fields_names_close_options_and_takes_no_abbreviation():
    # sample.py's: "unrecognized arguments" alone, where launch.py named the flag meant.
    from midgpt.cli import ArgumentParser

    parser = ArgumentParser(prog="sample.py")
    for option in ("--rundir", "--start", "--num_samples", "--steps", "--temperature"):
        parser.add_argument(option)
    for args, said in ((["--num_sample=2"], "did you mean --num_samples?"),
                       (["--temp=0.5"], "did you mean --temperature?"),  # an abbreviation, however short
                       (["--prompt=hi"], "the options are --rundir, --start, --num_samples, --steps, --temperature")):
        with pytest.raises(MidgptError) as info:
            parser.parse_args(args)
        assert str(info.value) == f"unrecognized arguments: {args[0]}; {said} (see python sample.py --help)"
    # A prefix is no option: in a benchmark it read as --steps, in launch.py as a config typo.
    assert parser.parse_known_args(["--step=5"])[1] == ["--step=5"]
    # As close to two options as to one: both named.
    parser = ArgumentParser(prog="prepare.py")
    parser.add_argument("--dataset")
    parser.add_argument("--data_files")
    with pytest.raises(MidgptError) as info:
        parser.parse_args(["--data=x"])
    assert str(info.value) == ("unrecognized arguments: --data=x; did you mean --dataset or --data_files? "
                               "(see python prepare.py --help)")


def test_a_typo_of_a_required_option_is_named_not_only_the_option_missing():
    from midgpt.cli import ArgumentParser

    parser = ArgumentParser(prog="sample.py")
    parser.add_argument("--rundir", required=True)
    parser.add_argument("--seed")
    with pytest.raises(MidgptError) as info:  # was "the following arguments are required: --rundir"
        parser.parse_args(["--seed=1", "--rundri=runs/a"])
    assert str(info.value) == "unrecognized arguments: --rundri; did you mean --rundir? (see python sample.py --help)"
    with pytest.raises(MidgptError) as info:  # a flag like none that is missing: missing is what is wrong
        parser.parse_args(["--prompt=hi"])
    assert str(info.value) == "the following arguments are required: --rundir (see python sample.py --help)"


def test_a_bare_flag_that_is_no_field_is_an_unknown_argument_not_a_malformed_override(config):
    with pytest.raises(MidgptError) as info:  # launch.py's, given to a benchmark: "e.g. --debug=VALUE" misled
        apply_overrides(config, ["--debug"], ["steps"])
    assert str(info.value).startswith("unknown argument --debug; known fields: data_dir, ")
    with pytest.raises(MidgptError) as info:
        apply_overrides(config, ["--max_step"])
    assert str(info.value) == "unknown argument --max_step; did you mean 'max_steps'?"


def test_unknown_field_without_close_match_lists_known_fields(config):
    with pytest.raises(MidgptError) as info:
        apply_overrides(config, ["--zzzz=1"])
    message = str(info.value)
    assert "'zzzz'" in message and "model.n_layer" in message and "max_steps" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "arg, field, expected",
    [("--model.n_layer=1.5", "model.n_layer", "int"), ("--max_steps=ten", "max_steps", "int"),
     ("--learning_rate=fast", "learning_rate", "float")],
)
def test_wrong_type_error_names_field_expected_type_and_value(config, arg, field, expected):
    with pytest.raises(MidgptError) as info:
        apply_overrides(config, [arg])
    message = str(info.value)
    assert f"'{field}'" in message and expected in message and repr(arg.partition("=")[2]) in message
    assert "\n" not in message


@pytest.mark.parametrize("arg, example", [("max_steps=3", "--model.n_layer=2"), ("-max_steps=3", "--model.n_layer=2"),
                                          ("--max_steps", "--max_steps=VALUE"),  # from "--max_steps 100"
                                          ("--model.n_layer 2", "--model.n_layer=VALUE"), ("--", "--model.n_layer=2")])
def test_malformed_override_is_one_line_error(config, arg, example):
    with pytest.raises(MidgptError, match="malformed override") as info:
        apply_overrides(config, [arg])
    assert "\n" not in str(info.value) and f"e.g. {example}" in str(info.value)


@pytest.mark.parametrize("arg", ["--model=3", "--model"])  # alone, it was told "e.g. --model=VALUE"
def test_setting_a_nested_config_itself_is_an_error(config, arg):
    with pytest.raises(MidgptError) as info:
        apply_overrides(config, [arg])
    assert str(info.value) == "config field 'model' is a group; set its fields, e.g. --model.FIELD=VALUE"


@pytest.mark.parametrize("text", ["2,4", "(2,4)", "2,-1"])
def test_mesh_shape_override_is_a_pair_of_ints(config, text):
    new = apply_overrides(config, [f"--mesh_shape={text}"])
    assert new.mesh_shape == tuple(int(v) for v in text.strip("()").split(","))


@pytest.mark.parametrize("text", ["8", "2,4,1", "a,b", "2.5,4"])
def test_bad_mesh_shape_is_one_line_error_naming_the_field(config, text):
    with pytest.raises(MidgptError, match="'mesh_shape' expects 2 comma-separated ints"):
        apply_overrides(config, [f"--mesh_shape={text}"])


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare_char_cpu", "openwebtext_xl"])
def test_config_survives_json_round_trip(name):
    config = apply_overrides(load_config(name), ["--model.n_layer=2", "--learning_rate=3e-4", "--mesh_shape=2,-1"])
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_config_from_dict_names_unknown_keys(config):
    d = config_to_dict(config)
    d["bogus"] = 1
    d["also_bogus"] = 2
    with pytest.raises(MidgptError, match="also_bogus, bogus"):
        config_from_dict(d)
    d = config_to_dict(config)
    d["model"]["n_layers"] = 2
    with pytest.raises(MidgptError, match="model.n_layers"):
        config_from_dict(d)


def test_config_from_dict_rejects_missing_keys_and_wrong_types(config):
    d = config_to_dict(config)
    del d["model"]["vocab_size"]
    with pytest.raises(MidgptError, match="model.vocab_size"):
        config_from_dict(d)
    d = config_to_dict(config)
    del d["lr_decay_steps"]  # it has a default, but a resume with it would be another schedule, silently
    with pytest.raises(MidgptError, match="missing config keys: lr_decay_steps"):
        config_from_dict(d)
    d = config_to_dict(config)
    d["model"]["n_layer"] = "6"
    with pytest.raises(MidgptError, match="model.n_layer.*int"):
        config_from_dict(d)
    d = config_to_dict(config)
    d["learning_rate"] = 10**400  # a hand edit: float() raised OverflowError
    with pytest.raises(MidgptError,
                       match="'learning_rate' expects float, got an integer of 401 digits, past any float"):
        config_from_dict(d)


def test_named_configs_load_as_frozen_configs():
    full, cpu = load_config("shakespeare_char"), load_config("shakespeare_char_cpu")
    for config in (full, cpu):
        assert isinstance(config, Config) and isinstance(config.model, ModelConfig)
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.max_steps = 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.model.n_layer = 1
    assert full.model == ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2,
                                     remat="none", scan_unroll=6)
    assert cpu.model == ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                                    remat=cpu.model.remat, scan_unroll=cpu.model.scan_unroll)  # by processor: below
    # The CPU config differs from the full one only where the laptop needs it to.
    differing = {k for k, v in config_to_dict(cpu).items() if config_to_dict(full)[k] != v}
    assert differing == {"name", "model", "batch_size", "max_steps", "lr_decay_steps", "eval_iters", "steps_per_call"}
    assert (full.name, cpu.name) == ("shakespeare_char", "shakespeare_char_cpu")  # as config.json records them
    assert (cpu.batch_size, cpu.max_steps, cpu.lr_decay_steps, cpu.eval_iters,
            cpu.compute_dtype) == (12, 2000, 2000, 50, "auto")


@pytest.mark.parametrize("flags, remat, unroll", [
    ("avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", "full", 2),
    ("avx2 fma avx512f avx512_bf16", "none", 4),
    ("avx2 fma", "none", 4),
    ("", "none", 4),
], ids=["Intel Xeon AMX", "AMD EPYC Zen 4", "AMD EPYC Zen 3", "no flags"])
def test_shakespeare_char_cpu_recomputes_its_layers_only_where_amx_multiplies(flags, remat, unroll, monkeypatch):
    monkeypatch.setattr("midgpt.cpu.info", lambda: f"flags\t\t: fpu {flags}\n")  # what the config module reads
    # A copy of the module, run afresh: the one imported stays as this machine's processor made it.
    path = pathlib.Path(configs.__file__).parent / "shakespeare_char_cpu.py"
    spec = importlib.util.spec_from_file_location("shakespeare_char_cpu_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.config.model.remat, module.config.model.scan_unroll) == (remat, unroll)
    assert dataclasses.replace(module.config.model, remat="full", scan_unroll=1) == dataclasses.replace(
        load_config("shakespeare_char_cpu").model, remat="full", scan_unroll=1)


def test_named_configs_load_without_importing_jax():
    # launch.py and sample.py import JAX only once the arguments are good: a typo is refused at once.
    code = ("import sys\nfrom midgpt.config import config_names, load_config\n"
            "[load_config(name) for name in config_names()]\nprint('jax' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr


CPU = "from midgpt.configs.shakespeare_char_cpu import config as cpu\nimport dataclasses\n"


def test_a_config_file_may_give_a_list_where_a_tuple_goes(tmp_path, monkeypatch):
    # Read as config.json reads it back: it was refused as "each group of the config must be its dataclass".
    import midgpt.configs
    monkeypatch.setattr(midgpt.configs, "__path__", [*midgpt.configs.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "midgpt.configs.mine", raising=False)
    (tmp_path / "mine.py").write_text(CPU + "config = dataclasses.replace(cpu, mesh_shape=[2, -1])\n")
    assert load_config("mine") == dataclasses.replace(load_config("shakespeare_char_cpu"), name="mine",
                                                      mesh_shape=(2, -1))


@pytest.mark.parametrize("body, fragment", [
    # It trained, and wrote "n_layer": 2.0 to config.json, which the resume then refused as an edit.
    (CPU + "config = dataclasses.replace(cpu, model=dataclasses.replace(cpu.model, n_layer=2.0))",
     "mine.py: config field 'model.n_layer' expects int, got 2.0"),
    (CPU + "config = dataclasses.replace(cpu, max_step=30)",  # tracebacks, all of these
     "mine.py, line 3: TypeError: Config.__init__() got an unexpected keyword argument 'max_step'; did you mean "
     "'max_steps'?"),
    (CPU + "config = dataclasses.replace(cpu, model=dataclasses.asdict(cpu.model))",
     "mine.py: each group of the config must be its dataclass (model=ModelConfig(...)), not a dict"),
    # Not told of the fields it left to their defaults, as config.json would be.
    (CPU + "config = dataclasses.replace(cpu, model=dict(vocab_size=65, block_size=64, n_layer=1, n_head=4, "
           "n_embd=128))",
     "mine.py: each group of the config must be its dataclass (model=ModelConfig(...)), not a dict"),
    ("config = {'max_steps': 3}", "mine.py must define `config`, a midgpt.config.Config, not a dict"),
    ("cfg = None", "mine.py must define `config`, a midgpt.config.Config"),
    ("config = (", "mine.py, line 1: SyntaxError: '(' was never closed"),
])
def test_a_config_file_with_a_mistake_is_refused_in_one_line_naming_it(tmp_path, monkeypatch, body, fragment):
    import midgpt.configs
    monkeypatch.setattr(midgpt.configs, "__path__", [*midgpt.configs.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "midgpt.configs.mine", raising=False)
    (tmp_path / "mine.py").write_text(body + "\n")
    with pytest.raises(MidgptError) as info:
        load_config("mine")
    assert str(info.value) == f"{tmp_path}/{fragment}"


@pytest.mark.parametrize("override, fragment", [
    ("--grad_clip=-1", "'grad_clip' must be 0 or more"),  # a negative norm limit would reverse the updates
    ("--weight_decay=-0.1", "'weight_decay' must be 0 or more"),
    ("--learning_rate=nan", "'learning_rate' must be a finite number"),  # nan <= 0 is False
    ("--model.dropout=nan", "'model.dropout' must be a finite number"),
    ("--min_lr=1", "min_lr=1.0 must be in [0, learning_rate=0.001]"),
    ("--min_lr=-1e-4", "min_lr=-0.0001 must be in"),
    ("--lr_decay_steps=1", "lr_decay_steps=1 must be at least 2"),  # warmup takes one update, the decay one more
    ("--lr_decay_steps=10", "warmup_steps=100 must be in [0, lr_decay_steps=10): lower --warmup_steps or raise "
                            "--lr_decay_steps"),
    ("--beta2=1.5", "'beta2' must be in [0, 1)"),
    ("--beta1=1", "'beta1' must be in [0, 1)"),
    ("--model.rope_base=0", "'model.rope_base' must be positive"),
    ("--data_dir=", "'data_dir' is empty"),
    ("--seed=4294967295", "'seed' must be in [0, 2**32 - 1)"),  # jax.random.key(seed + 1) keeps 32 bits
    # The schedule's counts enter the jitted step as int32: 2**31 was a traceback from optax.
    ("--warmup_steps=2147483648", "'warmup_steps' must be below 2**30 (steps are counted in int32)"),
    ("--max_steps=1073741824", "'max_steps' must be below 2**30"),
    ("--lr_decay_steps=1073741824", "'lr_decay_steps' must be below 2**30"),
    # Past int64, an OverflowError of numpy's as the memory plan traced the step.
    ("--model.n_embd=1000000000000000000000", "'model.n_embd' must be below 2**31 (a dimension of the model's "
                                              "arrays), got 1000000000000000000000"),
    # weight_decay / learning_rate overflowed float32, and every weight turned NaN.
    ("--learning_rate=1e-300", "learning_rate=1e-300 with weight_decay=0.0001 is beyond float32"),
    ("--learning_rate=1e39", "learning_rate=1e+39 with weight_decay=0.0001 is beyond float32, in which the "
                             "optimiser runs; lower --learning_rate"),  # it trained, to NaN
    # Not multiplied by the learning rate: 1 zeroed the decayed weights each step, at a uniform guess's loss, exit 0.
    ("--weight_decay=1", "weight_decay=1.0 must be below 1: the decay is not multiplied by the learning rate"),
    # Masks are drawn in steps of 1/256: 0.999 would keep every element and divide it by 0, 0.001 drop none.
    ("--model.dropout=0.999", "'model.dropout' must be 0 or from 1/256 to 255/256"),
    ("--model.dropout=0.001", "'model.dropout' must be 0 or from 1/256 to 255/256"),
    ("--model.dropout=-0.5", "'model.dropout' must be 0 or from 1/256 to 255/256"),
    ("--param_dtype=bfloat16", "'param_dtype' must be float32"),  # weight decay would round away
    # The memory plan's search for a batch that fits tried every divisor of 10**20: hours.
    ("--batch_size=100000000000000000000", "g_accum_iters x batch_size x model.block_size is 6,400,000,000,"),
    ("--batch_size=20000000", "eval_iters x batch_size x model.block_size is 64,000,000,000 tokens at once"),
    ("--mesh_shape=0,4", "mesh_shape=0,4 needs positive sizes"),  # 0,-1 was a ZeroDivisionError in make_mesh
    ("--beta1=-0.5", "'beta1' must be in [0, 1)"),  # a negative momentum trained, silently
    # 1 in float32: beta2's bias correction divided by 0, and a run with no update finished, exit 0; beta1's
    # first update was inf, "lower --learning_rate".
    ("--beta2=0.99999999999", "beta2=0.99999999999 is 1 in float32, in which the optimiser runs; use at most "
                              "0.9999999403953552"),
    ("--beta1=0.99999999999", "beta1=0.99999999999 is 1 in float32"),
    # 0 in float32, at the warmup's first step or as a clip: no update, exit 0.
    ("--learning_rate=1e-37 --weight_decay=0 --min_lr=0", "learning_rate=1e-37 over warmup_steps=100 starts at "
                                                          "1e-39, 0 in float32"),
    ("--grad_clip=1e-45", "grad_clip=1e-45 is 0 in float32 and would zero every update; pass --grad_clip=0 for "
                          "no clipping"),
    ("--fsdp_min_size=-1", "'fsdp_min_size' must be 0 or more"),
    # Heads one feature wide: rotary embeddings rotate pairs, and the forward pass failed in a traceback.
    ("--model.n_head=128", "model.n_embd=128 must split into model.n_head=128 heads of even width"),
    ("--model.attention=flash", "'model.attention' must be auto, einsum, xla or cudnn, got 'flash'"),
    # jax.nn.dot_product_attention has no dropout: the model refused it in a traceback.
    ("--model.attention=xla --model.dropout=0.1", "model.attention=xla (jax.nn.dot_product_attention) has no "
                                                 "dropout; set --model.dropout=0 or --model.attention=einsum"),
])
def test_values_that_parse_but_cannot_train_are_refused(config, override, fragment):
    check_config(config)  # the config itself is fine
    with pytest.raises(MidgptError) as info:
        check_config(apply_overrides(config, override.split(" ")))
    assert fragment in str(info.value)


def test_values_at_float32s_edges_are_let_through(config):
    # The largest beta below 1 in float32, the smallest normal rate and clip: each moves the weights.
    check_config(apply_overrides(config, ["--beta1=0.9999999403953552", "--beta2=0.9999999403953552",
                                          "--grad_clip=1.2e-38", "--warmup_steps=0", "--learning_rate=1.2e-38",
                                          "--weight_decay=0", "--min_lr=0"]))


def test_an_override_may_mend_a_value_that_config_json_was_edited_to(config):
    saved = apply_overrides(config, ["--eval_interval=0"])  # a hand edit of a run's config.json
    check_saved_config("run", apply_overrides(saved, ["--eval_interval=100"]), saved)
    with pytest.raises(MidgptError, match="^run/config.json: config field 'eval_interval' must be positive"):
        check_saved_config("run", saved, saved)


@pytest.mark.parametrize("override", ["--model.remat=dots", "--model.scan_unroll=1", "--model.attention=einsum",
                                      "--learning_rate=1e-4", "--max_steps=4000", "--eval_interval=100",
                                      # moved: the data's meta.json is compared
                                      "--data_dir=/scratch/shakespeare_char"])
def test_resume_applies_and_reports_what_runs_the_same_model_on_the_same_data(config, override):
    resumed, changes, kept = resume_config(config, apply_overrides(config, [override]), [override])
    assert resumed == apply_overrides(config, [override])
    assert len(changes) == 1 and changes[0].startswith(override[2:].split("=")[0] + ":")
    assert kept == []


@pytest.mark.parametrize("override", ["--seed=1", "--batch_size=24", "--g_accum_iters=2", "--param_dtype=bfloat16",
                                      "--model.dropout=0.1", "--model.n_layer=2"])
def test_resume_refuses_another_model_or_other_batches(config, override):
    with pytest.raises(MidgptError, match=re.escape(override[2:].split("=")[0]) + ".*new --rundir"):
        resume_config(config, apply_overrides(config, [override]), [override])


def test_resume_keeps_the_saved_run_where_the_named_config_differs_unless_an_override_changes_it(config):
    saved = apply_overrides(config, ["--model.n_layer=2", "--max_steps=40"])  # the config's defaults changed since
    resumed, changes, kept = resume_config(saved, config, [])
    assert resumed == saved and changes == []
    assert kept == [f"model.n_layer=2 (config: {config.model.n_layer})", f"max_steps=40 (config: {config.max_steps})"]
    resumed, changes, kept = resume_config(saved, apply_overrides(config, ["--max_steps=60"]), ["--max_steps=60"])
    assert resumed == apply_overrides(saved, ["--max_steps=60"]) and changes == ["max_steps: 40 -> 60"]
    assert kept == [f"model.n_layer=2 (config: {config.model.n_layer})"]
    with pytest.raises(MidgptError, match="model.n_layer=2 but this command asks for 3"):
        resume_config(saved, apply_overrides(config, ["--model.n_layer=3"]), ["--model.n_layer=3"])


def test_resume_refuses_another_named_config_but_names_a_run_whose_config_has_none_or_is_gone(config):
    other = load_config("shakespeare_char")
    with pytest.raises(MidgptError, match="started with --config=shakespeare_char_cpu, not shakespeare_char; "
                                          "resume it with --config=shakespeare_char_cpu"):
        resume_config(config, other, [])
    unnamed = json.loads(json.dumps(config_to_dict(config)))  # as a run saved before configs had names
    del unnamed["name"]
    resumed, changes, kept = resume_config(config_from_dict(unnamed), other, [])
    assert resumed == dataclasses.replace(config, name="shakespeare_char") and kept
    assert changes == ["name: '' -> 'shakespeare_char'"]
    # Its config renamed since: the advice to resume with --config=old_name could not be followed.
    resumed, changes, kept = resume_config(dataclasses.replace(config, name="old_name"), other, [])
    assert resumed == dataclasses.replace(config, name="shakespeare_char")
    assert changes == ["name: 'old_name' -> 'shakespeare_char'"]
    with pytest.raises(MidgptError, match="'name' is the --config a run came from"):
        apply_overrides(config, ["--name=mine"])
    with pytest.raises(MidgptError) as info:  # a typo is not offered the field that cannot be set
        apply_overrides(config, ["--nam=mine"])
    assert "'name'" not in str(info.value)


def test_a_path_from_home_is_expanded_where_the_shell_leaves_it(config):
    # --data_dir=~/data reaches us with its ~: the advice to prepare into it made a folder named "~".
    assert apply_overrides(config, ["--data_dir=~/data"]).data_dir == os.path.expanduser("~/data")


def test_unknown_config_name_lists_available_ones():
    with pytest.raises(MidgptError) as info:
        load_config("shakespeare_chr")
    message = str(info.value)
    assert "'shakespeare_chr'" in message and "did you mean" in message
    assert "shakespeare_char" in message and "shakespeare_char_cpu" in message
    assert "\n" not in message


@pytest.mark.skipif(not (REPO_ROOT / "launch.py").exists(), reason="launch.py not written yet")
def test_launch_with_misspelled_field_fails_in_one_line_before_creating_rundir(tmp_path):
    rundir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "launch.py", "--config=shakespeare_char_cpu", "--model.n_layers=2", f"--rundir={rundir}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.n_layer" in lines[0], result.stderr
    assert not rundir.exists()


def test_a_folder_of_runs_names_its_newest_run_not_the_alphabetically_last(tmp_path):
    for name, age_s in (("a", 0), ("b", 3600)):  # b, last by name, last saved an hour ago
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
        then = os.path.getmtime(tmp_path / name / "checkpoints") - age_s
        os.utime(tmp_path / name / "checkpoints", (then, then))
    (tmp_path / "notes").mkdir()  # no run
    assert runs_near(str(tmp_path)) == f"{tmp_path} holds runs: pass one, e.g. the newest, --rundir={tmp_path / 'a'}"


def test_a_folder_of_runs_names_a_run_with_a_checkpoint_over_a_newer_one_without(tmp_path):
    # sample.py named the newest, a --debug run, which it then refused: "no finished checkpoint yet".
    for name, age_s, steps in (("debug", 0, []), ("trained", 3600, ["500"])):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        for step in steps:
            (tmp_path / name / "checkpoints" / step).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        then = os.path.getmtime(tmp_path / name / "checkpoints") - age_s
        os.utime(tmp_path / name / "checkpoints", (then, then))
    expected = f"{tmp_path} holds runs: pass one, e.g. the newest with a checkpoint, --rundir={tmp_path / 'trained'}"
    assert runs_near(str(tmp_path)) == expected


def test_a_folder_with_some_other_programs_config_json_is_no_run(tmp_path):
    # Not a run without checkpoints/: a path under such a project was "inside the run" it named, which was refused
    # in turn, and a folder holding one raised a traceback from saved_steps.
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    assert runs_near(str(tmp_path)) is None and runs_near(str(tmp_path / "notes")) is None
    (tmp_path / "other" / "checkpoints").mkdir()
    expected = f"{tmp_path} holds runs: pass one, e.g. the newest, --rundir={tmp_path / 'other'}"
    assert runs_near(str(tmp_path)) == expected


def test_only_folders_named_in_ascii_digits_are_checkpoints(tmp_path):
    # "²" is a digit to str.isdigit, and int() refused it: launch.py and sample.py ended in a traceback.
    for name in ("10", "²", "١٢", "20.tmp", "x"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "config.json").write_text("{}")
    assert saved_steps(str(tmp_path)) == [10]
    assert runs_near(str(tmp_path / "checkpoints" / "10"), with_step=True) == \
        f"{tmp_path / 'checkpoints' / '10'} is inside the run in {tmp_path}: pass --rundir={tmp_path} --step=10"
    assert runs_near(str(tmp_path / "checkpoints" / "²"), with_step=True) == \
        f"{tmp_path / 'checkpoints' / '²'} is inside the run in {tmp_path}: pass --rundir={tmp_path}"


def test_an_edited_config_json_without_a_checkpoint_copy_is_told_to_undo_the_edit(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps({**config_to_dict(config), "max_steps": "lots"}))
    with pytest.raises(MidgptError) as info:
        read_config_json(str(tmp_path))
    assert str(info.value) == (f"{tmp_path}/config.json: config field 'max_steps' expects int, got 'lots'; undo the "
                               "edit, or use the version of midgpt that wrote it")


def test_a_config_given_as_a_path_is_told_to_pass_a_name(tmp_path, monkeypatch):
    # A path was "unknown config" and the list of names: nothing said that a file of one's own must go in configs/.
    import midgpt.configs
    folder = midgpt.configs.__path__[0]
    (tmp_path / "mine.py").write_text("config = None\n")  # a file of one's own, whether it exists or not
    for path in (f"{tmp_path}/mine.py", f"{tmp_path}/no/mine.py", "mine.py"):
        with pytest.raises(MidgptError) as info:
            load_config(path)
        assert (f"--config takes a config's name, not a path: a config of your own is a module in {folder}, "
                f"e.g. {folder}/mine.py for --config=mine") in str(info.value), path
    with pytest.raises(MidgptError) as info:  # a folder: no name to suggest
        load_config(f"{tmp_path}/")
    assert f"e.g. {folder}/NAME.py for --config=NAME" in str(info.value)
    with pytest.raises(MidgptError) as info:  # a bundled config's name, but no file: not taken for it
        load_config(f"{tmp_path}/no/shakespeare_char_cpu.py")
    assert f"e.g. {folder}/my_shakespeare_char_cpu.py for --config=my_shakespeare_char_cpu" in str(info.value)
    monkeypatch.chdir(REPO_ROOT)  # the bundled config's file, as a user in the repository would name it
    with pytest.raises(MidgptError) as info:
        load_config("src/midgpt/configs/shakespeare_char_cpu.py")
    assert "--config takes a config's name, not its file: --config=shakespeare_char_cpu" in str(info.value)
    # An edited copy under a bundled config's name: that name would run the original, not the edits
    edited = tmp_path / "shakespeare_char_cpu.py"
    edited.write_text((REPO_ROOT / "src/midgpt/configs/shakespeare_char_cpu.py").read_text() + "# edited\n")
    with pytest.raises(MidgptError) as info:
        load_config(str(edited))
    assert f"e.g. {folder}/my_shakespeare_char_cpu.py for --config=my_shakespeare_char_cpu" in str(info.value)
    # An unedited copy elsewhere runs as the bundled config does: its name is the fix
    shutil.copy(REPO_ROOT / "src/midgpt/configs/shakespeare_char_cpu.py", edited)
    with pytest.raises(MidgptError) as info:
        load_config(str(edited))
    assert "--config takes a config's name, not its file: --config=shakespeare_char_cpu" in str(info.value)
