"""CI must run exactly the README's test command, so what users run is what is checked."""
import os
import re

from conftest import ROOT  # noqa: E402


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci_lines = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run")) if line.strip()]
    assert test_command.strip() in ci_lines
