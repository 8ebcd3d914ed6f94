"""
The README's commands name scripts and config files that exist: a file moved or renamed must not leave
the docs pointing at nothing.
"""
import os
import re

from conftest import ROOT  # noqa: E402


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


def test_the_readme_tree_lists_every_file_at_the_top_and_in_the_package():
    """The file tree in the README is the layout: every Python file at the root and in nanoforge/ has its
    line, and every line names a file that exists."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    tree = text[text.index("## The files"):]
    tree = tree[tree.index("```\n") + 4:]
    tree = tree[:tree.index("```")]
    listed, folders = set(), []
    for line in tree.splitlines():
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        folders = folders[:indent // 2]
        if name.endswith("/"):
            folders.append(name)
        elif name.endswith(".py") and "<" not in name:
            listed.add("".join(folders) + name)
    on_disk = {f for f in os.listdir(ROOT) if f.endswith(".py")}
    for sub in ("nanoforge", "nanoforge/curation"):
        on_disk |= {f"{sub}/{f}" for f in os.listdir(os.path.join(ROOT, sub))
                    if f.endswith(".py") and f != "__init__.py"}
    assert listed == on_disk
