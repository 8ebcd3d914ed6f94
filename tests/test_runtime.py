"""
nanoforge.hardware, errors, files, parallel: device, precision and compile choices refuse what this machine cannot do, with a fix in
the message; a UserError ends a script with one line and status 2; files are written atomically.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from nanoforge import errors, files, hardware, parallel
from nanoforge.errors import UserError

from conftest import ROOT  # noqa: E402


def no_gpu(monkeypatch):
    """This machine, anywhere: CUDA and MPS unavailable."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_resolve_device(monkeypatch):
    no_gpu(monkeypatch)
    assert hardware.resolve_device("cpu") == ("cpu", "as configured")
    device, reason = hardware.resolve_device("auto")
    assert device == "cpu" and reason.startswith("auto")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        hardware.resolve_device("gpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_resolve_device_cuda_without_gpu(device, monkeypatch):
    no_gpu(monkeypatch)
    with pytest.raises(UserError, match="--device=cpu"):
        hardware.resolve_device(device)
    with pytest.raises(UserError, match="--device=cpu"):
        hardware.resolve_device("mps")


def fake_cpu(monkeypatch, native_bf16, fp32, bf16):
    """This CPU, as resolve_dtype sees it: its class, and matmul rates (FLOP/s) by dtype."""
    info = {"name": "Test CPU", "isa": "AVX-512" if native_bf16 else "AVX2", "native_bf16": native_bf16, "cores": 2}
    monkeypatch.setattr(hardware, "cpu_info", lambda: info)
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda device, dtype, shape: fp32 if dtype == "float32" else bf16)


def test_resolve_dtype_picks_bf16_only_where_it_is_measured_faster(monkeypatch):
    fake_cpu(monkeypatch, native_bf16=True, fp32=150e9, bf16=400e9)  # Zen 4: AVX-512 BF16
    dtype, reason = hardware.resolve_dtype("auto", "cpu", (8192, 192))
    assert dtype == "bfloat16" and "2.7x" in reason and "400 GFLOP/s bf16 vs 150 GFLOP/s fp32" in reason
    assert "2048x192x768" in reason  # the model's own MLP shape, rows capped
    fake_cpu(monkeypatch, native_bf16=True, fp32=100e9, bf16=110e9)  # native, but not clearly faster
    assert hardware.resolve_dtype("auto", "cpu", (8192, 192))[0] == "float32"
    fake_cpu(monkeypatch, native_bf16=True, fp32=100e9, bf16=400e9)  # a tiny model is not even measured
    dtype, reason = hardware.resolve_dtype("auto", "cpu", (128, 32))
    assert dtype == "float32" and "too small" in reason
    fake_cpu(monkeypatch, native_bf16=False, fp32=100e9, bf16=0.2e9)  # Zen 3: AVX2, bf16 emulated
    dtype, reason = hardware.resolve_dtype("auto", "cpu", (8192, 192))
    assert dtype == "float32" and "bf16 emulated" in reason and "0.2 GFLOP/s bf16" in reason
    # asked for anyway: it runs, and the reason gives the measured slowdown
    dtype, reason = hardware.resolve_dtype("bfloat16", "cpu")
    assert dtype == "bfloat16" and "500x slower" in reason and "--dtype=auto" in reason


def test_resolve_dtype_checks_names_and_devices():
    assert hardware.resolve_dtype("float32", "cpu") == ("float32", "as configured")
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        hardware.resolve_dtype("float16", "cpu")
    with pytest.raises(UserError, match="unknown dtype 'fp32'"):
        hardware.resolve_dtype("fp32", "cpu")


def test_cpu_info_honours_onednn_cap():
    # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bf16 on any CPU: the capability says so, and the measured
    # bf16 rate agrees, so auto picks fp32 (on a CPU without native bf16 the cap changes nothing)
    proc = subprocess.run([sys.executable, "-c", "from nanoforge import errors, files, hardware, parallel; print(hardware.cpu_info()['native_bf16'], "
                           "hardware.resolve_dtype('auto', 'cpu', (2048, 256))[0])"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.stdout.split() == ["False", "float32"], proc.stderr
    info = hardware.cpu_info()
    assert info["name"] and info["isa"] in ("AMX", "AVX-512", "AVX2", "NEON", "SSE") and info["cores"] >= 1
    assert info["name"] in hardware.describe_cpu(info)


def test_format_flops_never_prints_zero():
    assert hardware.format_flops(0.2e9) == "0.2 GFLOP/s"
    assert hardware.format_flops(415e9) == "415 GFLOP/s"
    assert hardware.format_flops(312e12) == "312.0 TFLOP/s"
    assert hardware.measure_matmul_flops("cpu", "float32", (64, 32, 16)) > 0


def test_newton_schulz_follows_the_runs_precision():
    assert hardware.newton_schulz_dtype("bfloat16") == torch.bfloat16
    assert hardware.newton_schulz_dtype("float32") == hardware.newton_schulz_dtype("float16") == torch.float32


def test_resolve_compile(monkeypatch):
    assert hardware.resolve_compile(True, "cpu") == (True, "as configured")
    assert hardware.resolve_compile(False, "cuda") == (False, "as configured")
    assert hardware.resolve_compile("auto", "cuda")[0] is True
    # a CPU compiles only a run long enough to repay it, and only with a C++ compiler for inductor
    on, why = hardware.resolve_compile("auto", "cpu", expected_seconds=17)
    assert on is False and "~17s run does not repay" in why
    monkeypatch.setattr(hardware, "cpp_compiler", lambda: "/usr/bin/g++")
    assert hardware.resolve_compile("auto", "cpu", expected_seconds=300)[0] is True
    monkeypatch.setattr(hardware, "cpp_compiler", lambda: None)
    on, why = hardware.resolve_compile("auto", "cpu", expected_seconds=300)
    assert on is False and "no C++ compiler" in why
    with pytest.raises(UserError, match="compile must be True, False or 'auto'"):
        hardware.resolve_compile("yes", "cpu")


def test_failed_compile_falls_back_to_eager():
    # what a laptop without a C++ compiler meets: inductor fails at the first call; the run goes on eager
    model, lines = torch.nn.Linear(4, 4), []

    def warmup(m):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\n(long compiler output)")

    used, _ = hardware.compile_model(model, warmup, lines.append)
    assert used is model and len(lines) == 1 and "training eager" in lines[0] and "CppCompileError" in lines[0]
    ok, _ = hardware.compile_model(model, lambda m: m(torch.ones(1, 4)).sum().item(), lines.append)
    assert ok is not model and len(lines) == 1


def test_compile_whose_loss_is_not_finite_falls_back_to_eager():
    # torch 2.13's AVX2 kernels at one CPU thread gave a nan loss where eager gave a finite one
    model, lines = torch.nn.Linear(4, 4), []
    used, _ = hardware.compile_model(model, lambda m: 2.5 if m is model else float("nan"), lines.append)
    assert used is model and len(lines) == 1 and "nan where eager gives 2.5000" in lines[0]
    # a loss that is not finite eagerly either is the run's problem (train.py stops on it), not compile's
    lines.clear()
    used, _ = hardware.compile_model(model, lambda m: float("inf"), lines.append)
    assert used is not model and lines == []


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_scripts_start_without_loading_the_compiler():
    # importing torch's compiler (torch._dynamo) doubled every script's start on a laptop: 3 s of 6 on
    # 2 Zen 3 cores, paid by each sample.py or evaluate.py that never compiles; it loads only to compile
    modules = [name[:-3] for name in os.listdir(os.path.join(ROOT, "nanoforge")) if name.endswith(".py")]
    proc = run_python("import sys, model, configurator\n" + "".join(f"import nanoforge.{m}\n" for m in modules) +
                      "print('torch._dynamo' in sys.modules)\n"
                      "import torch\nfrom nanoforge import hardware\n"
                      "hardware.compile_model(torch.nn.Linear(2, 2), lambda m: 0.0, print)\n"
                      "from nanoforge import lm_head_loss\n"
                      "print('torch._dynamo' in sys.modules, lm_head_loss._head_and_loss.eager_under_compile)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True"]


KEEP_PROBE = """
from nanoforge import errors, files, hardware, parallel
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
applied = bool(hardware.malloc_policy("cpu", save_memory=MODE == "save")) if MODE != "default" else False
block = bytearray(256 * 2**20)  # zero-filled: every page touched
held = rss_mib()
del block
print(applied, held - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds; a no-op elsewhere")
def test_malloc_policy_keeps_a_freed_block_in_the_process_for_reuse():
    """The next training step reuses the pages instead of faulting fresh ones in; glibc's default hands
    a block this big back to the kernel as soon as it is freed."""
    def run(mode):
        proc = run_python(f"MODE = {mode!r}" + KEEP_PROBE)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.split()
        return out[0] == "True", float(out[1])
    applied, released = run("keep")
    default_applied, default_released = run("default")
    assert applied and not default_applied
    assert released < 16  # MiB given back after freeing 256 MiB: none, the block stays for reuse
    assert default_released > 200  # the control: without it, the block goes back to the kernel
    assert hardware.malloc_policy("cuda") is None  # a GPU's activations are not malloc's: nothing to keep


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds; a no-op elsewhere")
def test_malloc_policy_to_save_memory_hands_freed_blocks_back():
    # under gradient checkpointing 2 MiB blocks (glibc's default threshold has moved past them once a bigger
    # block was freed) go back to the kernel as soon as they are freed, instead of staying in the heap
    probe = """
from nanoforge import errors, files, hardware, parallel
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
applied = bool(hardware.malloc_policy("cpu", save_memory=True)) if MODE == "save" else False
big = bytearray(16 * 2**20)
del big  # a 16 MiB block freed: glibc's default then raises its mmap threshold to 16 MiB
blocks = [bytearray(2 * 2**20) for _ in range(128)]  # 256 MiB in 2 MiB blocks, like a step's small tensors
held = rss_mib()
del blocks[::2]  # every other one freed: holes in the heap, which glibc keeps
print(applied, held - rss_mib())
"""
    results = {}
    for mode in ("save", "default"):
        proc = run_python(f"MODE = {mode!r}" + probe)
        assert proc.returncode == 0, proc.stderr
        results[mode] = (proc.stdout.split()[0] == "True", float(proc.stdout.split()[1]))
    assert results["save"][0] and results["save"][1] > 100  # MiB given back of the 128 freed
    assert not results["default"][0] and results["default"][1] < 16  # the control: glibc kept the holes


def test_friendly_errors_user_error_is_one_line_and_status_2():
    proc = run_python("from nanoforge import errors, files, hardware, parallel\nerrors.friendly_errors()\nraise errors.UserError('boom')\n")
    assert proc.returncode == 2
    assert proc.stderr == "error: boom\n"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_friendly_errors_keeps_tracebacks_for_bugs():
    proc = run_python("from nanoforge import errors, files, hardware, parallel\nerrors.friendly_errors()\nraise KeyError('bug')\n")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError: 'bug'" in proc.stderr


def test_write_json_is_atomic(tmp_path):
    path = str(tmp_path / "config.json")
    files.write_json(path, {"a": 1})
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    with pytest.raises(TypeError):
        files.write_json(path, {"a": object()})  # fails halfway through json.dump
    with open(path) as f:
        assert json.load(f) == {"a": 1}  # the old file is whole
    assert os.listdir(tmp_path) == ["config.json"]


def test_an_output_at_a_url_is_built_beside_its_place_there_and_moved_in_whole(tmp_path):
    """atomic_folder(URL, at_url=True), as curate.py and the Ray workers write: the folder to fill is a URL
    beside the output's place (file:// takes fsspec's path, as s3:// does), its files written through
    open_output and write_bytes; the old output stays whole until the new one is, and a failure leaves
    the old one and nothing staged."""
    url = (tmp_path / "bucket" / "out").as_uri()
    with files.atomic_folder(url, at_url=True) as out:
        assert out == files.staged_url(url) and files.is_url(out)
        with files.open_output(f"{out}/deep/shard.bin") as f:  # folders made as needed
            f.write(b"\0\1\2")
        files.write_json(f"{out}/report.json", {"docs": 3})
        assert not (tmp_path / "bucket" / "out").exists()  # not there until whole
    assert (tmp_path / "bucket" / "out" / "deep" / "shard.bin").read_bytes() == b"\0\1\2"
    assert json.loads((tmp_path / "bucket" / "out" / "report.json").read_text()) == {"docs": 3}
    with pytest.raises(RuntimeError):
        with files.atomic_folder(url, at_url=True) as out:
            files.write_bytes(f"{out}/report.json", b"half")
            raise RuntimeError("a crash mid-run")
    assert json.loads((tmp_path / "bucket" / "out" / "report.json").read_text()) == {"docs": 3}  # the old one
    assert os.listdir(tmp_path / "bucket") == ["out"]  # nothing staged left


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(dropout):
    from model import GPT, GPTConfig
    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=16, dropout=dropout)
    torch.manual_seed(0)
    plain = GPT(cfg)
    ckpt = GPT(cfg)
    ckpt.load_state_dict(plain.state_dict())
    parallel.gradient_checkpointing(ckpt)
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # checkpoints keep their names
    x = torch.randint(0, 50, (3, 16))
    results = []
    saved = []
    for m in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout masks, replayed in the recomputation
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = m(x, x)
        saved.append(count[0])
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert saved[1] < saved[0] / 2  # the blocks' activations are not kept for backward
    assert la == pytest.approx(lb, abs=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-5, msg=n)
    # generation with a KV cache still works on the wrapped model
    ckpt.eval()
    out = ckpt.generate(x[:1, :4], 5, temperature=0.0)
    ref = plain.eval().generate(x[:1, :4], 5, temperature=0.0)
    assert torch.equal(out, ref)


def test_lost_peer_recognises_a_dead_or_hung_rank(monkeypatch):
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    reset = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:23427: Connection reset by peer.")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not errors.lost_peer(timeout)  # one process has no peers: a timeout there is something else
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert errors.lost_peer(timeout) and errors.lost_peer(reset)
    assert not errors.lost_peer(RuntimeError("shape mismatch")) and not errors.lost_peer(KeyError("x"))


def test_step_memory_check_for_a_context_no_machine_holds(monkeypatch):
    from model import GPTConfig
    monkeypatch.setattr(hardware, "device_memory", lambda device: 24 * 2**30)  # a 24 GiB machine, whatever this is
    small = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=65)
    assert hardware.step_memory_error(small, 10**6, 12, "float32", True, False, "cpu") is None
    huge = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=100_000, vocab_size=65)
    line = hardware.step_memory_error(huge, 10**7, 12, "bfloat16", True, False, "cpu")
    assert line.startswith("a step of 12 x 100000 tokens is estimated to need ") and "more than the 24 GiB of cpu" in line
    assert "lower batch_size or block_size" in line and "memory_check=False" in line


@pytest.mark.parametrize("load,now,threads,running,fix", [
    (0.2, 0.0, 2, False, None),  # idle
    (1.1, 1.0, 2, False, "OMP_NUM_THREADS=1"),  # another job on one of the 2 cores
    (3.0, 0.0, 2, True, "OMP_NUM_THREADS=1"),  # the same, seen while this process's 2 threads run (now not read)
    (2.0, 1.0, 2, True, None),  # only this process's own threads
    (1.9, 1.0, 1, False, None),  # one thread already: nothing to wait for
    (1.1, 0.1, 2, False, None),  # the load average still counting a command just finished: the cores are idle
    (1.1, None, 2, False, "OMP_NUM_THREADS=1"),  # no /proc/stat to look at now: the load average decides
])
def test_busy_machine_line_names_the_fix(monkeypatch, load, now, threads, running, fix):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(hardware, "cores_in_use", lambda: now)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    line = hardware.busy_line("cpu", running=running)
    assert (line is None) == (fix is None), line
    if fix:
        assert line.startswith("warning: this machine is busy") and line.endswith(fix)
    assert hardware.busy_line("cuda", running=running) is None


def test_cores_in_use_sees_other_work_and_not_this_process():
    """cores_in_use reads the machine's busy time over a short window, less this process's own: a process
    spinning beside it counts about one core."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = hardware.cores_in_use(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6, busy  # one core's worth, less what a shared host steals


def test_out_of_memory_is_one_line():
    proc = run_python("from nanoforge import errors, files, hardware, parallel; errors.friendly_errors(); raise RuntimeError('[enforce fail at "
                      "alloc_cpu.cpp:127] DefaultCPUAllocator: can\\'t allocate memory: you tried to allocate 10 bytes')")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: out of memory (")
    assert "lower batch_size or block_size" in lines[0]
