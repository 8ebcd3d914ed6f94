"""
datatrove's curation pipeline, shaped as curate.py's, for bench_data.py to time beside ours: read JSONL,
keep English (py3langid, the identifier curate.py uses: datatrove's own fastText model is a download),
Gopher repetition and quality filters, PII formatting, then MinHash deduplication with word pairs and the
bands and rows curate.py uses (SHA-1 shingle hashes as datasketch's; signatures, buckets, clusters in one
task as datatrove does, the filter), written as JSONL. On datatrove's local executor with this machine's cores. Needs datatrove and spacy.

$ python dev/datatrove_curate.py INPUT_FOLDER OUTPUT_FOLDER WORK_FOLDER SHINGLE_WORDS BANDS ROWS
(bench_data.py passes curate.py's shingle size and the bands and rows its threshold gives)
"""
import os
import sys


def english(doc):
    from nanoforge.curation import stages
    return stages.language(doc.text)[0] == "en"


def main(source, output, work, shingle, b, r):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                          MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, LambdaFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    # shingles hashed with SHA-1, as datasketch (ours) does; datatrove's default xxhash wrapper hands
    # xxhash 4 a str, which it refuses
    minhash = MinhashConfig(n_grams=shingle, num_buckets=b, hashes_per_bucket=r,
                            hash_config=HashConfig(precision=64, hash_fc="sha1"))
    tasks = len([f for f in os.listdir(source) if f.endswith((".jsonl", ".jsonl.gz"))])
    steps = [  # (pipeline, tasks): each step runs after the one before
        ([JsonlReader(source), LambdaFilter(english), GopherRepetitionFilter(), GopherQualityFilter(), PIIFormatter(),
          JsonlWriter(f"{work}/filtered"), MinhashDedupSignature(f"{work}/signatures", config=minhash)], tasks),
        ([MinhashDedupBuckets(f"{work}/signatures", f"{work}/buckets", config=minhash)], b),
        ([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove_ids", config=minhash)], 1),
        ([JsonlReader(f"{work}/filtered"), MinhashDedupFilter(f"{work}/remove_ids"), JsonlWriter(output)], tasks),
    ]
    before = None
    for k, (pipeline, n) in enumerate(steps):
        before = LocalPipelineExecutor(pipeline, tasks=n, workers=min(n, os.cpu_count()),
                                       logging_dir=f"{work}/logs{k}", depends=before)
    before.run()


if __name__ == "__main__":  # datatrove's workers start from a fresh interpreter that imports this file
    main(*sys.argv[1:4], *map(int, sys.argv[4:7]))
