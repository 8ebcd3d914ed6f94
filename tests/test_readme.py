"""
The README's commands name scripts and config files that exist: a file moved or renamed must not leave
the docs pointing at nothing.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```(?:sh|bash)\n(.*?)```", text, re.S)


def test_every_script_and_config_the_readme_runs_exists():
    blocks = command_blocks()
    assert len(blocks) >= 10  # the README's command blocks were found
    named = set()
    for block in blocks:
        for line in block.splitlines():
            line = line.split("#", 1)[0]  # a comment may mention files that are not commands
            named.update(re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py)\b", line))
    # outputs of earlier commands (a sweep's best config) are not in the repository
    named = {p for p in named if not p.startswith("out")}
    assert {"train.py", "sample.py", "config/train_shakespeare_char_cpu.py", "data/shakespeare_char/prepare.py"} <= named
    missing = sorted(p for p in named if not os.path.isfile(os.path.join(ROOT, p)))
    assert not missing, f"the README runs files that do not exist: {missing}"
