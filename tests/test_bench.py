"""
bench.py end to end, as a user runs it: a subprocess on a tiny model (a few seconds), and a typo.
Speeds depend on the machine, so these assert what is reported and how the figures relate, never how fast.
"""
import json
import os
import subprocess
import sys

import pytest

from nanoforge import gguf_format, hardware

from conftest import ROOT, assert_one_line_error, machine_of, run  # noqa: E402
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--vocab_size=100",
        "--batch_size=4", "--warmup_steps=1", "--timed_steps=3", "--gen_tokens=40", "--device=cpu"]


def run_bench(*args):
    return run("bench.py", *args, check=False, timeout=120)


def test_bench_machine_mode_names_the_cpu_and_its_figures(tmp_path):
    out_json = tmp_path / "machine.json"
    r = run_bench("--mode=machine", "--device=cpu", f"--json_out={out_json}")
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads(out_json.read_text())["machine"]
    info = hardware.cpu_info()
    assert m["cpu"] == info and m["name"] == hardware.describe_cpu(info)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("machine:")]
    assert line == [m["line"]] and info["name"] in m["line"] and info["isa"] in m["line"]
    # fp32 and bf16 matmuls, bf16 at 256^3 where it is emulated (a 1024^3 one would take seconds)
    assert set(m["matmul_gflops"]) == {"float32", "bfloat16"} and all(v > 0 for v in m["matmul_gflops"].values())
    assert m["matmul_n"] == {"float32": 1024, "bfloat16": 1024 if info["native_bf16"] else 256}
    assert m["line"].count("GFLOP/s") + m["line"].count("TFLOP/s") == 2
    assert m["memory_gb_s"] > 0 and f"memory {m['memory_gb_s']:.1f} GB/s" in m["line"]
    # conftest's OMP_NUM_THREADS, inherited: the line says what the figures ran on
    assert m["threads"] == int(os.environ["OMP_NUM_THREADS"]) and f"{m['threads']} thread" in m["line"]


@pytest.mark.slow
def test_bench_tiny_model_both_modes(tmp_path):
    # gen_tokens 40 > block_size 32 with a 16-token prompt: the cached path also crosses block_size
    out_json = tmp_path / "bench.json"
    r = run_bench(*TINY, f"--json_out={out_json}")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    train = [ln for ln in lines if ln.startswith("train:") and "tokens/s" in ln]
    gen = [ln for ln in lines if ln.startswith("generate:") and "tokens/s" in ln]
    assert train and "ms/step" in train[0], r.stdout
    assert gen and gen[0].count("tokens/s") == 2 and "speedup" in gen[0], r.stdout
    assert "outputs: identical (40 tokens x 1 rows)" in r.stdout, r.stdout
    assert "MFU" in r.stdout and "peak memory" in r.stdout
    results = json.loads(out_json.read_text())
    assert results["generate"]["identical"] is True
    assert results["train"]["tokens_per_s"] > 0 and results["generate"]["speedup"] > 0
    assert results["config"]["n_layer"] == 2 and results["resolved"]["device"] == "cpu"
    m = machine_of(r.stdout, results)
    assert m["name"] == hardware.describe_cpu() and m["memory_gb_s"] > 0 and m["matmul_gflops"]["float32"] > 0


@pytest.mark.slow
def test_bench_generate_reports_the_bandwidth_bound_and_progress(tmp_path):
    # block_size 256: the cached path stays inside its cache, where the bound holds
    out_json = tmp_path / "gen.json"
    r = run_bench(*TINY, "--mode=generate", "--block_size=256", "--gen_tokens=130", "--dtype=float32",
                  f"--json_out={out_json}")
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(out_json.read_text())
    m, gen = machine_of(r.stdout, results), results["generate"]
    # every weight once a token, in fp32: 2 layers of 64 channels, the 100-token (tied) head, norms, biases
    params = 100 * 64 + 2 * (64 * 192 + 192 + 64 * 64 + 64 + 64 * 256 + 256 + 256 * 64 + 64 + 4 * 64) + 2 * 64
    assert gen["bytes_per_param"] == 4 and gen["weight_bytes_per_token"] == 4 * params
    assert gen["memory_gb_s"] == m["memory_gb_s"]  # the machine line's bandwidth, not a second measurement
    bound = gen["memory_gb_s"] * 1e9 / gen["weight_bytes_per_token"]  # tokens/s
    assert gen["bandwidth_bound_tokens_per_s"] == pytest.approx(bound)
    assert gen["fraction_of_bound"] == pytest.approx(gen["tokens_per_s_kv_cache"] / gen["bandwidth_bound_tokens_per_s"])
    # the KV cache reads left out of the bound: keys and values, 2 layers x 64 channels x the mean context
    mean_context = sum(16 + i for i in range(130)) / 130
    assert gen["kv_cache_bytes_per_token"] == pytest.approx(2 * 2 * 64 * mean_context * 4)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("bound:")]
    assert len(line) == 1 and f"{bound:,.1f} tokens/s" in line[0] and "does not hold" not in line[0], r.stdout
    # a progress line every 64 tokens, for both paths (each run is silent for minutes at the 124M shape)
    progress = [ln for ln in r.stdout.splitlines() if ln.startswith("progress:")]
    for label in ("with KV cache", "without KV cache"):
        for n in (64, 128):
            assert any(f"progress: {label} {n}/130 tokens" in ln for ln in progress), r.stdout


def test_bench_bad_key_is_one_line_error():
    r = run_bench("--n_layyer=2")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "n_layer" in r.stderr  # names the key that was meant


def test_bench_bad_mode_is_one_line_error():
    r = run_bench(*TINY, "--mode=both")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error: mode must be" in r.stderr
    # the modes that became their own scripts: the error names them
    r = run_bench(*TINY, "--mode=ttl")
    assert r.returncode == 2 and "bench_time_to_loss.py" in r.stderr and "bench_serve.py" in r.stderr


@pytest.mark.slow
def test_bench_memory_mode_compares_gradient_checkpointing(tmp_path):
    out_json = tmp_path / "memory.json"
    r = run_bench(*TINY, "--mode=memory", "--repeats=1", f"--json_out={out_json}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gradient_checkpointing=False" in r.stdout and "gradient_checkpointing=True" in r.stdout
    results = json.loads(out_json.read_text())
    assert results["with"][0]["peak_memory_bytes"] > 0 and results["without"][0]["peak_memory_bytes"] > 0
    assert results["time_ratio"] > 0 and len(results["loads"]) == 2
    assert machine_of(r.stdout, results)["name"] == hardware.describe_cpu()


@pytest.mark.slow
def test_bench_fsdp_mode_shards_the_state(tmp_path):
    out_json = tmp_path / "fsdp.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "bench.py", *TINY[:6], "--device=cpu", "--mode=fsdp", f"--json_out={out_json}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = json.loads(out_json.read_text())["ranks"]
    assert r.stdout.count("machine: ") == 1  # rank 0 only
    assert json.loads(out_json.read_text())["machine"]["memory_gb_s"] > 0
    # 2 layers of 64 channels, 100-token vocabulary, 32 positions, biases: the whole model's fp32 bytes
    whole = 4 * sum([
        100 * 64, 32 * 64, *[64 * 192 + 192 + 64 * 64 + 64 + 64 * 256 + 256 + 256 * 64 + 64 + 4 * 64] * 2, 2 * 64])
    assert sum(r["params"] for r in ranks) == sum(r["grads"] for r in ranks) == whole
    assert all(r["params"] < whole * 0.6 for r in ranks)  # each rank holds about half
    assert sum(r["optimizer"] for r in ranks) >= 2 * whole  # Adam's two moments, sharded the same way


def test_synchronize_and_peak_memory_on_cpu():
    # a CPU has no queue to wait for; its peak memory is this process's peak RSS, in bytes (KiB on Linux x 1024)
    import resource

    import torch
    hardware.synchronize("cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak, source = hardware.peak_memory("cpu")
    assert source == "peak RSS of this process"
    assert peak >= before * (1 if sys.platform == "darwin" else 1024) and peak > torch.ones(1).nbytes


def test_bench_decode_compares_the_engines_on_the_same_weights(tmp_path):
    """bench_decode.py on a tiny random model: nanoforge float32, bf16 and int8, float32 on torch's matmuls alone,
    and transformers on the same weights, tokens/s and ratios as printed and in the JSON, and how many
    greedy tokens each shares with float32 (the reference and transformers compute our model in float32:
    all of them). llama.cpp's rows need llama-bench: left out."""
    out_json = tmp_path / "decode.json"
    r = run("bench_decode.py", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--gen_tokens=24",
            "--repeats=1", "--engines=nanoforge,nanoforge-bf16,nanoforge-int8,nanoforge-torch,transformers",
            f"--json_out={out_json}", check=False, timeout=600)  # conftest set TIKTOKEN_CACHE_DIR
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(out_json.read_text())
    assert machine_of(r.stdout, results)["memory_gb_s"] > 0
    rows = results["results"]
    assert list(rows) == ["nanoforge", "nanoforge-bf16", "nanoforge-int8", "nanoforge-torch", "transformers"]
    assert "nanoforge multiplies on nanoforge's CPU kernels" in r.stdout  # this machine has them: they are timed
    base = rows["nanoforge"]["tokens_per_s"]
    for engine in ("nanoforge-bf16", "nanoforge-int8", "nanoforge-torch", "transformers"):
        assert rows[engine]["tokens_per_s"] > 0
        assert f"({rows[engine]['tokens_per_s'] / base:.2f}x nanoforge float32)" in r.stdout
        assert 0 <= rows[engine]["same_tokens"] <= 24
    assert all(row["tokens_per_s_repeats"] == [row["tokens_per_s"]] for row in rows.values())  # one repeat each
    assert rows["transformers"]["same_tokens"] == 24 and rows["transformers"]["class"] == "GPT2LMHeadModel"
    assert rows["nanoforge-torch"]["same_tokens"] == 24
    # the rate counts the steps after the first token: one token has none to count
    assert_one_line_error(run("bench_decode.py", "--gen_tokens=1", check=False), "gen_tokens", "an int >= 2")


@pytest.mark.skipif(not gguf_format.llama_cpp_program("llama-bench"),
                    reason="llama.cpp's llama-bench is not on PATH or in $LLAMA_CPP_BIN")
def test_bench_decode_sets_nanoforge_beside_llama_cpp_at_each_precision(tmp_path):
    """With llama-bench at hand, its f32, f16 and q8_0 rows run on our weights in GGUF, taking turns with ours, and
    each nanoforge row gives its ratio to llama.cpp at its own precision."""
    out_json = tmp_path / "decode.json"
    r = run("bench_decode.py", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--gen_tokens=24",
            "--repeats=2", "--engines=nanoforge,nanoforge-bf16,nanoforge-int8,llama.cpp-f32,llama.cpp-f16,"
            "llama.cpp-q8_0", f"--json_out={out_json}", check=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out_json.read_text())["results"]
    assert sorted(rows) == ["llama.cpp-f16", "llama.cpp-f32", "llama.cpp-q8_0", "nanoforge", "nanoforge-bf16",
                            "nanoforge-int8"]
    assert all(rows[f"llama.cpp-{t}"]["tokens_per_s"] > 0 for t in ("f32", "f16", "q8_0"))
    for engine, peer in (("nanoforge", "f32"), ("nanoforge-bf16", "f16"), ("nanoforge-int8", "q8_0")):
        assert rows[engine]["vs_llama_cpp"] > 0
        lo, hi = rows[engine]["vs_llama_cpp_range"]
        assert lo <= rows[engine]["vs_llama_cpp"] <= hi and len(rows[engine]["tokens_per_s_repeats"]) == 2
        assert f"{rows[engine]['vs_llama_cpp']:.2f}x llama.cpp's {peer} ({lo:.2f}-{hi:.2f}x in 2 repeats)" in r.stdout


def test_bench_data_times_the_engines_on_one_corpus(tmp_path):
    """bench_data.py with the local engine on one copy of the Common Crawl sample: the machine line, the
    corpus size, each run's time and the median's documents per second per core, as printed and in the
    JSON (the Ray and datatrove rows are the same code path with another command: not run here)."""
    out_json = tmp_path / "data.json"
    r = run("bench_data.py", "--engines=local", "--copies=1", "--repeats=1", f"--json_out={out_json}", check=False,
            timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(out_json.read_text())
    assert machine_of(r.stdout, results)["memory_gb_s"] > 0
    assert results["documents"] == 697 and "corpus: 697 documents" in r.stdout
    local = results["engines"]["local"]
    assert len(local["seconds"]) == 1 and local["median_s"] == local["seconds"][0] > 0
    assert local["docs_per_s_per_core"] == 697 / local["median_s"] / results["cores"]
    assert f"{local['docs_per_s_per_core']:,.0f} documents/s per core" in r.stdout
    bad = run("bench_data.py", "--engines=spark", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: engines: 'spark' is not one of local, ray, ray-2nodes, datatrove"
