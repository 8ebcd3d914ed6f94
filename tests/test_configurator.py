"""
configurator.configure: defaults < config files < --key=value, in argv order; typos and type mistakes
are one-line UserErrors that say what was meant.
"""
import os
import subprocess
import sys

import pytest

from configurator import configure, overrides, parse_value
from conftest import ROOT
from nanoforge.errors import UserError

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, compile=False, dataset="shakespeare_char",
                device="auto", init_from=None, start="\n")


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_arguments_gives_a_copy_of_the_defaults():
    config = configure(DEFAULTS, [])
    assert config == DEFAULTS and config is not DEFAULTS
    config["batch_size"] = 1
    assert DEFAULTS["batch_size"] == 12


def test_precedence_defaults_then_file_then_cli(tmp_path):
    cfg = write(tmp_path, "batch_size = 32\nlearning_rate = 1e-3\n")
    config = configure(DEFAULTS, [cfg, "--batch_size=64"])
    assert config["batch_size"] == 64  # the command line beats the file
    assert config["learning_rate"] == 1e-3  # the file beats the default
    assert config["dataset"] == "shakespeare_char"  # untouched keys keep their default
    assert overrides(DEFAULTS, config) == {"batch_size": 64, "learning_rate": 1e-3}


def test_arguments_apply_in_argv_order_later_wins(tmp_path):
    cfg = write(tmp_path, "batch_size = 32\n")
    assert configure(DEFAULTS, ["--batch_size=64", cfg])["batch_size"] == 32
    assert configure(DEFAULTS, ["--batch_size=1", "--batch_size=2"])["batch_size"] == 2
    other = write(tmp_path, "batch_size = 8\n", "other.py")
    assert configure(DEFAULTS, [cfg, other])["batch_size"] == 8


def test_config_file_runs_in_its_own_namespace(tmp_path):
    # imports and _private helpers are the file's business, not config keys
    cfg = write(tmp_path, "import math\nimport os.path\n_base = 1e-3\nlearning_rate = _base * math.sqrt(4)\n")
    config = configure(DEFAULTS, [cfg])
    assert config["learning_rate"] == pytest.approx(2e-3)
    assert set(config) == set(DEFAULTS)
    # names from one file do not leak into the next one or into this module
    second = write(tmp_path, "batch_size = 4 if '_base' not in dir() else 999\n", "second.py")
    assert configure(DEFAULTS, [cfg, second])["batch_size"] == 4


def test_config_file_may_import_names_and_define_helpers(tmp_path):
    # from-imports and helpers are not config keys either (they used to be "unknown config key 'sqrt'")
    cfg = write(tmp_path, "from math import sqrt\nfrom os.path import join\nfrom fractions import Fraction\n"
                          "def scaled(x):\n    return x * sqrt(4)\n"
                          "learning_rate = scaled(1e-3)\ndataset = join('a', 'b')\n")
    config = configure(DEFAULTS, [cfg])
    assert config["learning_rate"] == pytest.approx(2e-3) and config["dataset"] == "a/b"
    assert set(config) == set(DEFAULTS)


def test_unknown_key_in_file_names_the_closest_key(tmp_path):
    cfg = write(tmp_path, "batch_sise = 32\n")
    with pytest.raises(UserError, match=r"batch_sise.*did you mean 'batch_size'") as e:
        configure(DEFAULTS, [cfg])
    assert cfg in str(e.value)


def test_unknown_key_on_command_line_names_the_closest_key():
    with pytest.raises(UserError, match=r"batch_sise.*did you mean 'batch_size'"):
        configure(DEFAULTS, ["--batch_sise=32"])
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        configure(DEFAULTS, ["--learning-rate=1e-3"])


def test_unknown_key_with_no_close_match_lists_known_keys():
    with pytest.raises(UserError, match="known keys: .*batch_size"):
        configure(DEFAULTS, ["--zzz=1"])


@pytest.mark.parametrize("arg", ["--batch_size=abc", "--batch_size=3.5", "--batch_size=True",
                                 "--compile=1", "--compile='1'", "--compile=yes", "--learning_rate=fast"])
def test_values_must_keep_the_defaults_type(arg):
    with pytest.raises(UserError, match=f"config key '{arg[2:].split('=')[0]}'.*expects"):
        configure(DEFAULTS, [arg])


def test_a_string_knob_takes_its_text_as_written_on_the_command_line(tmp_path):
    """bench_serve.py --clients=16 is the text '16' (its knob lists levels as text), not the int 16; in a
    config file, Python's own types still hold."""
    assert configure(DEFAULTS, ["--dataset=16"])["dataset"] == "16"
    assert configure(DEFAULTS, ["--dataset=[1, 2]", "--start=3e-4"]) == dict(DEFAULTS, dataset="[1, 2]", start="3e-4")
    assert configure(DEFAULTS, ["--dataset='owt'"])["dataset"] == "owt"  # quoted as Python: still the string
    with pytest.raises(UserError, match="dataset.*expects str"):
        configure(DEFAULTS, [write(tmp_path, "dataset = 1\n")])


def test_type_errors_in_config_file(tmp_path):
    with pytest.raises(UserError, match="compile.*expects bool"):
        configure(DEFAULTS, [write(tmp_path, "compile = '1'\n")])
    with pytest.raises(UserError, match="batch_size.*expects int"):
        configure(DEFAULTS, [write(tmp_path, "batch_size = 12.0\n", "b.py")])


def test_int_is_accepted_for_float_and_converted(tmp_path):
    config = configure(DEFAULTS, ["--learning_rate=1"])
    assert config["learning_rate"] == 1.0 and type(config["learning_rate"]) is float
    config = configure(DEFAULTS, [write(tmp_path, "learning_rate = 2\n")])
    assert type(config["learning_rate"]) is float


def test_bool_values():
    assert configure(DEFAULTS, ["--compile=True"])["compile"] is True
    assert configure(dict(DEFAULTS, compile=True), ["--compile=False"])["compile"] is False


@pytest.mark.parametrize("key", ["device", "init_from"])  # defaults 'auto' and None
@pytest.mark.parametrize("text, value", [("cuda", "cuda"), ("3", 3), ("False", False), ("None", None)])
def test_auto_and_none_defaults_accept_anything(key, text, value):
    assert configure(DEFAULTS, [f"--{key}={text}"])[key] == value


def test_split_on_first_equals_only():
    assert configure(DEFAULTS, ['--start="a=b"'])["start"] == "a=b"  # the shell has removed no quotes here
    assert configure(DEFAULTS, ["--start=a=b=c"])["start"] == "a=b=c"
    assert configure(DEFAULTS, ["--start="])["start"] == ""


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("32", 32), ("False", False), ("None", None),
                                         ("'x'", "x"), ("gpt2", "gpt2"), ("out-dir/run 1", "out-dir/run 1"),
                                         ("[1, 2]", [1, 2])])
def test_parse_value(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(UserError, match="not found"):
        configure(DEFAULTS, [missing])
    # a forgotten '--' reads as a config file name: the message says how overrides are written
    with pytest.raises(UserError, match="--key=value"):
        configure(DEFAULTS, ["batch_size=3"])


def test_bare_flag_turns_a_boolean_on_and_is_an_error_otherwise():
    assert configure(DEFAULTS, ["--compile"])["compile"] is True
    with pytest.raises(UserError, match="needs a value"):
        configure(DEFAULTS, ["--batch_size"])


SCRIPTS = ["train.py", "sample.py", "evaluate.py", "finetune.py", "bench.py", "sweep.py", "export.py", "curate.py",
           "train_tokenizer.py", "bench_time_to_loss.py", "bench_serve.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_knob_with_its_default(script):
    import subprocess
    import sys
    from configurator import script_defaults
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, script), "--help"], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert f"usage: python {os.path.basename(script)}" in proc.stdout
    knobs = script_defaults(os.path.join(root, script))  # a script's config block
    for key, value in knobs.items():
        assert f"  --{key}={value!r}" in proc.stdout, key
    if script == "train.py":  # the comment beside a knob, and the config files that fit
        assert "--eval_iters=200  the fixed eval set is eval_iters * batch_size windows" in proc.stdout
        assert "config/train_shakespeare_char_cpu.py" in proc.stdout and "config/curate_web.py" not in proc.stdout
        # recipes that start from the quick start fit through it
        assert all(f"config/{name}.py" in proc.stdout
                   for name in ("train_shakespeare_char_cpu_sprint", "train_tinystories_cpu"))
    # a config file's name says which script takes it: --help lists only those named for this script
    listed = next((line for line in proc.stdout.splitlines() if line.startswith("config files for it: ")), "")
    for name in listed.split(": ", 1)[-1].split(", ") if listed else []:
        assert name.startswith(f"config/{os.path.basename(script)[:-3]}_"), name


def test_configurator_and_user_error_load_without_torch():
    """The config layer is light: parsing --help or a typo must not wait for torch to import."""
    code = ("import sys, configurator; from nanoforge.errors import UserError; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_config_file_starts_from_another_by_importing_it(tmp_path):
    # a config runs with its folder first on the import path, as `python cfg.py` would: a recipe that varies
    # another imports it and sets what differs
    write(tmp_path, "import math\nbatch_size = 32\nlearning_rate = 1e-3 * math.sqrt(4)\n_private = 1\n", "base.py")
    child = write(tmp_path, "from base import *  # noqa: F403\nbatch_size = 8\n", "child.py")
    config = configure(DEFAULTS, [child, "--dataset=x"])
    assert (config["batch_size"], config["learning_rate"], config["dataset"]) == (8, pytest.approx(2e-3), "x")
    assert str(tmp_path) not in sys.path and "base" not in sys.modules  # nothing stays behind
    # the base is read fresh each time, never a module cached from an earlier read
    write(tmp_path, "batch_size = 32\nlearning_rate = 5e-4\n", "base.py")
    assert configure(DEFAULTS, [child])["learning_rate"] == 5e-4
    # a base's unknown key is an error that names the file being loaded
    write(tmp_path, "batch_sise = 32\n", "base.py")
    with pytest.raises(UserError, match="unknown config key 'batch_sise' in config file .*child.py.*batch_size"):
        configure(DEFAULTS, [child])


def test_matching_configs_follow_a_base_import(tmp_path):
    from configurator import matching_configs
    write(tmp_path, "batch_size = 32\ndevice = 'cpu'\n", "base.py")
    write(tmp_path, "from base import *  # noqa: F403\nbatch_size = 8\n", "child.py")
    assert matching_configs(str(tmp_path), DEFAULTS) == ["config/base.py", "config/child.py"]
    assert matching_configs(str(tmp_path), {"batch_size": 1}) == []  # the child sets device too, through its base


def test_matching_configs_named_for_another_script_are_not_listed(tmp_path):
    from configurator import matching_configs
    for script in ("train.py", "train_tokenizer.py", "finetune.py"):
        (tmp_path / script).write_text("")
    (tmp_path / "config").mkdir()
    for name in ("train_a", "train_tokenizer_b", "finetune_c", "recipe_d"):  # all fit the keys
        write(tmp_path / "config", "batch_size = 2\n", f"{name}.py")
    folder = str(tmp_path / "config")
    assert matching_configs(folder, DEFAULTS, str(tmp_path / "train.py")) == ["config/recipe_d.py", "config/train_a.py"]
    assert matching_configs(folder, DEFAULTS, str(tmp_path / "train_tokenizer.py")) == [
        "config/recipe_d.py", "config/train_tokenizer_b.py"]
    assert len(matching_configs(folder, DEFAULTS)) == 4  # no script: the keys alone decide


def test_conditional_overrides_are_checked_and_yield_to_the_command_line():
    from configurator import conditional_overrides
    assert conditional_overrides(DEFAULTS, [], "--batch_size=2 --compile=True", "x") == {"batch_size": 2,
                                                                                         "compile": True}
    # a key the command line sets keeps the command line's value; a config file's does not count
    assert conditional_overrides(DEFAULTS, ["cfg.py", "--batch_size=5"], "--batch_size=2 --compile=True",
                                 "x") == {"compile": True}
    with pytest.raises(UserError, match="unknown config key 'batch_sise'.*batch_size"):
        conditional_overrides(DEFAULTS, [], "--batch_sise=2", "x")
    with pytest.raises(UserError, match="expects int"):
        conditional_overrides(DEFAULTS, [], "--batch_size=two", "x")
    with pytest.raises(UserError, match="float32_overrides holds 'batch_size=2'; write --key=value"):
        conditional_overrides(DEFAULTS, [], "batch_size=2", "float32_overrides")


# what each CPU recipe resolved to before the sprint and TinyStories configs started from the quick start's
# (the keys that differ from train.py's defaults; the sprint's fp32 shape is its float32_overrides)
QUICK_START = dict(
    batch_size=16, beta2=0.99, block_size=128, dataset='shakespeare_char', device='cpu', eval_interval=500,
    eval_iters=50, gradient_accumulation_steps=1, learning_rate=0.004, log_interval=50, lr_clock='time',
    lr_decay_iters=1000000, max_iters=1000000, min_lr=0.0, mlp='relu2', n_embd=192, n_head=3, n_layer=4,
    norm='rmsnorm', optimizer_name='muon', out_dir='out-shakespeare-char-cpu', pos_emb='rope', qk_norm=True,
    time_budget=300.0, warmup_iters=20)
SPRINT = dict(
    batch_size=16, beta2=0.99, block_size=64, compile=False, dataset='shakespeare_char', device='cpu',
    eval_interval=100000, eval_iters=50, gradient_accumulation_steps=1, learning_rate=0.004, log_interval=50,
    lr_clock='time', lr_decay_iters=1000000, max_iters=1000000, min_lr=0.0, mlp='relu2', n_embd=128, n_head=2,
    n_layer=3, norm='rmsnorm', optimizer_name='muon', out_dir='out-shakespeare-char-cpu-sprint', pos_emb='rope',
    qk_norm=True, time_budget=17.0, warmup_iters=20)
TINYSTORIES = dict(
    batch_size=16, beta2=0.99, block_size=128, compile=False, dataset='tinystories', device='cpu', dropout=0.1,
    eval_interval=40, eval_iters=10, gradient_accumulation_steps=1, keep_checkpoints=16, learning_rate=0.002,
    log_interval=10, lr_clock='time', lr_decay_iters=1000000, max_iters=1000000, min_lr=0.0002, n_embd=128,
    n_head=4, n_layer=4, out_dir='out-tinystories-cpu', time_budget=150.0, warmup_iters=50)


@pytest.mark.parametrize("name, expected", [("train_shakespeare_char_cpu.py", QUICK_START),
                                            ("train_shakespeare_char_cpu_sprint.py", SPRINT),
                                            ("train_tinystories_cpu.py", TINYSTORIES)])
def test_cpu_recipes_resolve_as_before_they_shared_the_quick_start(name, expected):
    from configurator import conditional_overrides, script_defaults
    defaults = script_defaults(os.path.join(ROOT, "train.py"))
    config = configure(defaults, [os.path.join(ROOT, "config", name)])
    fp32 = config.pop("float32_overrides")
    assert overrides(defaults, config) == expected
    assert fp32 == ("--n_layer=2 --time_budget=20.0" if expected is SPRINT else "")
    if fp32:  # where bf16 is emulated: 2 layers for 20 s, the rest as in bf16
        config.update(conditional_overrides(defaults, [], fp32, "float32_overrides"))
        assert overrides(defaults, config) == {**SPRINT, "n_layer": 2, "time_budget": 20.0}
