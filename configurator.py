"""
Config overrides for the scripts, as an importable, tested function (not nanoGPT's exec of this file).

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Positional arguments are config files: plain Python executed in a scratch namespace, whose top-level
names override the script's defaults. `--key=value` arguments override the same way; the value is read
as a Python literal when it parses as one (32, 3e-4, False, None, 'x') and as a plain string otherwise.
Everything applies in the order given, so later arguments win. Unknown keys are errors that name the
closest known key, and values must keep the default's type (an int is fine where a float is expected;
a default of None or 'auto' takes anything, and the script checks it when it resolves it).

A config file runs the way Python runs a script, with its own folder first on the import path, so a
recipe that varies another starts from it by importing it, then sets what differs:

    from train_shakespeare_char_cpu import *  # the quick start's values
    time_budget = 17.0
"""
import ast
import builtins
import difflib
import glob
import os
import types

from nanoforge.errors import UserError


def _unknown_key(key, known, where):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
    return UserError(f"unknown config key '{key}' in {where}{hint}")


def _check_type(key, value, default, where):
    if default is None or default == "auto":
        return value
    if isinstance(default, bool):  # bool before int: True is an int in Python
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, type(default)):
        return value
    raise UserError(f"config key '{key}' in {where} expects {type(default).__name__} "
                    f"(default {default!r}), got {value!r}")


def parse_value(text):
    """'3e-4' -> 0.0003, 'False' -> False, 'None' -> None, 'gpt2' -> 'gpt2'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def configure(defaults, argv, script=None, given=None):
    """Returns a new dict: `defaults` with the config files and --key=value arguments in argv applied.
    --help (or -h) prints the script's knobs instead and exits (script: its path, default the running one).
    given: a set that receives every key a config file or argument set, even to its default's value."""
    if "--help" in argv or "-h" in argv:
        import __main__
        print(help_text(script or getattr(__main__, "__file__", ""), defaults))
        raise SystemExit(0)
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg and isinstance(defaults.get(arg[2:]), bool):
                arg += "=True"  # a bare --flag turns a boolean on (sample.py --chat)
            if "=" not in arg:
                raise UserError(f"argument '{arg}' needs a value: write --key=value")
            key, text = arg[2:].split("=", 1)  # split on the first '=' only: --start="a=b" stays whole
            where = f"argument '{arg}'"
            if key not in defaults:
                raise _unknown_key(key, defaults, where)
            value = parse_value(text)
            if isinstance(defaults[key], str) and defaults[key] != "auto" and not isinstance(value, str):
                value = text  # a string knob takes the text as written: --clients=16 is "16", not 16
            config[key] = _check_type(key, value, defaults[key], where)
            if given is not None:
                given.add(key)
        else:
            if not os.path.isfile(arg):
                raise UserError(f"config file '{arg}' not found (positional arguments are config files; "
                                f"overrides are written --key=value)")
            scope = run_config_file(arg)
            for key, value in scope.items():
                # imports and helpers (import math, from math import sqrt, def f) are not config keys
                if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType,
                                                             types.BuiltinFunctionType, type)):
                    continue
                if key not in defaults:
                    raise _unknown_key(key, defaults, f"config file '{arg}'")
                config[key] = _check_type(key, value, defaults[key], f"config file '{arg}'")
                if given is not None:
                    given.add(key)
    return config


def run_config_file(path):
    """Executes a config file in a new namespace and returns the namespace. A config may start from another
    in its folder as Python would import it, `from train_shakespeare_char_cpu import *`: such an import of a
    sibling file runs that file here the same way (read fresh each time, never a cached module); every other
    import is Python's own."""
    folder = os.path.dirname(os.path.abspath(path))

    def config_import(name, globals=None, locals=None, fromlist=(), level=0):
        sibling = os.path.join(folder, name + ".py")
        if level == 0 and os.path.isfile(sibling):
            base = types.ModuleType(name)
            base.__dict__.update({k: v for k, v in run_config_file(sibling).items() if not k.startswith("__")})
            return base
        return builtins.__import__(name, globals, locals, fromlist, level)

    with open(path) as f:
        code = compile(f.read(), path, "exec")
    scope = {"__builtins__": dict(vars(builtins), __import__=config_import)}
    exec(code, scope)  # a config file is plain Python, run in its own namespace
    return scope


def conditional_overrides(defaults, argv, text, where):
    """A recipe's values for a condition known only once the script runs (train.py's float32_overrides):
    `text`'s --key=value pairs, checked as the command line's are, without the keys argv's own --key=value
    arguments set, which still win. Returns {key: value}."""
    args = text.split()
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"{where} holds '{arg}'; write --key=value pairs separated by spaces")
    values = configure(defaults, args)
    given = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return {key: values[key] for key in (arg[2:].split("=", 1)[0] for arg in args) if key not in given}


def check_ranges(config, rules):
    """Knobs with a valid range, checked before anything runs. rules: {key: (predicate, what it expects)},
    e.g. {"batch_size": (lambda v: v >= 1, "an int >= 1")}; the first key out of range is a UserError."""
    for key, (ok, expects) in rules.items():
        if key in config and not ok(config[key]):
            raise UserError(f"config key '{key}' expects {expects}; got {config[key]!r}")


POSITIVE_INT = (lambda v: v >= 1, "an int >= 1")
NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
FRACTION = (lambda v: 0 <= v < 1, "a number in [0, 1)")


KNOB_TYPES = (int, float, bool, str)


def knobs(namespace, types=KNOB_TYPES):
    """A script's config defaults: its top-level names that hold plain values (int, float, bool, str; a
    sweep adds dict and list), except those starting with '_'. A script calls knobs(globals()) right after
    its config block."""
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, types)}


def overrides(defaults, config):
    """The keys whose values differ from the defaults, for printing what a run changed."""
    return {k: v for k, v in config.items() if defaults.get(k) != v}


def check_key(key, known, where):
    """Raises the unknown-key error (with its "did you mean") if `key` is not in `known`."""
    if key not in known:
        raise _unknown_key(key, known, where)


def script_defaults(path):
    """A script's config defaults, read without running it (a script must not import another): the
    top-level `name = <constant>` assignments (int, float, bool, str) before its `defaults = ...` line."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name == "defaults":
            break
        # literals and arithmetic on them (gradient_accumulation_steps = 5 * 8); nothing that calls or reads
        if not all(isinstance(n, (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop))
                   for n in ast.walk(node.value)):
            continue
        value = eval(compile(ast.Expression(node.value), path, "eval"), {"__builtins__": {}})
        if isinstance(value, KNOB_TYPES) and not name.startswith("_"):
            found[name] = value
    return found


def help_text(script, defaults):
    """A script's --help: its docstring's first paragraph, each knob with its default and the comment
    written beside it in the script's config block (section comments kept as headings), and the config
    files in config/ whose every key the script knows."""
    lines, doc = [], ""
    if script and os.path.isfile(script):
        with open(script, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
        doc = (ast.get_docstring(tree) or "").strip().split("\n\n")[0]
        text = source.splitlines()
        after_knob = after_header = False  # a comment line right after a long knob line continues its comment
        for line in text[:next((i for i, t in enumerate(text) if t.startswith("defaults = ")), len(text))]:
            name, eq, rest = line.partition("=")
            name = name.strip()
            if eq and name in defaults and not line.startswith((" ", "\t")):
                comment = rest.split("  # ", 1)[1].strip() if "  # " in rest else ""
                lines.append(f"  --{name}={defaults[name]!r}" + (f"  {comment}" if comment else ""))
                after_knob = len(line) > 100  # a long comment wrapped onto the next line
            elif line.startswith("# ") and not line.startswith("# ---"):
                if after_knob:
                    lines[-1] += " " + line[2:].strip()
                elif after_header:  # a heading wrapped onto a second line
                    lines[-1] = lines[-1][:-1] + " " + line[2:].strip().rstrip(":") + ":"
                else:
                    lines.append(line[2:].strip().rstrip(":") + ":")
                after_header = not after_knob and len(line) > 100
                continue
            else:
                after_knob = False
            after_header = False
    if not any(line.startswith("  --") for line in lines):
        lines = [f"  --{k}={v!r}" for k, v in sorted(defaults.items())]
    name = os.path.basename(script) if script else "this script"
    out = [doc, "", f"usage: python {name} [config/FILE.py ...] [--key=value ...]", "", "knobs (default, then what it does):"]
    out += lines
    fits = matching_configs(os.path.join(os.path.dirname(os.path.abspath(script or ".")), "config"), defaults,
                            os.path.abspath(script) if script else None)
    if fits:
        out += ["", "config files for it: " + ", ".join(fits)]
    return "\n".join(out).strip("\n")


def matching_configs(folder, defaults, script=None):
    """Config files in `folder` whose top-level names are all keys of `defaults`: the ones a script accepts.
    With `script` (its path), also only those named for it: a config's name starts with the name of the
    script that takes it (config/train_gpt2.py is train.py's), the longest such script name in the script's
    folder deciding (train_tokenizer_x.py would be train_tokenizer.py's)."""
    stems = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(os.path.dirname(script), "*.py"))} \
        if script else set()
    found = []
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
        name = os.path.basename(path)[:-3]
        owner = max((s for s in stems if name.startswith(s + "_")), key=len, default=None)
        if owner is not None and owner != os.path.basename(script)[:-3]:
            continue
        names = _config_names(path)
        if names and names <= defaults.keys():
            found.append(os.path.join("config", os.path.basename(path)))
    return found


def _config_names(path, seen=()):
    """The keys a config file sets, read without running it: its top-level assignments and those of the
    config files beside it that it star-imports (its base recipe). None if it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return None
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith("_")}
        elif isinstance(node, ast.ImportFrom) and node.module and any(a.name == "*" for a in node.names):
            base = os.path.join(os.path.dirname(path), node.module.replace(".", os.sep) + ".py")
            if base not in seen and os.path.isfile(base):
                names |= _config_names(base, (*seen, path)) or set()
    return names
