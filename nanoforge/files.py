"""
Files that are never half-written: each output is built beside its place and renamed in, in one step, so
a crash or Ctrl-C mid-write leaves the good old file (or folder) where it was. And the lock that keeps two
runs out of one out_dir.
"""
import contextlib
import json
import os
import posixpath
import shutil
import tempfile

from nanoforge.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's root: data/, config/


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success it is renamed over `path` in one step, so a crash
    or Ctrl-C mid-write never leaves a half-written file where a good one was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def lock_out_dir(out_dir):
    """Claim `out_dir` for this process until it exits: a second run started on the same folder (train.py,
    finetune.py, a sweep's trial) is refused in one line naming the holder, instead of both writing and
    one's checkpoint and log silently winning. The lock is the OS's (flock), so a killed run's lock goes
    with it and never blocks the next. Holding it, leftover `*.tmp<pid>` files of killed runs are removed.
    A folder this call made is removed again at exit if the run wrote nothing into it (refused by a later
    check): a refused run leaves no out_dir holding only a lock.
    Returns the open lock file (keep a reference: closing it releases the lock)."""
    import atexit
    import fcntl
    import glob
    if not os.path.isdir(out_dir):
        atexit.register(_remove_if_unused, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise UserError(f"{out_dir} is in use by another run (process {holder}); wait for it, stop it, or pick "
                        f"another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    for leftover in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp[0-9]*")):
        if os.path.isfile(leftover):
            os.remove(leftover)  # a half-written file from a run killed mid-save: the real one is intact
    return lock


def read_text(path, what="text"):
    """A text file's contents as a str, a byte-order mark dropped; a file that cannot be read, or is not
    UTF-8, is a one-line error naming it and the fix."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read the {what} file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"the {what} file {path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                        f"save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > utf8.txt") from None


def text_arg(value, what):
    """A --key=value text argument: the value itself, or with FILE:path the file's contents (read_text)."""
    return read_text(value[5:], what) if value.startswith("FILE:") else value


def _remove_if_unused(out_dir):
    try:
        if set(os.listdir(out_dir)) <= {".lock"}:
            shutil.rmtree(out_dir)
    except OSError:
        pass  # gone already, or not ours to remove: leave it


def write_json(path, obj):
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))



def replace_folder(new, path):
    """Moves the finished folder `new` to `path`. An old folder at `path` is moved aside to `path`.old for
    the instant between the two renames and removed after, so `path` holds the old folder or the new one,
    never a mix (a reader that finds no `path` may look at `path`.old)."""
    old = path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def is_url(path):
    """s3://bucket/key, gs://..., hf://datasets/..., file:///...: read and written through fsspec (the
    cloud's package, s3fs or gcsfs, installed by the user: fsspec names it when it is missing)."""
    return "://" in path


def url_fs(url):
    """(fsspec filesystem, path in it) of a URL; a protocol fsspec does not know, or whose package is not
    installed (s3fs, gcsfs), is one line that says so."""
    import fsspec
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot use {url}: {e}") from None


def output_exists(path):
    """Whether a folder or file is at `path`, a local path or a URL."""
    if not is_url(path):
        return os.path.exists(path)
    fs, root = url_fs(path)
    return fs.exists(root)


def staged_url(url):
    """Where an output at `url` is built before it is moved in: beside its place (URL.tmpPID), a URL too, so
    this process's Ray workers, on any machine, can write into it."""
    return f"{url.rstrip('/')}.tmp{os.getpid()}"


def remove_url(url):
    """Removes the folder or file at `url`, if there is one (a staged output left by a failed run)."""
    fs, root = url_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def open_output(path):
    """A file opened to write bytes at `path`, a local path or a URL (through fsspec: on object storage the
    object appears when the file is closed). A URL's folders are made as needed."""
    if not is_url(path):
        return open(path, "wb")
    fs, root = url_fs(path)
    fs.makedirs(posixpath.dirname(root), exist_ok=True)
    return fs.open(root, "wb")


def write_bytes(path, data):
    """`data` as the file at `path`: a local file renamed in when whole (atomic_path); at a URL, written
    there (inside a staged folder, which is what moves in whole)."""
    if is_url(path):
        with open_output(path) as f:
            f.write(data)
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def publish_folder(local, url):
    """Uploads the finished local folder to `url` (s3://..., file://...): into its staged place first
    (staged_url, where this run's workers may have written files already), then moved in, replacing what was
    there. On a filesystem the move is a rename; on object storage it is object by object, so a reader sees
    the old output or whole files of the new one."""
    fs, root = url_fs(url)
    root = root.rstrip("/")
    _, staged = url_fs(staged_url(url))
    try:
        if local is not None:
            fs.put(local.rstrip("/") + "/", staged + "/", recursive=True)  # the folder's contents, into staged
        if fs.exists(root):
            fs.rm(root, recursive=True)
        fs.mv(staged, root, recursive=True)
    finally:
        if fs.exists(staged):
            fs.rm(staged, recursive=True)


@contextlib.contextmanager
def atomic_folder(path, at_url=False):
    """Yields an empty temporary folder beside `path` to fill; on success it replaces `path`
    (replace_folder). A crash or Ctrl-C mid-write leaves the old folder and removes the half-written one.
    A URL `path`: the folder is filled in a local temporary folder and published there (publish_folder);
    with at_url=True it is built at the URL itself (staged_url: the yielded folder is a URL, written with
    open_output and write_bytes, by Ray workers on any machine too) and moved in when whole."""
    if is_url(path) and at_url:
        staged = staged_url(path)
        fs, root = url_fs(staged)
        remove_url(staged)
        fs.makedirs(root, exist_ok=True)
        try:
            yield staged
            publish_folder(None, path)
        finally:
            remove_url(staged)
        return
    if is_url(path):
        tmp = tempfile.mkdtemp(prefix="nanoforge-output.")
        try:
            yield tmp
            publish_folder(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    path = os.path.normpath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
