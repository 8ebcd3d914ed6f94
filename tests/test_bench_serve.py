"""
bench_serve.py end to end: serve.py started on a tiny random model, streamed to by one and two clients,
and a malformed shape. Speeds depend on the machine, so these assert what is reported and how the
figures relate, never how fast.
"""
import json

import pytest

from conftest import assert_one_line_error, machine_of, run  # noqa: E402


def run_bench_serve(*args):
    return run("bench_serve.py", *args, check=False, timeout=600)


@pytest.mark.slow
def test_bench_serve_streams_from_concurrent_clients(tmp_path):
    out_json = tmp_path / "serve.json"
    r = run_bench_serve("--shapes=1x2x32", "--block_size=64", "--clients=1 2", "--completion_tokens=4",
                        "--prompt_len=4", "--device=cpu", "--dtype=float32", f"--json_out={out_json}")
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(out_json.read_text())
    assert machine_of(r.stdout, results)["memory_gb_s"] > 0
    rows = results["serve"]
    assert [(row["shape"], row["clients"]) for row in rows] == [("1x2x32", 1), ("1x2x32", 2)]
    for row in rows:
        assert row["tokens"] == 4 * row["clients"]  # every request streamed its completion tokens to [DONE]
        assert row["speedup"] == pytest.approx(row["together_tokens_per_s"] / row["one_at_a_time_tokens_per_s"])
        # the first token comes before the whole run of the clients together is over
        together_s = row["tokens"] / row["together_tokens_per_s"]
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] < together_s
    assert "| 1x2x32 | 2 |" in r.stdout and "first token p50 / p95 (ms)" in r.stdout  # the summary table


def test_bench_serve_bad_shape_is_one_line_error():
    assert_one_line_error(run_bench_serve("--shapes=4x4", "--device=cpu"), "shapes")
