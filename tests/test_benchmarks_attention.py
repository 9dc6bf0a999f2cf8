"""benchmarks/bench_attention.py: peers present or skipped per platform, peak lookup, the ours-auto bar.

Everything here runs on CPU in seconds: tiny shapes, synthetic result rows,
and implementations listed without being called where the platform lacks them.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import bench_attention, machine, peaks, peers, report, suites

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKAMAX = peers._import_tokamax() is not None


def test_ours_auto_and_platform_peers_are_listed():
    cpu = peers.jax_impls(True, "cpu")
    assert list(cpu)[:3] == [peers.CHUNKED, "ours-dense", peers.AUTO]
    assert "jax.nn-cudnn" not in cpu
    assert not any(name in cpu for name in ("tokamax-triton", "tokamax-mosaic"))
    gpu, tpu = peers.jax_impls(False, "gpu"), peers.jax_impls(False, "tpu")
    assert "jax.nn-cudnn" in gpu and "jax.nn-cudnn" not in tpu
    if TOKAMAX:
        assert {"tokamax-xla", "tokamax-xla_chunked"} <= set(cpu)
        assert {"tokamax-triton", "tokamax-mosaic"} <= set(gpu)
        assert "tokamax-mosaic" in tpu and "tokamax-triton" not in tpu
        assert peers.tokamax_missing() is None


def test_tokamax_absent_skips_its_peers_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokamax", None)  # makes `import tokamax` fail
    impls = peers.jax_impls(True, "gpu")
    assert not any(name.startswith("tokamax") for name in impls)
    note = peers.tokamax_missing()
    assert note.startswith("tokamax peers skipped: tokamax is not importable")
    text = report.markdown([_row("ours-chunked", 1.0)], {"backend": "cpu", "device": "cpu"}, "--quick", [note])
    assert f"- {note}" in text


@pytest.mark.parametrize("kind,dtype,precision,peak,word", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", None, 989.0, "H100 SXM"),
    ("NVIDIA H100 80GB HBM3", "float32", "default", 494.5, "TF32"),
    ("NVIDIA H100 80GB HBM3", "float32", "highest", 67.0, "FP32"),
    ("NVIDIA H200", "bfloat16", "default", 989.0, "H200 SXM"),
    ("NVIDIA H200 NVL", "bfloat16", "default", 835.5, "H200 NVL"),
    ("NVIDIA GH200 480GB", "bfloat16", "default", 989.0, "GH200"),
    ("NVIDIA H100 PCIe", "float16", "default", 756.5, "PCIe"),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", "default", 312.0, "A100"),
    ("NVIDIA A100 80GB PCIe", "float32", "tensorfloat32", 156.0, "TF32"),
    ("TPU v4", "bfloat16", "default", 275.0, "v4"),
    ("TPU v5 lite", "bfloat16", "default", 197.0, "v5e"),
    ("TPU v5p", "bfloat16", "default", 459.0, "v5p"),
    ("TPU v6 lite", "float32", "default", 918.0, "one bf16 pass"),
])
def test_peak_table_lookup(kind, dtype, precision, peak, word):
    got, label = peaks.peak_tflops(kind, dtype, precision)
    assert got == peak and word in label


def test_tf32_follows_matmul_precision():
    assert peaks.allows_tf32("default") and peaks.allows_tf32("tensorfloat32")
    assert not peaks.allows_tf32("highest") and not peaks.allows_tf32("float32")


@pytest.mark.parametrize("kind,dtype,precision", [
    ("cpu", "float32", "default"), ("Tesla V100-SXM2-16GB", "float16", "default"),
    ("TPU v4 lite", "bfloat16", "default"), ("TPU v5 lite", "float32", "highest"),
    ("NVIDIA H100 80GB HBM3", "float64", "default"),
])
def test_peak_unknown_is_a_dash(kind, dtype, precision):
    assert peaks.peak_tflops(kind, dtype, precision) == (None, "—")


def _row(impl, ms, t=1024, dtype="bfloat16", mode="fwd"):
    flops = bench_attention.useful_flops(1, t, t, 2, 64, 64, False, mode)
    return dict(b=1, t=t, n=2, h=64, dtype=dtype, causal=False, mode=mode, impl=impl, ms=ms,
                gflops=None if ms is None else flops / ms / 1e6, runs=3 if ms else 0, temp_bytes=None,
                total_bytes=None, device_peak_bytes=None, max_rss_bytes=None, note="")


@pytest.mark.parametrize("auto_ms,passed", [(10.4, True), (10.5, True), (10.6, False), (None, False), (7.0, True)])
def test_auto_within_five_percent_of_fastest_peer(auto_ms, passed):
    # ours-chunked is faster still, but only peers count: the bar compares the default to others.
    group = {r["impl"]: r for r in [_row(peers.CHUNKED, 5.0), _row(peers.AUTO, auto_ms), _row("flax.linen", 12.0),
                                    _row("tokamax-triton", 10.0), _row("jax.nn-cudnn", None)]}
    best, best_ms, ratio, ok = report.auto_vs_fastest(group)
    assert (best, best_ms, ok) == ("tokamax-triton", 10.0, passed)
    assert ratio == (None if auto_ms is None else pytest.approx(auto_ms / 10.0))
    assert report.auto_vs_fastest({peers.AUTO: _row(peers.AUTO, 1.0)}) is None  # no peer ran


def test_auto_bar_line_and_informational_label():
    rows = [_row(peers.AUTO, 10.0), _row("tokamax-xla", 10.2),
            _row(peers.AUTO, 30.0, t=2048), _row("torch-sdpa-cuda", 20.0, t=2048)]
    gpu_line = report.auto_bar(rows, "gpu")
    assert gpu_line.startswith("- FAIL: None (ours-auto) within 5% of the fastest peer in every case: 1/2")
    assert "informational" in report.auto_bar(rows, "cpu")
    assert report.auto_bar(rows[:2], "tpu").startswith("- PASS: ")


def test_accelerator_report_shows_tflops_and_percent_of_peak():
    rows = [_row(peers.CHUNKED, 2.0, dtype=d) for d in ("bfloat16", "float32")]
    env = {"backend": "gpu", "device": "NVIDIA H100 80GB HBM3", "matmul_precision": "default"}
    text = report.markdown(rows, env, "--suite gpu")
    assert "| TFLOP/s | % peak |" in text and "H100 SXM TF32" in text and "989 TFLOP/s" in text
    tflops = rows[0]["gflops"] / 1e3
    assert f"| {tflops:.1f} | {100 * tflops / 989:.1f} |" in text
    assert "% peak" not in report.markdown(rows, {"backend": "cpu", "device": "cpu"}, "")


def test_gpu_suite_shapes_and_dense_skip_threshold():
    shapes = suites.GPU.shapes
    assert sorted({s[1] for s in shapes}) == [1024, 2048, 4096, 8192, 16384, 32768]
    assert {s[3] for s in shapes} == {64, 128}
    assert all(b * t == suites.GPU_TOKENS and n * h == suites.GPU_WIDTH and set(d) == {"bfloat16", "float32"}
               for b, t, n, h, d in shapes)
    dense_runs = {(t, h) for b, t, n, h, _ in shapes if suites.dense_logits_gib(b, n, t) <= suites.GPU.dense_max_gib}
    assert (4096, 64) in dense_runs and (8192, 64) not in dense_runs and (8192, 128) in dense_runs


def test_suite_flags():
    args = bench_attention.parse_args(["--suite", "gpu", "--out", "/tmp/x"])
    assert (args.budget, args.dense_max_gib) == (0.5, 16.0)
    args = bench_attention.parse_args(["--quick", "--budget", "2", "--dense-max-gib", "1"])
    assert (args.suite, args.budget, args.max_runs, args.dense_max_gib) == ("quick", 2.0, 5, 1.0)
    assert bench_attention.parse_args([]).suite == "cpu"


def test_dense_peers_skipped_for_memory_without_compiling(tmp_path):
    args = bench_attention.parse_args(["--quick", "--budget", "0", "--min-runs", "1", "--max-runs", "1",
                                       "--dense-max-gib", "0", "--only", "ours-chunked,ours-dense,jax.nn-xla"])
    got = {r.impl: r for r in bench_attention.run_case(1, 64, 2, 16, "float32", True, "fwd", args, lambda r: None)}
    assert got[peers.CHUNKED].ms is not None
    for name in ("ours-dense", "jax.nn-xla"):
        assert got[name].ms is None and got[name].temp_bytes is None
        assert got[name].note.startswith("skipped (memory): dense logits")


def test_quick_run_lists_new_peers(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--causal", "yes", "--modes", "fwd", "--no-torch",
            "--budget", "0", "--min-runs", "1", "--max-runs", "1"]
    assert bench_attention.main(argv) == 0
    text = (tmp_path / "attention.md").read_text()
    assert f"| {peers.AUTO} |" in text and "informational" in text
    assert "\nMachine: CPU " in text and " cores usable, ISA: " in text  # the CPU it was measured on
    if TOKAMAX:
        assert "| tokamax-xla |" in text and "| tokamax-xla_chunked |" in text
    rows = json.loads((tmp_path / "attention.json").read_text())["results"]
    assert all(r["ms"] is not None for r in rows), [r["note"] for r in rows]


def test_torch_worker_skips_without_cuda_when_required():
    pytest.importorskip("torch")
    request = {"require_cuda": True, "allow_tf32": False, "threads": 1,
               "timing": dict(budget_s=0, min_runs=1, max_runs=1, slow_call_s=5, single_run_s=30),
               "cases": [dict(b=1, t=16, n=1, h=8, dtype="float32", causal=True, mode="fwd")]}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.torch_worker"], input=json.dumps(request),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout)
    (got,) = answer["results"]
    if "device=cuda" in answer["torch"]:
        assert got["ms"] is not None
    else:
        assert got["ms"] is None and got["note"].startswith("skipped: ")


def test_merge_passes_keeps_each_entrys_best_median():
    from benchmarks.bench_attention import Result, merge_passes

    def pass_(chunked_ms, torch_ms):
        return [Result(1, 8, 1, 4, "float32", True, "fwd", "ours-chunked", ms=chunked_ms),
                Result(1, 8, 1, 4, "float32", True, "fwd", "torch-sdpa-cpu", ms=torch_ms)]

    merged = merge_passes([pass_(2.0, 1.0), pass_(1.0, None), pass_(3.0, 4.0)])
    assert [r.ms for r in merged] == [1.0, 1.0]  # a burst in one pass never decides
    assert merged[0].ms_passes == [2.0, 1.0, 3.0] and merged[1].ms_passes == [1.0, 4.0]


SPR = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 fma avx512f avx512dq avx512_bf16 avx512_fp16 avx512_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 fma avx512f
"""
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpuinfo_names_the_model_isa_and_cores():
    intel = machine.parse_cpuinfo(SPR)
    assert intel["cpu_model"].startswith("Intel(R) Xeon(R) Platinum 8481C") and intel["cpu_logical"] == 2
    assert intel["cpu_isa"] == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile",
                                "amx_bf16", "amx_int8"]
    assert machine.parse_cpuinfo(EPYC) == {"cpu_model": "AMD EPYC", "cpu_isa": ["avx2", "fma"], "cpu_logical": 1}
    zen3 = machine.parse_cpuinfo("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n")
    assert zen3["cpu_model"] == "AMD EPYC (family 25, model 1)"
    arm = machine.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")
    assert arm["cpu_model"] == "Arm implementer 0x41 part 0xd0c" and arm["cpu_isa"] == []


def test_report_names_the_machine(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(SPR)
    env = {"backend": "cpu", "device": "cpu", **machine.describe(str(path))}
    assert env["cpu_cores"] >= 1
    text = report.markdown([_row(peers.CHUNKED, 1.0)], env, "--quick")
    line = next(l for l in text.splitlines() if l.startswith("Machine: "))
    assert "Intel(R) Xeon(R) Platinum 8481C" in line and "avx512f, avx512_bf16" in line and "amx_tile" in line
    gpu = machine.summary_line({**env, "gpu": "NVIDIA H200, 143771 MiB, 580.159.03"})
    assert gpu.endswith("; GPU/accelerator: NVIDIA H200, 143771 MiB, 580.159.03")
    assert machine.summary_line(env).endswith("; no GPU")
    live = bench_attention.environment()  # this machine, whatever it is
    assert live["cpu_model"] and isinstance(live["cpu_isa"], list) and live["cpu_cores"] >= 1
