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


# what a script does when conftest.run starts it in a fork of the worker's fork server must be what it does
# in a fresh `python`: output, exit code, the one-line error hook, a traceback, atexit handlers, threads
SCRIPTS = {
    "ok": "import sys; print(sys.argv[1:], sys.path[0] == '', __name__); print('to stderr', file=sys.stderr)",
    "user_error": "from nanoforge import errors; errors.friendly_errors()\n"
                  "from nanoforge.errors import UserError\nraise UserError('say what to do')",
    "traceback": "def f():\n    raise ValueError('boom')\nf()",
    "exit_text": "import sys; sys.exit('a message')",
    "atexit_and_thread": "import atexit, threading, time\natexit.register(lambda: print('atexit ran'))\n"
                         "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done'))).start()",
}


def test_fork_server_runs_a_script_as_a_fresh_python_does(monkeypatch):
    from conftest import run
    for name, code in SCRIPTS.items():
        forked = run("-c", code, "x", check=False)
        monkeypatch.setenv("NANOFORGE_TEST_FORK", "0")
        fresh = run("-c", code, "x", check=False)
        monkeypatch.delenv("NANOFORGE_TEST_FORK")
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr), name
    assert fresh.stdout == "thread done\natexit ran\n"
    script = run("sample.py", "--out_dir=/nonexistent", check=False)  # a script file, as run by path
    monkeypatch.setenv("NANOFORGE_TEST_FORK", "0")
    again = run("sample.py", "--out_dir=/nonexistent", check=False)
    assert (script.returncode, script.stdout, script.stderr) == (again.returncode, again.stdout, again.stderr)
    assert script.returncode == 2 and script.stderr.startswith("error: ")
