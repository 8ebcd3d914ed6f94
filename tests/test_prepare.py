"""
The dataset preparation scripts, run the way a user runs them (a new process each, output in tmp_path):
nanoGPT's token counts for Tiny Shakespeare, token files that decode back to the text exactly, and a
one-line error for bad input. Hermetic: the GPT-2 BPE comes from the shared tiktoken cache, Hugging Face
is kept offline and its cache goes to tmp_path.
"""
import gzip
import json
import math
import os

import numpy as np
import pytest

from nanoforge import tokens
from nanoforge.tokenizer import load_tokenizer

from conftest import SHAKESPEARE, SHARED  # noqa: E402
from conftest import run as run_script

# documents that test the edges: unicode, newlines, an empty one, and the end-of-text marker as plain text
DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog.\nSecond line {i}." for i in range(12)] + [
    "Hello world, I'm learning transformers.",
    "naïve café, 日本語, emoji 🦊 and a tab\there",
    "a literal <|endoftext|> inside a document is ordinary text",
    "",
    "  leading and trailing spaces  \n\n\nand blank lines\n",
]


def run(script, *args, tmp_path):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=os.path.join(SHARED, "assets", "tiktoken_cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    return run_script(os.path.join("data", script, "prepare.py"), *args, env=env, check=False)


def prepare(script, *args, tmp_path):
    out = tmp_path / "out"
    result = run(script, *args, f"--out_dir={out}", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temporary cache left behind
    meta = tokens.read_meta(out)
    for split in ("train", "val"):
        assert tokens.read_header(tokens.split_path(out, split))[1] == meta[f"{split}_tokens"]
    return out, meta


def split_ids(out, split):
    return np.asarray(tokens.open_tokens(tokens.split_path(out, split)), dtype=np.int64)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr


def documents(out, split, tok):
    """The documents of a split: its tokens cut at each end-of-text token (which ordinary text never gives)."""
    ids = split_ids(out, split)
    assert ids[-1] == tok.eot_id
    ends = np.flatnonzero(ids == tok.eot_id)
    return [tok.decode(doc[:-1]) for doc in np.split(ids, ends + 1)[:-1]]


def check_documents(out, meta, docs, tok):
    """Every document is there once, whole; counts are encode_ordinary + 1 per document."""
    train, val = documents(out, "train", tok), documents(out, "val", tok)
    assert len(val) >= 1
    assert sorted(train + val) == sorted(docs)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
    assert meta["train_bytes"] == sum(len(d.encode("utf-8")) for d in train)
    assert meta["val_bytes"] == sum(len(d.encode("utf-8")) for d in val)
    assert (meta["train_documents"], meta["val_documents"]) == (len(train), len(val))
    assert meta["tokenizer"] == {"kind": "gpt2"} and meta["vocab_size"] == 50257


# ------------------------------------------------------------------------------------------------------
# Tiny Shakespeare

def read_shakespeare():
    with open(SHAKESPEARE, "rb") as f:
        return f.read().decode("utf-8")


def test_shakespeare_char_matches_nanogpt_and_decodes_back(tmp_path):
    out, meta = prepare("shakespeare_char", f"--input={SHAKESPEARE}", tmp_path=tmp_path)
    assert meta["vocab_size"] == 65
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    assert meta["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert meta["train_bytes"] + meta["val_bytes"] == 1_115_394
    tok = load_tokenizer(meta["tokenizer"])
    assert tok.decode(split_ids(out, "train")) + tok.decode(split_ids(out, "val")) == read_shakespeare()


def test_shakespeare_bpe_matches_nanogpt_and_decodes_back(tmp_path):
    out, meta = prepare("shakespeare", f"--input={SHAKESPEARE}", tmp_path=tmp_path)
    assert meta["tokenizer"] == {"kind": "gpt2"} and meta["vocab_size"] == 50257
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)
    tok = load_tokenizer(meta["tokenizer"])
    assert tok.decode(split_ids(out, "train")) + tok.decode(split_ids(out, "val")) == read_shakespeare()


@pytest.mark.parametrize("script, name, content, says", [("shakespeare_char", "input.txt", "", "is empty"),
                                                         ("shakespeare", "missing.txt", None, "not found")])
def test_shakespeare_empty_or_missing_input_is_a_clear_error(tmp_path, script, name, content, says):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = run(script, f"--input={path}", f"--out_dir={tmp_path / 'out'}", tmp_path=tmp_path)
    assert_one_line_error(result, says, str(path))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------
# documents: your own text (data/your_text, also OpenWebText's script) from local files

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_your_text_jsonl(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    with (gzip.open if suffix.endswith(".gz") else open)(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(DOCS):
            f.write(json.dumps({"id": i, "body": doc}) + "\n")
    out, meta = prepare("your_text", f"--input={path}", "--text_field=body", "--num_proc=2", tmp_path=tmp_path)
    check_documents(out, meta, DOCS, load_tokenizer(meta["tokenizer"]))
    assert meta["source"] == str(path)


@pytest.mark.slow
def test_your_text_val_split_is_big_enough_to_score(tmp_path):
    # 300 documents of ~60 tokens: --val_fraction's 0.05% would be 1 document (what a 697-document web
    # sample once got: 2 val tokens); val takes enough documents for --min_val_tokens instead, and no more
    # than a tenth of the corpus, saying so when that is not enough
    path = tmp_path / "docs.jsonl"
    words = "the cat sat on a mat while the dog ran far away from home".split()
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(60))}) + "\n"
                     for i in range(300))
    out, meta = prepare("your_text", f"--input={path}", "--num_proc=1", "--min_val_tokens=1000",
                        tmp_path=tmp_path / "a")
    assert 1000 <= meta["val_tokens"] < 1200 and meta["val_documents"] + meta["train_documents"] == 300
    result = run("your_text", f"--input={path}", "--num_proc=1", "--min_val_tokens=100000",
                 f"--out_dir={tmp_path / 'b'}", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert tokens.read_meta(str(tmp_path / "b"))["val_documents"] == 30  # a tenth, and a warning
    assert "warning: val holds only" in result.stdout


@pytest.mark.slow  # two or three runs of the script
def test_your_text_txt_folder_and_blank_line_split(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    docs = [d for d in DOCS if d]  # an empty file holds no document
    for i, doc in enumerate(docs):
        (folder / ("sub" if i % 2 else "") / f"{i}.txt").write_text(doc, encoding="utf-8")
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")  # not a kind of text: skipped
    blank = tmp_path / "stories.txt"
    stories = ["Once upon a time.\nThe end.", "Another story.", "A third, 🦊."]
    blank.write_text("\n\n".join(stories) + "\n\n\n" + "\n", encoding="utf-8")
    out, meta = prepare("your_text", "--input", str(folder), str(blank), "--txt_split=blank", "--num_proc=1",
                        tmp_path=tmp_path)
    tok = load_tokenizer(meta["tokenizer"])
    # --txt_split=blank splits .txt files on blank lines, the folder's files too
    expected = [p.strip("\n") for d in docs for p in d.split("\n\n") if p.strip("\n")] + stories
    check_documents(out, meta, expected, tok)

    # the folder again, named by a URL (file:// takes fsspec's path, as s3:// and gs:// do)
    out, meta = prepare("your_text", f"--input={folder.as_uri()}", "--val_fraction=0.2", tmp_path=tmp_path / "whole")
    check_documents(out, meta, docs, tok)
    assert meta["source"] == folder.as_uri()
    assert meta["val_documents"] == math.ceil(0.2 * len(docs))
    # and written to a URL: built here, published there when whole; the same bytes; an existing one refused
    at_url = tmp_path / "bucket" / "data"
    result = run("your_text", f"--input={folder.as_uri()}", "--val_fraction=0.2", f"--out_dir={at_url.as_uri()}",
                 tmp_path=tmp_path / "whole")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(at_url)) == sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    assert all((at_url / name).read_bytes() == (out / name).read_bytes() for name in os.listdir(out))
    assert os.listdir(at_url.parent) == ["data"]  # nothing staged left beside it
    result = run("your_text", f"--input={folder.as_uri()}", f"--out_dir={at_url.as_uri()}", tmp_path=tmp_path / "whole")
    assert_one_line_error(result, "already holds a prepared dataset")
    result = run("your_text", f"--input={folder.as_uri()}", "--out_dir=nosuchprotocol://bucket/data", tmp_path=tmp_path)
    assert_one_line_error(result, "cannot use nosuchprotocol://bucket/data/meta.json: Protocol not known")


@pytest.mark.slow  # three runs of the script
def test_your_text_reads_a_folder_of_code_as_given_and_says_what_it_skipped(tmp_path):
    folder = tmp_path / "project"
    (folder / "pkg").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]")
    code = {"pkg/a.py": "def f(x):\n    return x * 2\n", "pkg/b.py": "import os\nprint(os.sep)\n",
            "README.md": "# A project\n\nIt doubles numbers.\n"}
    for name, text in code.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "pkg" / "empty.py").write_text("")
    (folder / "weird.txt").write_bytes(b"text\0with a NUL")
    (folder / "logo.png").write_bytes(b"\x89PNG\0")
    (folder / "data.bin").write_bytes(b"\0\1")
    proc = run("your_text", f"--input={folder}", f"--out_dir={tmp_path / 'all'}", "--val_fraction=0.34",
               "--min_val_tokens=1", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("input: 3 files read (.py 2, .md 1); skipped 5: 1 hidden, 1 binary, 1 empty, 2 other kinds (.bin 1, "
            ".png 1)") in proc.stdout
    meta = tokens.read_meta(str(tmp_path / "all"))
    check_documents(str(tmp_path / "all"), meta, list(code.values()), load_tokenizer(meta["tokenizer"]))
    proc = run("your_text", f"--input={folder}", f"--out_dir={tmp_path / 'py'}", "--ext=.py", "--val_fraction=0.5",
               "--min_val_tokens=1", tmp_path=tmp_path)
    assert proc.returncode == 0 and "input: 2 files read (.py 2); skipped" in proc.stdout, proc.stderr
    # an existing dataset is not replaced unless asked
    again = run("your_text", f"--input={folder}", f"--out_dir={tmp_path / 'py'}", tmp_path=tmp_path)
    assert_one_line_error(again, "already holds a prepared dataset; pass --overwrite")
    assert_one_line_error(run("your_text", f"--input={folder}", "--ext=.docx", tmp_path=tmp_path), "--ext=.docx")


@pytest.mark.slow
def test_one_file_of_your_own_text_gets_a_held_out_split_by_paragraph(tmp_path):
    book = tmp_path / "book.txt"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        book.write_text(f.read()[:200_000], encoding="utf-8")
    out, meta = prepare("your_text", f"--input={book}", "--num_proc=1", tmp_path=tmp_path)
    # one file is one document: its paragraphs are held out instead, enough to score (not a 13-token val)
    assert meta["val_documents"] > 20 and meta["val_tokens"] >= 5000 and meta["train_tokens"] > 8 * meta["val_tokens"]


@pytest.mark.slow  # two or three runs of the script
def test_your_text_bad_input_is_a_one_line_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS)))
    out = f"--out_dir={tmp_path / 'out'}"
    assert_one_line_error(run("your_text", f"--input={path}", out, tmp_path=tmp_path), "'text'", "id, body")
    assert_one_line_error(run("your_text", f"--input={tmp_path / 'nope.jsonl'}", out, tmp_path=tmp_path),
                          "not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("your_text", f"--input={tmp_path / 'empty'}", out, tmp_path=tmp_path), "no files to read")
    assert not os.path.exists(tmp_path / "out")  # a refused or failed run leaves no folder behind
    # nothing to read, or two sources; OpenWebText by name, offline here
    assert_one_line_error(run("your_text", out, tmp_path=tmp_path), "nothing to prepare", "--dataset=openwebtext")
    assert_one_line_error(run("your_text", f"--input={path}", "--dataset=openwebtext", out, tmp_path=tmp_path),
                          "not both")
    assert_one_line_error(run("your_text", "--dataset=openwebtext", out, tmp_path=tmp_path),
                          "could not load the Hugging Face dataset openwebtext")


@pytest.mark.slow
def test_curated_shards_keep_their_split(tmp_path):
    """curate.py's output (train-NNNNN / val-NNNNN shards) keeps its held-out split instead of a random one."""
    corpus = tmp_path / "curated"
    corpus.mkdir()
    for name, docs in (("train-00000", DOCS[:8]), ("train-00001", DOCS[8:12]), ("val-00000", DOCS[12:14])):
        with gzip.open(corpus / f"{name}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(docs))
    (corpus / "report.json").write_text("{}")  # beside the shards, not a corpus file
    out, meta = prepare("your_text", f"--input={corpus}", tmp_path=tmp_path)
    assert (meta["train_documents"], meta["val_documents"]) == (12, 2)
    tok = load_tokenizer({"kind": "gpt2"})
    val = split_ids(out, "val").tolist()
    assert tok.decode(val) == "".join(t + "<|endoftext|>" for t in DOCS[12:14])


def test_read_text_order_download_and_errors(tmp_path):
    import pytest
    from nanoforge.corpus import read_text
    from nanoforge.errors import UserError
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    second.write_text("second ü")
    remote = tmp_path / "remote.txt"
    remote.write_text("from the url")
    saved = tmp_path / "saved.txt"
    # the first candidate that exists wins; --input wins over all
    assert read_text(None, [str(first), str(second)], remote.as_uri(), str(saved))[0] == "second ü"
    assert read_text(str(remote), [str(second)], "unused", str(saved))[0] == "from the url"
    # none present: downloaded (a file:// URL here) and kept for the next run
    text, raw, source = read_text(None, [str(first)], remote.as_uri(), str(saved))
    assert text == "from the url" and source == remote.as_uri() and saved.read_text() == "from the url"
    with pytest.raises(UserError, match="could not download .*pass --input"):
        read_text(None, [str(first)], (tmp_path / "gone.txt").as_uri(), str(tmp_path / "x.txt"))
    with pytest.raises(UserError, match="not found"):
        read_text(str(first), [], "unused", str(saved))
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfFirst line")  # a UTF-8 byte-order mark is not a character of the text
    assert read_text(str(bom), [], "unused", str(saved))[0] == "First line"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(UserError, match="not UTF-8"):
        read_text(str(bad), [], "unused", str(saved))


@pytest.mark.slow
def test_your_text_shards_give_the_batches_of_one_file(tmp_path):
    # the same corpus as one train.bin and as shards of 50 tokens: the same tokens, the same batches
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in DOCS * 3)
    one, meta = prepare("your_text", f"--input={path}", "--num_proc=1", tmp_path=tmp_path)
    sharded = tmp_path / "sharded"
    result = run("your_text", f"--input={path}", "--num_proc=1", "--shard_tokens=50", f"--out_dir={sharded}",
                 tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    shards = tokens.split_files(str(sharded), "train")
    assert len(shards) == math.ceil(meta["train_tokens"] / 50) > 3
    assert [os.path.basename(p) for p in shards[:2]] == ["train_000000.bin", "train_000001.bin"]
    assert all(tokens.read_header(p)[1] == 50 for p in shards[:-1])
    assert tokens.read_meta(str(sharded))["train_tokens"] == meta["train_tokens"]
    block = 16
    count = tokens.split_length(str(sharded), "train", block)
    assert count == tokens.split_length(str(one), "train", block) == meta["train_tokens"]
    for step in range(3):  # windows that straddle shard boundaries included
        starts = tokens.train_starts(1337, step, 64, count, block)
        x1, y1 = tokens.read_batch(tokens.split_files(str(one), "train"), starts, block)
        x2, y2 = tokens.read_batch(shards, starts, block)
        assert x1.equal(x2) and y1.equal(y2) and x1[:, 1:].equal(y1[:, :-1])
    starts = tokens.eval_starts(tokens.split_length(str(sharded), "val", 4), 4, 8)
    assert tokens.read_batch(tokens.split_files(str(sharded), "val"), starts, 4)[0].equal(
        tokens.read_batch(tokens.split_path(str(one), "val"), starts, 4)[0])
