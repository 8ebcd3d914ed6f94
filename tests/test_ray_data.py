"""
The Ray engine of the data scripts (--engine=ray) on a real Ray cluster of two nodes on this machine
(Ray's own cluster_utils: a head and a second node, each a raylet with its own workers): the same bytes
as the local engine, a worker killed mid-run retried by Ray with the same output, errors in one line.
"""
import filecmp
import json
import os
import random

import pytest

from conftest import ROOT, SHARED, assert_one_line_error, run  # noqa: E402

ray = pytest.importorskip("ray")  # a test dependency (pyproject's test extra): present in CI
PREPARE = os.path.join(ROOT, "data", "your_text", "prepare.py")
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


def corpus(folder):
    """Each kind of input the script reads, in nested folders: the raw Common Crawl pages beside the repo
    (.jsonl.gz), a .parquet file with unicode and an empty document, and .txt files (one document each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(3)
    words = "the a cat runs over lazy fox naïve café 日本語 🦊 <|endoftext|>".split()
    doc = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 300)))  # noqa: E731
    (folder / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": [doc() if i != 7 else "" for i in range(200)]}), folder / "sub" / "b.parquet")
    for i in range(4):
        (folder / f"t{i}.txt").write_text(doc(), encoding="utf-8")
    return [os.path.join(SHARED, "data", "cc_web"), str(folder)]


def same_folders(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:  # every token file and meta.json, byte for byte
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    return names


def test_prepare_on_two_ray_nodes_writes_the_local_engines_bytes_even_when_a_worker_dies(cluster, tmp_path):
    address, armed = cluster
    inputs = corpus(tmp_path / "raw")
    args = ["--input", *inputs, "--shard_tokens=20000", "--min_val_tokens=3000", "--num_proc=1"]
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
    assert meta["train_documents"] + meta["val_documents"] == 697 + 200 + 4 and meta["val_tokens"] >= 3000
    assert sorted(os.listdir(tmp_path)) == ["local", "raw", "ray"]  # nothing half-made left beside them


def test_ray_engine_errors_are_one_line(cluster, tmp_path):
    address, _ = cluster
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "good.jsonl").write_text('{"text": "fine"}\n' * 20)
    (tmp_path / "raw" / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    ray_args = ["--engine=ray", f"--ray_address={address}"]
    # a line that is not JSON, found on a worker: its file and line, no traceback
    proc = run(PREPARE, f"--input={tmp_path / 'raw'}", f"--out_dir={tmp_path / 'x'}", *ray_args, check=False)
    assert_one_line_error(proc, f"{tmp_path / 'raw' / 'bad.jsonl'} line 2")
    proc = run(PREPARE, f"--input={tmp_path / 'raw' / 'good.jsonl'}", "--text_field=body", f"--out_dir={tmp_path / 'x'}",
               *ray_args, check=False)
    assert_one_line_error(proc, "no field 'body'")
    proc = run(PREPARE, "--dataset=openwebtext", f"--out_dir={tmp_path / 'x'}", *ray_args, check=False)
    assert_one_line_error(proc, "--engine=ray reads --input")
    assert not os.path.exists(tmp_path / "x")
