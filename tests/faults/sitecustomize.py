"""
A killed worker, on purpose: Python loads this file at start-up when its folder is on PYTHONPATH, as it is
for the Ray cluster tests/test_ray_data.py starts. While the file named by $NANOFORGE_TEST_KILL exists, the
first process to write tokens (os.pwrite: tokens.PlacedWriter) renames it away (one process wins), writes
half of what it was given and dies at once, as a worker killed mid-write would. Without the variable, or
once the file is gone, nothing changes.
"""
import os

_armed = os.environ.get("NANOFORGE_TEST_KILL")
if _armed:
    _pwrite = os.pwrite

    def _pwrite_or_die(fd, data, offset):
        try:
            os.rename(_armed, _armed + ".fired")
        except FileNotFoundError:
            return _pwrite(fd, data, offset)
        _pwrite(fd, bytes(data)[:len(data) // 2], offset)
        os._exit(9)

    os.pwrite = _pwrite_or_die
