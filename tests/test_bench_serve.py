"""
bench_serve.py end to end: serve.py started on a tiny random model, streamed to by one and two clients,
beside llama.cpp's llama-server on the same weights where it is at hand, and malformed options. Speeds
depend on the machine, so these assert what is reported and how the figures relate, never how fast.
"""
import json
import os

import pytest

from conftest import assert_one_line_error, machine_of, run  # noqa: E402
from nanoforge import gguf_format

TINY = ("--shapes=1x2x32", "--block_size=64", "--clients=1 2", "--completion_tokens=4", "--prompt_len=4",
        "--device=cpu", "--dtype=float32")


def run_bench_serve(*args):
    return run("bench_serve.py", *args, check=False, timeout=600)


@pytest.mark.slow
def test_bench_serve_streams_from_concurrent_clients(tmp_path):
    out_json = tmp_path / "serve.json"
    r = run_bench_serve(*TINY, "--engines=serve.py", f"--json_out={out_json}")
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(out_json.read_text())
    assert machine_of(r.stdout, results)["memory_gb_s"] > 0
    rows = results["serve"]
    assert [(row["engine"], row["shape"], row["clients"]) for row in rows] == [("serve.py", "1x2x32", 1),
                                                                              ("serve.py", "1x2x32", 2)]
    for row in rows:
        assert row["tokens"] == 4 * row["clients"]  # every request streamed its completion tokens to [DONE]
        assert row["speedup"] == pytest.approx(row["together_tokens_per_s"] / row["one_at_a_time_tokens_per_s"])
        # the first token comes before the whole run of the clients together is over
        together_s = row["tokens"] / row["together_tokens_per_s"]
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] < together_s
    assert "| serve.py | 1x2x32 | 2 |" in r.stdout and "first token p50 / p95 (ms)" in r.stdout  # the summary table
    assert "llama-server" not in r.stdout  # not asked for


@pytest.mark.slow
@pytest.mark.skipif(not gguf_format.llama_cpp_program("llama-server"),
                    reason="llama.cpp's llama-server is not on PATH or in $LLAMA_CPP_BIN")
@pytest.mark.parametrize("quantize, gguf_type", [("int8", "q8_0"), ("bf16", "f16")])
def test_bench_serve_sets_serve_py_beside_llama_server_on_the_same_weights(tmp_path, quantize, gguf_type):
    """With llama-server at hand, the int8 (bf16) serve.py and llama-server on the q8_0 (f16) GGUF of the same
    weights take turns at each level, and serve.py's rows give their rates against llama-server's there."""
    out_json = tmp_path / "serve.json"
    r = run_bench_serve(*TINY, f"--quantize={quantize}", f"--json_out={out_json}")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out_json.read_text())["serve"]
    assert [(row["engine"], row["clients"]) for row in rows] == [("serve.py", 1), ("llama-server", 1),
                                                                 ("serve.py", 2), ("llama-server", 2)]
    for ours, theirs in (rows[:2], rows[2:]):
        assert 0 < theirs["tokens"] <= 4 * theirs["clients"]  # streamed to [DONE], usage counted
        assert 0 < theirs["ttft_p50_s"] <= theirs["ttft_p95_s"]
        for key in ("one_at_a_time_tokens_per_s", "together_tokens_per_s"):
            assert ours["vs_llama_server"][key] == pytest.approx(ours[key] / theirs[key])
        assert "vs_llama_server" not in theirs
    assert f"llama-server on the same weights in GGUF {gguf_type}" in r.stdout
    vs = rows[2]["vs_llama_server"]
    assert (f"| serve.py | 1x2x32 | 2 | {rows[2]['one_at_a_time_tokens_per_s']:,.1f} |" in r.stdout
            and f"| {vs['one_at_a_time_tokens_per_s']:.2f}x / {vs['together_tokens_per_s']:.2f}x |" in r.stdout)


def test_bench_serve_bad_options_are_one_line_errors(tmp_path):
    assert_one_line_error(run_bench_serve("--shapes=4x4", "--device=cpu"), "shapes")
    assert_one_line_error(run_bench_serve("--engines=vllm", "--device=cpu"), "engines", "vllm")
    # asked for llama-server alone where there is none: say so, rather than measure nothing
    env = {**os.environ, "LLAMA_CPP_BIN": str(tmp_path)}
    assert_one_line_error(run("bench_serve.py", "--engines=llama-server", check=False, env=env),
                          "llama-server is not in $LLAMA_CPP_BIN", "--engines")
