"""
Reading a local corpus of documents, shared by the scripts that take one (data/openwebtext/prepare.py,
curate.py, train_tokenizer.py, evaluate.py's task files): JSONL lines with their numbers, which files count, how a folder is searched, how the text field is checked, and how a
`datasets` read error becomes one line. Also one whole text (read_text), for the Shakespeare scripts.
"""
import gzip
import json
import os
import re
import urllib.request

import runtime
from runtime import UserError


def jsonl_records(path):
    """(line number, parsed JSON) for each non-blank line of a .jsonl or .jsonl.gz file; a line that is not
    JSON is a one-line error naming the file and line."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not JSON ({e})") from None
            yield n, record


def read_text(path, candidates, url, save_to):
    """(text, raw bytes, source) of one UTF-8 text: from `path` if given, else the first of `candidates`
    that exists, else downloaded from `url` and kept at `save_to` so the next run needs no network.
    Read as bytes and decoded, so no newline translation happens and decoding gives it back exactly."""
    source = path or next((p for p in candidates if os.path.exists(p)), url)
    if source == url:
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                raw = response.read()
        except OSError as e:  # urllib's URLError and timeouts are OSErrors
            raise UserError(f"could not download {url} ({e}); offline? pass --input=PATH to a local copy") from None
        with runtime.atomic_path(save_to) as tmp, open(tmp, "wb") as f:
            f.write(raw)
    else:
        if not os.path.isfile(source):
            raise UserError(f"input file {source} not found")
        source = os.path.abspath(source)
        with open(source, "rb") as f:
            raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not UTF-8 text ({e})") from None
    if not text:
        raise UserError(f"{source} is empty; pass --input=PATH to a text file")
    return text, raw, source

# file suffix -> the datasets builder that reads it
BUILDERS = {".txt": "text", ".jsonl": "json", ".jsonl.gz": "json", ".parquet": "parquet"}


def builder_of(path):
    return next((b for suffix, b in BUILDERS.items() if path.endswith(suffix)), None)


def find_files(inputs):
    """The input files, in order: each --input is a file, or a folder searched recursively. Empty files hold
    no documents and are left out (datasets' JSON reader fails on them)."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names if builder_of(f))
            if not found:
                raise UserError(f"no {', '.join(BUILDERS)} files in folder {path}")
            files += found
        elif os.path.isfile(path):
            if not builder_of(path):
                raise UserError(f"{path}: unknown kind of file; --input takes {', '.join(BUILDERS)} files, or folders")
            files.append(path)
        else:
            raise UserError(f"input path {path} not found")
    return [os.path.abspath(f) for f in files if os.path.getsize(f) > 0]


def text_column(dset, field, where):
    """dset reduced to one string column named 'text', after checking that `field` is one."""
    if field not in dset.column_names:
        raise UserError(f"{where} has no field {field!r}; its fields are: {', '.join(dset.column_names)}; "
                        f"pass --text_field=NAME")
    if getattr(dset.features[field], "dtype", None) not in ("string", "large_string"):
        raise UserError(f"field {field!r} of {where} holds {dset.features[field]}, not text; pass --text_field=NAME")
    dset = dset.select_columns([field])
    return dset if field == "text" else dset.rename_column(field, "text")


def reason(e):
    """One line saying why datasets could not read the input. From a worker process the cause arrives as the
    worker's whole traceback: keep its first error."""
    text = str(e.__cause__ or e)
    first = re.search(r"^(\w[\w.]*: .*?)(?:\n\n|\Z)", text, re.M | re.S) if "Traceback" in text else None
    return " ".join((first.group(1) if first else text).split())


# curate.py's output shards: the held-out split is in the file name, so prepare scripts can keep it
SHARD = re.compile(r"^(train|val)-\d{5}\.jsonl\.gz$")


def shard_name(split, index):
    return f"{split}-{index:05d}.jsonl.gz"


def curated_splits(files):
    """{'train': [...], 'val': [...]} when every file is a curate.py shard and both splits are there, else
    None (any other corpus is split at random by the prepare script)."""
    splits = {"train": [], "val": []}
    for f in files:
        m = SHARD.match(os.path.basename(f))
        if not m:
            return None
        splits[m.group(1)].append(f)
    return splits if splits["train"] and splits["val"] else None
