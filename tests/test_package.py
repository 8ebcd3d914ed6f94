"""
The package stands on its own: nanoforge/ and data/ import no top-level script (configurator.py included),
nothing edits the import path, and the editable install (pip install -e .) lets any folder import this checkout's
nanoforge, model.py and configurator.py.
"""
import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT  # noqa: E402

SCRIPTS = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))} - {"model"}


def python_files(*folders):
    for folder in folders:
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
            with open(path, encoding="utf-8") as f:
                yield os.path.relpath(path, ROOT), ast.parse(f.read(), path)


def test_the_package_and_data_scripts_import_no_top_level_script():
    assert "configurator" in SCRIPTS and "train" in SCRIPTS  # the scripts were found
    found = []
    for path, tree in python_files("nanoforge", "data"):
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in SCRIPTS]
    assert not found, found


def test_nothing_edits_the_import_path():
    """The editable install and pytest.ini's pythonpath make the modules importable; no file patches the path."""
    found = []
    for path, tree in python_files("."):  # every Python file of the repository, tests and dev/ included
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("insert", "append")
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"):
                found.append(f"{path}:{node.lineno}")
    assert not found, found


def test_this_checkout_imports_from_any_folder(tmp_path):
    code = ("import configurator, model, nanoforge.training\n"
            "print(configurator.__file__, model.__file__, nanoforge.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"not importable outside the repo: pip install -e . first\n{proc.stderr[-1000:]}"
    for path in proc.stdout.split():  # an install of another checkout would run that checkout's code
        assert os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep), (path, "pip install -e . here")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"), "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--tokenizer" in proc.stdout, proc.stderr
