"""
The README and the pages of docs/ name scripts, config files and other pages that exist: a file moved or
renamed must not leave the docs pointing at nothing. The README stays a front page: at most 200 lines.
"""
import glob
import os
import re

from conftest import ROOT  # noqa: E402

# a path to a Python file, not the tail of a longer path or word (`data/*/prepare.py` names no file)
PY_PATH = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py)\b")


def doc_files():
    """README.md first, then every page of docs/, as paths relative to the root."""
    pages = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return ["README.md"] + pages


def read(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def command_blocks(doc="README.md"):
    return re.findall(r"```(?:sh|bash)\n(.*?)```", read(doc), re.S)


def named_in_commands(blocks):
    named = set()
    for block in blocks:
        for line in block.splitlines():
            line = line.split("#", 1)[0]  # a comment may mention files that are not commands
            named.update(PY_PATH.findall(line))
    # outputs of earlier commands (a sweep's best config) are not in the repository
    return {p for p in named if not p.startswith("out")}


def test_every_script_and_config_the_readme_runs_exists():
    blocks = [block for doc in doc_files() for block in command_blocks(doc)]
    assert len(blocks) >= 10  # the command blocks of the README and docs/ were found
    readme_named = named_in_commands(command_blocks("README.md"))
    assert {"train.py", "sample.py", "config/train_shakespeare_char_cpu.py",
            "data/shakespeare_char/prepare.py"} <= readme_named
    missing = []
    for doc in doc_files():
        missing += [f"{doc}: {p}" for p in sorted(named_in_commands(command_blocks(doc)))
                    if not os.path.isfile(os.path.join(ROOT, p))]
    assert not missing, f"the docs run files that do not exist: {missing}"


def test_every_python_file_the_docs_name_in_code_exists():
    """Beyond the commands: a file named in running text (`config/finetune_shop_chat.py`) exists too."""
    missing = []
    for doc in doc_files():
        spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", read(doc), flags=re.S))
        for span in spans:
            for path in PY_PATH.findall(span):
                if path.startswith(("out", "sweep_dir", "tmp")):
                    continue  # a run's outputs
                if not os.path.isfile(os.path.join(ROOT, path)):
                    missing.append(f"{doc}: {path}")
    assert not missing, f"the docs name files that do not exist: {sorted(set(missing))}"


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_the_readme_and_docs_point_at_files():
    broken = []
    for doc in doc_files():
        text = re.sub(r"```.*?```", "", read(doc), flags=re.S)  # a code block's brackets are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
            if not os.path.exists(file):
                broken.append(f"{doc}: {target}")
            elif anchor and file.endswith(".md"):
                with open(file, encoding="utf-8") as f:
                    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", f.read(), flags=re.S), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{doc}: {target} (no such heading)")
    assert not broken, f"links to nothing: {broken}"


def test_the_readme_is_a_front_page():
    """At most 200 lines, none of them past 200 characters: the long form lives in docs/."""
    lines = read("README.md").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 200]
    assert not long, f"README.md lines past 200 characters: {long}"


def test_the_readme_tree_lists_every_file_at_the_top_and_in_the_package():
    """The file tree in the README is the layout: every Python file at the root and in nanoforge/ has its
    line, and every line names a file that exists."""
    text = read("README.md")
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
