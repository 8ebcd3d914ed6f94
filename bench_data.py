"""
Curation speed on one corpus in every engine at hand, in one run: curate.py with the local engine, with
--engine=ray on a Ray it starts itself (this machine's cores), and on a Ray cluster of two nodes of one
CPU each (Ray's cluster_utils, started here beforehand, as a user's cluster would be); and datatrove (its
Gopher filters and MinHash deduplication, with the same language identifier as ours, on its local
executor) as the anchor. Each run is a whole process, timed wall to wall, the engines in turn, `repeats`
times; medians, documents per second per core, and the machine line first.

    python bench_data.py                                   # 10 marked copies of ../shared's cc_web pages
    python bench_data.py --input=/data/web --engines=local,datatrove --repeats=1

The default corpus: copies of the Common Crawl sample with every line of copy k prefixed `v<k> ` (plain
copies would make every line a repeated line, which cleanup removes), so each page has near-duplicates
in the other copies. The work differs in its details: curate.py also cleans up, filters harmful pages,
removes exact duplicates and personal data and writes the report; datatrove runs what it has of those
(Gopher repetition and quality, PII formatting, MinHash) with MinHash shaped as ours (word pairs, the
same bands and rows), and language identification by py3langid, as ours (its own fastText model is a
download).
"""
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from configurator import POSITIVE_INT, check_ranges, configure, knobs
from nanoforge import errors, hardware

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
input = ''  # files or a folder of JSONL documents; '' builds the default corpus from ../shared's cc_web
copies = 10  # the default corpus: this many marked copies of the sample
engines = 'local,ray,ray-2nodes,datatrove'  # those to run (datatrove when installed: pip install datatrove)
repeats = 3  # runs of each engine, in turn; medians reported
curate_config = 'config/curate_web.py'
json_out = ''
# -----------------------------------------------------------------------------------------------------
config = configure(knobs(globals()), sys.argv[1:])
globals().update(config)
check_ranges(config, {k: POSITIVE_INT for k in ('copies', 'repeats')})
ROOT = os.path.dirname(os.path.abspath(__file__))
KNOWN = ('local', 'ray', 'ray-2nodes', 'datatrove')


wanted = [e for e in engines.split(',') if e]
if unknown := [e for e in wanted if e not in KNOWN]:
    raise errors.UserError(f"engines: {unknown[0]!r} is not one of {', '.join(KNOWN)}")
if 'datatrove' in wanted:
    try:
        import datatrove  # noqa: F401
    except ImportError:
        print("datatrove is not installed (pip install datatrove): left out")
        wanted.remove('datatrove')

machine = hardware.machine_line('cpu')
work, cluster = tempfile.mkdtemp(prefix="bench_data."), None
try:
    source = input
    if not source:  # the default corpus
        sample = os.path.join(ROOT, "..", "shared", "data", "cc_web")
        if not os.path.isdir(sample):
            raise errors.UserError(f"no --input given and no Common Crawl sample at {sample}: pass --input=FOLDER")
        pages = [json.loads(line) for f in sorted(os.listdir(sample)) if f.endswith(".jsonl.gz")
                 for line in gzip.open(os.path.join(sample, f), "rt")]
        source = os.path.join(work, "input")
        os.makedirs(source)
        for k in range(copies):
            with gzip.open(os.path.join(source, f"copy{k:03d}.jsonl.gz"), "wt") as f:
                for i, page in enumerate(pages):
                    text = "\n".join(f"v{k} {line}" if line.strip() else line for line in page["text"].split("\n"))
                    f.write(json.dumps({"id": f"c{k}-{i}", "text": text}) + "\n")
    documents = sum(1 for f in sorted(os.listdir(source)) if f.endswith(".jsonl.gz")
                    for _ in gzip.open(os.path.join(source, f), "rt"))
    print(f"corpus: {documents:,} documents in {source}")

    if 'ray-2nodes' in wanted:  # started before the clock, as a user's cluster is already up
        from ray.cluster_utils import Cluster
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()

    import curate
    from nanoforge.curation import stages
    bands = stages.lsh_shape(curate.DEFAULTS["minhash_threshold"], curate.DEFAULTS["minhash_num_perm"])  # (b, r)
    minhash_shape = [str(curate.DEFAULTS["minhash_shingle_size"]), *map(str, bands)]  # datatrove's, as ours

    def command(engine, output):
        if engine == 'datatrove':
            return [sys.executable, os.path.join(ROOT, "dev", "datatrove_curate.py"), source, output, f"{output}.work",
                    *minhash_shape]
        args = [sys.executable, os.path.join(ROOT, "curate.py"), os.path.join(ROOT, curate_config),
                f"--input={source}", f"--output={output}"]
        if engine == 'ray':  # a Ray of its own on this machine, not the two-node cluster also running here
            args += ["--engine=ray", "--ray_address=local"]
        elif engine == 'ray-2nodes':
            args += ["--engine=ray", f"--ray_address={cluster.address}"]
        return args

    times = {e: [] for e in wanted}
    for rep in range(repeats):
        for engine in wanted:
            output = os.path.join(work, f"out-{engine}-{rep}")
            t = time.perf_counter()
            done = subprocess.run(command(engine, output), capture_output=True, text=True)
            seconds = time.perf_counter() - t
            if done.returncode != 0:
                raise errors.UserError(f"{engine} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            times[engine].append(seconds)
            shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(f"{output}.work", ignore_errors=True)
            print(f"  run {rep + 1}: {engine} {seconds:.1f} s", flush=True)

    cores = os.cpu_count()
    results = {}
    for engine in wanted:
        med = statistics.median(times[engine])
        results[engine] = {"seconds": times[engine], "median_s": med, "docs_per_s_per_core": documents / med / cores}
        ratio = "" if engine == wanted[0] else f" ({med / statistics.median(times[wanted[0]]):.2f}x {wanted[0]}'s time)"
        print(f"{engine:>11}: {med:6.1f} s median of {len(times[engine])} "
              f"({', '.join(f'{s:.1f}' for s in times[engine])}), "
              f"{documents / med / cores:,.0f} documents/s per core{ratio}")
    if json_out:
        from nanoforge.files import write_json
        write_json(json_out, {"machine": machine, "documents": documents, "cores": cores, "engines": results})
finally:  # the two-node cluster goes too when a run fails
    if cluster is not None:
        cluster.shutdown()
    shutil.rmtree(work, ignore_errors=True)
