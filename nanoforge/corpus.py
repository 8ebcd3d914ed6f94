"""
Reading a corpus of documents, shared by the scripts that take one (data/your_text/prepare.py,
curate.py, train_tokenizer.py, evaluate.py's task files): JSONL lines with their numbers (jsonl_records,
the one JSONL reader: chat data, task files and evaluation records go through it too), which files
count, how a folder is searched, how the text field is checked, how a Hugging Face dataset is loaded
(load_hub, also for evaluate.py's hub tasks), and how a `datasets` read error becomes one line;
curate.py's reader (load_documents, with ids and URLs). Also one whole text (read_text), for the
Shakespeare scripts.
"""
import gzip
import io
import json
import os
import re
import urllib.request
from collections import Counter

from nanoforge import files
from nanoforge.files import is_url
from nanoforge.errors import UserError


def jsonl_records(path, problems=None):
    """(line number, parsed JSON) for each non-blank line of a .jsonl or .jsonl.gz file. A line that is not
    JSON is a one-line error naming the file and line; given a `problems` list, it is noted there as (line
    number, reason) instead and the reading goes on. A file that cannot be opened, or is not UTF-8, is a
    one-line error too."""
    try:
        raw = open_input(path)  # a local file or a URL
        f = io.TextIOWrapper(gzip.open(raw) if path.endswith(".gz") else raw, encoding="utf-8-sig")  # -sig: a BOM is not text
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if problems is None:
                        raise UserError(f"{path} line {n} is not JSON ({e})") from None
                    problems.append((n, f"malformed JSON ({e.msg} at column {e.colno})"))
                    continue
                yield n, record
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e})") from None
        except (OSError, EOFError) as e:  # a .gz file that is not gzip, or cut short
            raise UserError(f"cannot read {path} ({e})") from None


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
        with files.atomic_path(save_to) as tmp, open(tmp, "wb") as f:
            f.write(raw)
    else:
        if not os.path.isfile(source):
            raise UserError(f"input file {source} not found")
        source = os.path.abspath(source)
        with open(source, "rb") as f:
            raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the text
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not UTF-8 text ({e})") from None
    if not text:
        raise UserError(f"{source} is empty; pass --input=PATH to a text file")
    return text, raw, source

def split_stories(text):
    """TinyStories' files as a list of stories: separated by <|endoftext|> lines (the hub's files) or by blank
    lines (the shared head), stripped, none empty."""
    return [s.strip() for s in re.split(r"<\|endoftext\|>|\n\s*\n", text) if s.strip()]


def prepare_text_dataset(folder, what, default_tokenizer, url, shared_copy):
    """The whole of a one-text data/<name>/prepare.py (Tiny Shakespeare by characters, or in BPE tokens):
    reads --input, --out_dir (default `folder`) and --tokenizer (char, gpt2 or a folder of
    train_tokenizer.py; default `default_tokenizer`), finds the text (--input, else folder/input.txt, else
    `shared_copy`, else downloaded from `url` and kept as folder/input.txt), and writes its first 90% as
    train, the rest as val (tokens.write_text_dataset). Returns the dataset's meta."""
    import argparse
    import hashlib

    from nanoforge import tokens
    from nanoforge.tokenizer import CharTokenizer, tokenizer_from_arg
    parser = argparse.ArgumentParser(description=f"Prepare {what}.")
    parser.add_argument("--input", help="path of the text (default: input.txt here, the shared copy, or download)")
    parser.add_argument("--out_dir", default=folder, help="where train.bin, val.bin, meta.json go (default: %(default)s)")
    parser.add_argument("--tokenizer", default=default_tokenizer,
                        help="char, gpt2, or a folder written by train_tokenizer.py (default: %(default)s)")
    args = parser.parse_args()
    # first, so a missing BPE cache or tokenizer folder fails before any download
    tok = None if args.tokenizer == "char" else tokenizer_from_arg(args.tokenizer)
    local = os.path.join(folder, "input.txt")
    text, raw, source = read_text(args.input, [local, os.path.normpath(shared_copy)], url, save_to=local)
    if tok is None:  # a character vocabulary is built from the text
        tok = CharTokenizer.from_text(text)
    meta = tokens.write_text_dataset(args.out_dir, text, tok, source, hashlib.sha256(raw).hexdigest())
    if tok.spec["kind"] == "char":
        print(f"characters, vocab size {tok.vocab_size}: {''.join(tok.chars)!r}")
    else:
        print(f"{'GPT-2 BPE' if tok.spec['kind'] == 'gpt2' else 'trained BPE ' + tok.spec['path']}, vocab size "
              f"{tok.vocab_size:,}")
    print(f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens -> {args.out_dir}")
    return meta


# file suffix -> the datasets builder that reads it
# the kinds of file --input takes: text (one document a file; code and markup are text too), JSON lines, parquet
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".tex", ".html", ".css", ".py", ".js", ".ts", ".c", ".h",
                 ".cc", ".cpp", ".hpp", ".java", ".go", ".rs", ".rb", ".sh", ".sql", ".yaml", ".yml", ".toml")
BUILDERS = {**{suffix: "text" for suffix in TEXT_SUFFIXES}, ".jsonl": "json", ".jsonl.gz": "json", ".parquet": "parquet"}


def builder_of(path, suffixes=None):
    """The datasets builder that reads `path` by its ending ('text', 'json', 'parquet'), or None; suffixes
    limits the endings taken (parse_ext)."""
    return next((b for suffix, b in BUILDERS.items() if path.endswith(suffix) and (not suffixes or suffix in suffixes)),
                None)


def parse_ext(text):
    """--ext=.py,.md -> ('.py', '.md'): the kinds of file taken from folders; '' takes every kind in BUILDERS."""
    suffixes = tuple(e.strip() if e.strip().startswith(".") else "." + e.strip() for e in text.split(",") if e.strip())
    unknown = [e for e in suffixes if e not in BUILDERS]
    if unknown:
        raise UserError(f"--ext={text}: {', '.join(unknown)} is not a kind this reads; choose from {', '.join(BUILDERS)}")
    return suffixes


def open_input(path, mode="rb"):
    """An input file, local or at a URL, opened for reading (text mode takes UTF-8)."""
    import fsspec
    return fsspec.open(path, mode, **({"encoding": "utf-8-sig"} if "t" in mode else {})).open()


def input_size(path):
    """An input file's size in bytes, local or at a URL."""
    import fsspec
    fs, root = fsspec.core.url_to_fs(path)
    return fs.size(root)


def is_binary(path):
    with open_input(path) as f:
        return b"\0" in f.read(8192)


def find_files(inputs, suffixes=None):
    """The input files, in order, and a line saying how many were taken and skipped, by reason: each input
    is a file, or a folder searched recursively for the kinds in `suffixes` (default: every kind in BUILDERS).
    Skipped: other kinds, hidden files and folders (.git, .venv), binary files (a NUL byte in the first 8 KiB),
    empty files (no documents; datasets' JSON reader fails on them). Inputs may be URLs (is_url), walked
    the same way through fsspec; local files come back as absolute paths, the others as URLs."""
    import fsspec
    files, skipped, kinds, fs_of, named_files = [], Counter(), Counter(), {}, False
    for path in inputs:
        try:
            fs, root = fsspec.core.url_to_fs(path)
        except (ImportError, ValueError) as e:  # s3:// without s3fs, an unknown protocol
            raise UserError(f"cannot read {path}: {e}") from None
        named = fs.unstrip_protocol if is_url(path) else os.path.abspath  # how a found file is given back
        if fs.isdir(root):
            for folder, dirs, names in fs.walk(root, topdown=True):  # in os.walk's order: a folder, then its folders
                skipped["hidden"] += sum(d.startswith(".") for d in dirs) + sum(n.startswith(".") for n in names)
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(n for n in names if not n.startswith(".")):
                    if builder_of(name, suffixes):
                        files.append(named(folder.rstrip("/") + "/" + name))
                        fs_of[files[-1]] = fs
                    else:
                        kinds[os.path.splitext(name)[1] or "no ending"] += 1
        elif fs.isfile(root):
            if not builder_of(path):
                raise UserError(f"{path}: unknown kind of file; --input takes {', '.join(BUILDERS)} files, or folders")
            files.append(named(root))
            fs_of[files[-1]], named_files = fs, True
        else:
            raise UserError(f"input path {path} not found")
    taken = []
    for f in files:
        if fs_of[f].size(f) == 0:
            skipped["empty"] += 1
        elif builder_of(f) == "text" and is_binary(f):
            skipped["binary"] += 1
        else:
            taken.append(f)
    if kinds:
        skipped["other kinds (" + ", ".join(f"{k} {n}" for k, n in kinds.most_common(5)) + \
                (", ..." if len(kinds) > 5 else "") + ")"] = sum(kinds.values())
    by_kind = Counter(next(x for x in BUILDERS if f.endswith(x)) for f in taken)
    line = (f"input: {len(taken):,} files read ({', '.join(f'{k} {n}' for k, n in by_kind.most_common())})"
            + (f"; skipped {sum(skipped.values()):,}: " + ", ".join(f"{n} {why}" for why, n in skipped.items() if n)
               if sum(skipped.values()) else ""))
    if inputs and not taken and not named_files:
        why = ", ".join(f"{n} {why}" for why, n in skipped.items() if n) or "it is empty"
        raise UserError(f"no files to read in {', '.join(inputs)} (skipped: {why}); the kinds read, chosen by --ext: "
                        f"{', '.join(BUILDERS)}")
    return taken, line


def check_text_field(dset, field, where):
    if field not in dset.column_names:
        raise UserError(f"{where} has no field {field!r}; its fields are: {', '.join(dset.column_names)}; "
                        f"pass --text_field=NAME")
    if getattr(dset.features[field], "dtype", None) not in ("string", "large_string"):
        raise UserError(f"field {field!r} of {where} holds {dset.features[field]}, not text; pass --text_field=NAME")


def text_column(dset, field, where):
    """dset reduced to one string column named 'text', after checking that `field` is one."""
    check_text_field(dset, field, where)
    dset = dset.select_columns([field])
    return dset if field == "text" else dset.rename_column(field, "text")


def load_hub(path, config=None, split="train", cache_dir=None, num_proc=None, max_documents=0,
             advice="offline, or a misspelt name? pass --input=PATH to local files"):
    """A Hugging Face dataset (a hub name, or any folder load_dataset reads) as Arrow on disk. Whole, it is
    downloaded once and converted in the cache, so it may be bigger than memory; with max_documents > 0,
    only that many are streamed (nothing else is downloaded). A hub repository that still holds a loading
    script (HellaSwag's), which datasets >= 4 refuses, is read from the hub's parquet copy instead.
    Offline, misspelt, or a split it lacks: one UserError line ending in `advice` (what to do instead)."""
    import datasets

    def load(**revision):
        if max_documents > 0:
            stream = datasets.load_dataset(path, config or None, split=split, streaming=True, **revision)
            return datasets.Dataset.from_generator(_first, gen_kwargs={"stream": stream, "n": max_documents},
                                                   cache_dir=cache_dir)
        return datasets.load_dataset(path, config or None, split=split, cache_dir=cache_dir, num_proc=num_proc,
                                     **revision)

    try:
        try:
            return load()
        except RuntimeError:  # "Dataset scripts are no longer supported": the hub keeps a parquet copy of each
            if os.path.exists(path):
                raise
            return load(revision="refs/convert/parquet")
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError, RuntimeError,
            ValueError) as e:  # ValueError: a split or configuration the dataset lacks
        local = "" if os.path.exists(path) or "/" not in path else f"{path} is no local path, and "
        raise UserError(f"{local}could not load the Hugging Face dataset {path} ({split}: "
                        f"{' '.join(str(e).split())[:200]}); {advice}") from None


def _first(stream, n):
    yield from stream.take(n)


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


# ------------------------------------------------------------------------------------------------------
# curate.py's input: documents with an id, a text and a URL

def is_hub(entry):
    """Is this --input entry a Hugging Face dataset: hf:NAME_OR_FOLDER, or owner/name where no such local
    path exists?"""
    if is_url(entry):  # hf://datasets/owner/name/file.parquet is a file, read through fsspec
        return False
    return entry.startswith("hf:") or (not os.path.exists(entry) and re.fullmatch(r"[\w.-]+/[\w.-]+", entry) is not None)


def first_bad_file(paths):
    """Where in `paths` reading fails, found again in plain Python once datasets has failed without saying
    which file: 'FILE line N' for a line of JSON that does not parse, 'FILE' for bytes that are not UTF-8
    or an empty compressed file; '' if each reads on its own (then the files disagree with one another)."""
    for path in paths:
        try:
            if builder_of(path) != "json":
                with open_input(path, "rt") as f:
                    f.read()
                continue
            problems = []
            found = sum(1 for _ in jsonl_records(path, problems))
            if problems:
                return f"{path} line {problems[0][0]}"
            if not found and path.endswith(".gz"):
                return path
        except (UnicodeDecodeError, OSError, UserError):
            return path
    return ""


def input_error(what, paths):
    """The one-line error for input datasets could not read, naming the file (and line) where it can."""
    where = first_bad_file(paths) if paths else ""
    return UserError(f"could not read the input{' ' + where if where else ''}: {what}")


def by_builder(files):
    """[(builder, paths)]: the files by kind, kinds in order of first appearance, files in order within one;
    the order the documents are numbered in (both engines, both scripts)."""
    return [(b, [f for f in files if builder_of(f) == b]) for b in dict.fromkeys(map(builder_of, files))]


def load_documents(files, cfg, cache_dir, num_proc, hub=()):
    """One dataset with columns id, text, url: the local files (read by datasets' builders to disk), then
    the Hugging Face datasets named in `hub` (load_hub: a hub name or hf:FOLDER), in order. For curate.py."""
    import datasets
    parts, paths = [], []
    try:
        for builder, paths in by_builder(files):
            options = {"sample_by": "paragraph" if cfg["txt_split"] == "blank" else "document"} if builder == "text" else {}
            d = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir,
                                      num_proc=min(num_proc, len(paths)), **options)
            where = paths[0] if len(paths) == 1 else f"the {builder} files ({paths[0]}, ...)"
            parts.append(_documents(d, "text" if builder == "text" else cfg["text_field"], where, cfg))
        for entry in hub:
            path = entry[3:] if entry.startswith("hf:") else entry
            d = load_hub(path, cfg["hf_config"], cfg["hf_split"], cache_dir if os.path.exists(path) else None,
                         num_proc, cfg["hf_max_documents"])
            parts.append(_documents(d, cfg["text_field"], entry, cfg))
    except datasets.exceptions.DatasetGenerationError as e:  # a malformed JSON line, bytes that are not UTF-8, ...
        raise input_error(reason(e), paths) from None
    except UnicodeDecodeError as e:  # raised by the JSON reader as it is, not wrapped
        raise input_error(f"bytes that are not UTF-8 ({e}); convert the files to UTF-8", paths) from None
    except StopIteration:  # datasets' JSON reader, on a compressed file with nothing inside
        raise input_error("a compressed file holds no JSON lines", paths) from None
    except (ValueError, TypeError) as e:  # a field that cannot be read as text, mixed schemas, an unknown split
        raise input_error(" ".join(str(e).split())[:300], paths) from None
    parts = [d for d in parts if d is not None]
    if not parts:
        raise UserError("no documents found in the input: it is empty")
    return datasets.concatenate_datasets(parts)


def _documents(d, field, where, cfg):
    """d reduced to the columns id, text, url (None when empty), after checking its text field."""
    import datasets
    if len(d) == 0:
        return None
    check_text_field(d, field, where)
    flat = d.flatten() if cfg["url_field"] and "." in cfg["url_field"] else d
    keep = {field: "text"}
    for key, name in ((cfg["id_field"], "id"), (cfg["url_field"], "url")):
        if key and key in flat.column_names and key != field:
            keep[key] = name
    flat = flat.select_columns(list(keep)).rename_columns(keep)
    for name in ("id", "url"):
        if name not in flat.column_names:
            flat = flat.add_column(name, [""] * len(flat))
    if getattr(flat.features["id"], "dtype", None) not in ("string", "large_string"):
        flat = flat.cast_column("id", datasets.Value("string"))  # ids may be numbers in JSON
    return flat.select_columns(["id", "text", "url"])
