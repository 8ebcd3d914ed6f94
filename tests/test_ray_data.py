"""
The Ray engine of the data scripts (--engine=ray) on a real Ray cluster of two nodes on this machine
(Ray's own cluster_utils: a head and a second node, each a raylet with its own workers): the same bytes
as the local engine, curate.py's and prepare.py's, a worker killed mid-run retried by Ray with the same
output, errors in one line.
"""
import filecmp
import gzip
import json
import math
import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED, assert_one_line_error, run  # noqa: E402

ray = pytest.importorskip("ray")  # a test dependency (pyproject's test extra): present in CI
PREPARE = os.path.join(ROOT, "data", "your_text", "prepare.py")
CC_WEB = os.path.join(SHARED, "data", "cc_web")
FAULTS = os.path.join(ROOT, "tests", "faults")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray cluster of two nodes of one CPU each; its workers load tests/faults/sitecustomize.py, armed
    only while the file in $NANOFORGE_TEST_KILL exists. Yields (address, that file's path)."""
    from ray.cluster_utils import Cluster
    armed = str(tmp_path_factory.mktemp("faults") / "kill_a_writer")
    saved = dict(os.environ)
    os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [FAULTS, os.environ.get("PYTHONPATH")])),
                      NANOFORGE_TEST_KILL=armed, RAY_USAGE_STATS_ENABLED="0")
    try:
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                               "object_store_memory": 100 * 2**20})
        nodes.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        nodes.wait_for_nodes()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield nodes.address, armed
    nodes.shutdown()


def cc_web_pages(n):
    """The first n of the 697 raw Common Crawl pages beside the repo, as their JSON objects."""
    with gzip.open(os.path.join(CC_WEB, os.listdir(CC_WEB)[0]), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def write_jsonl_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def corpus(folder):
    """Each kind of input the script reads, in nested folders: raw Common Crawl pages (.jsonl.gz), a
    .parquet file with unicode and an empty document, and .txt files (one document each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(3)
    words = "the a cat runs over lazy fox naïve café 日本語 🦊 <|endoftext|>".split()
    doc = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 300)))  # noqa: E731
    (folder / "sub").mkdir(parents=True)
    write_jsonl_gz(folder / "web.jsonl.gz", cc_web_pages(250))
    pq.write_table(pa.table({"text": [doc() if i != 7 else "" for i in range(200)]}), folder / "sub" / "b.parquet")
    for i in range(4):
        (folder / f"t{i}.txt").write_text(doc(), encoding="utf-8")
    return [str(folder)]


def same_folders(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:  # every token file and meta.json, byte for byte
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    return names


def test_prepare_on_two_ray_nodes_writes_the_local_engines_bytes_even_when_a_worker_dies(cluster, tmp_path):
    address, armed = cluster
    inputs = corpus(tmp_path / "raw")
    args = ["--input", *inputs, "--shard_tokens=20000", "--min_val_tokens=2000", "--num_proc=1"]
    run(PREPARE, *args, f"--out_dir={tmp_path / 'local'}")
    # on the cluster, where a worker dies halfway through writing a block of tokens: Ray runs that block
    # again, and the bytes are the local engine's
    open(armed, "w").close()
    proc = run(PREPARE, *args, f"--out_dir={tmp_path / 'ray'}", "--engine=ray", f"--ray_address={address}")
    assert not os.path.exists(armed) and os.path.exists(armed + ".fired"), "no worker was killed"
    assert "on 2 node(s)" in proc.stdout, proc.stdout
    names = same_folders(tmp_path / "local", tmp_path / "ray")
    assert "train_000001.bin" in names and "val_000000.bin" in names  # documents cross the shards' edges
    meta = json.loads((tmp_path / "ray" / "meta.json").read_text())
    assert meta["train_documents"] + meta["val_documents"] == 250 + 200 + 4 and meta["val_tokens"] >= 2000
    # to a URL (object storage: whole objects only; file:// takes fsspec's path, as s3:// does): each file's
    # pieces gathered on a worker and written at once into the folder staged beside it there, then moved in
    at_url = (tmp_path / "bucket" / "tokens").as_uri()
    open(armed, "w").close()  # armed again: a worker writing tokens in place (os.pwrite) would die
    proc = run(PREPARE, *args, f"--out_dir={at_url}", "--engine=ray", f"--ray_address={address}")
    assert os.path.exists(armed), "tokens were written in place, not as whole files"
    os.remove(armed)
    assert "on 2 node(s)" in proc.stdout, proc.stdout
    assert same_folders(tmp_path / "local", tmp_path / "bucket" / "tokens") == names
    assert os.listdir(tmp_path / "bucket") == ["tokens"]  # nothing staged left beside it
    assert sorted(os.listdir(tmp_path)) == ["bucket", "local", "raw", "ray"]  # nothing half-made left beside them


def test_ray_engine_errors_are_one_line(cluster, tmp_path):
    address, _ = cluster
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "good.jsonl").write_text('{"text": "fine"}\n' * 20)
    (tmp_path / "raw" / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    ray_args = ["--engine=ray", f"--ray_address={address}"]
    # a line that is not JSON, found on a worker: its file and line, no traceback
    proc = run(PREPARE, f"--input={tmp_path / 'raw'}", f"--out_dir={tmp_path / 'x'}", *ray_args, check=False)
    assert_one_line_error(proc, f"{tmp_path / 'raw' / 'bad.jsonl'} line 2")
    proc = run(PREPARE, "--dataset=openwebtext", f"--out_dir={tmp_path / 'x'}", *ray_args, check=False)
    assert_one_line_error(proc, "--engine=ray reads --input")
    assert not os.path.exists(tmp_path / "x")


def planted(folder):
    """The first 250 Common Crawl pages, then again in a second file: in capitals (exact copies, once case
    is folded), with a word in 30 changed (near copies), with an e-mail address added, or as they were."""
    rng = random.Random(5)
    pages = cc_web_pages(250)
    copies = []
    for i, page in enumerate(pages):
        text, kind = page["text"], i % 4
        if kind == 1:
            text = text.upper()
        elif kind == 2:
            words = text.split(" ")
            for _ in range(max(1, len(words) // 30)):
                words[rng.randrange(len(words))] = "zebra"
            text = " ".join(words)
        elif kind == 3:
            text += "\nWrite to jane.doe@example.org for more."
        copies.append({"id": f"copy{i}", "text": text, "metadata": {"url": f"https://copies.example/{i}"}})
    folder.mkdir()
    write_jsonl_gz(folder / "part0.jsonl.gz", pages)
    write_jsonl_gz(folder / "part1.jsonl.gz", copies)
    return [str(folder)]


def trusted_model(folder):
    """A small character model of random weights, for stage 6's perplexity: a ranking like any other."""
    import torch
    from model import GPT, GPTConfig
    from nanoforge.checkpoint import save_checkpoint
    from nanoforge.tokenizer import CharTokenizer
    tok = CharTokenizer("".join(chr(c) for c in range(32, 127)) + "\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    folder.mkdir()
    save_checkpoint(str(folder / "ckpt.pt"), model, {"tokenizer": tok.spec})
    return str(folder)


def test_curate_on_two_ray_nodes_writes_the_local_engines_bytes(cluster, tmp_path):
    """Every stage, the two stage 6 filters included (their keep-fractions cut by Ray Data's sort on the
    cluster, and the classifier's floor), gives the local engine's shards and report."""
    address, _ = cluster
    inputs = ",".join(planted(tmp_path / "raw"))
    stage6 = ["--model_filter=True", f"--model_source={trusted_model(tmp_path / 'trusted')}", "--model_keep_fraction=0.9",
              f"--classifier_reference={os.path.join(SHARED, 'data', 'tinystories', 'tinystories_valid_head.txt')}",
              "--classifier_train_docs=200", "--classifier_keep_fraction=0.9", "--classifier_min_score=0.3"]
    # the local engine into a folder, the Ray engine to a URL (file:// takes fsspec's path, as s3:// does): its
    # workers write the shards into the folder staged beside it there, moved in when whole
    outputs = {"local": tmp_path / "local" / "curated", "ray": tmp_path / "bucket" / "curated"}
    for engine, out in outputs.items():
        out.parent.mkdir()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "curate.py"), os.path.join(ROOT, "config", "curate_web.py"),
                               f"--input={inputs}", f"--output={out if engine == 'local' else out.as_uri()}",
                               f"--engine={engine}", f"--ray_address={address}",
                               "--num_proc=1", "--val_fraction=0.05", "--shard_bytes=30000", *stage6],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 Ray node(s)" in proc.stdout, proc.stdout
    assert os.listdir(tmp_path / "bucket") == ["curated"]  # nothing staged left beside it
    # the reports differ only in the output they name
    report_json = outputs["ray"] / "report.json"
    report_json.write_text(report_json.read_text().replace(outputs["ray"].as_uri(), str(outputs["local"])))
    names = same_folders(outputs["local"], outputs["ray"])  # shards, report.json, report.md, lengths.png
    assert {"train-00000.jsonl.gz", "train-00001.jsonl.gz", "val-00000.jsonl.gz", "report.json"} <= set(names)
    report = json.loads((outputs["ray"] / "report.json").read_text())
    assert report["summary"]["documents_in"] == 2 * 250
    for reason in ("dedup:exact", "dedup:near", "model:perplexity", "model:classifier"):  # the same ones by both
        assert report["drop_reasons"][reason] > 0, report["drop_reasons"]
    alive = report["summary"]["kept"] + report["drop_reasons"]["model:classifier"]  # those the classifier scored
    assert report["drop_reasons"]["model:classifier"] > alive - math.ceil(0.9 * alive)  # the floor took some too
    assert report["classifier"]["lowest_score_kept"] >= 0.3


def test_connected_components_on_the_workers_match_one_machines(cluster):
    """Near-duplicate clusters computed by groupbys on the workers (ray_data.components) are the ones
    stages.components finds in one process: each node of a component names its smallest node, chains
    (a ~ b ~ c with a, c unlike) and self-links included."""
    import numpy as np
    from nanoforge import ray_data
    from nanoforge.curation import stages
    address, _ = cluster
    rng = np.random.default_rng(7)
    n = 400
    u, v = rng.integers(0, n, 300), rng.integers(0, n, 300)
    u, v = np.append(u, [5, 6, 7, 9]), np.append(v, [6, 7, 8, 9])  # a chain 5-6-7-8, a self-link
    ray_data.connect(address)
    try:
        edges = ray.data.from_items([{"u": int(a), "v": int(b)} for a, b in zip(u, v)], override_num_blocks=4)
        found = ray_data.components(edges)
    finally:
        ray.shutdown()
    root = stages.components(u, v, n)
    assert found == {i: int(root[i]) for i in range(n) if root[i] != i}
    assert found[8] == root[5] <= 5  # the chain's far end goes with its first node
