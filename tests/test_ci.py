"""CI must run exactly the README's test command, so what users run is what is checked, and install the
system packages the README tells users to install for it."""
import os
import re

from conftest import ROOT  # noqa: E402


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    block = next(c for c in commands if "pytest" in c).splitlines()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip()]
    test_command = next(line for line in block if "pytest" in line)
    assert test_command.strip() in ci_lines
    for line in block:  # the system packages the README installs first, CI installs too
        if line.startswith("apt-get install"):
            packages = line.split("#")[0].split()[2:]
            ci_apt = next(c for c in ci_lines if "apt-get install" in c)
            assert packages and all(p in ci_apt.split() for p in packages), (packages, ci_apt)
