"""benchmarks/accelerator_check.py: budgets, failures recorded and passed over, the report folder; a CPU dry run."""

import json
import os
import re
import sys

import pytest

from benchmarks import accelerator_check as ac
from benchmarks import bench_attention

ALLOWED_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back from $OUT


def _fake_plan(args, scratch):
    py = sys.executable
    return [ac.Stage("install", ["true"], 10, skip="--skip-install"),
            ac.Stage("devices", [py, "-c", "import time; time.sleep(1); "
                                 "print('PROBE_JSON {\"backend\": \"cpu\", \"devices\": [\"cpu:0\"]}')"], 30),
            ac.Stage("tests", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
            ac.Stage("bench", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1.5),
            ac.Stage("train_seq2seq", [py, "-c", "print('trained')"], 30)]


def test_failures_and_timeouts_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(ac, "plan", _fake_plan)
    (tmp_path / "attention.md").write_text("stale")  # a reused folder never mixes two runs
    rc = ac.main(["--out", str(tmp_path), "--skip-install"])
    assert rc == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {r["name"]: r["status"] for r in summary["stages"]}
    assert status == {"install": "skipped", "devices": "ok", "tests": "failed", "bench": "timed out",
                      "train_seq2seq": "failed"}  # exit 0 but no metrics.jsonl: not a training run
    bench = next(r for r in summary["stages"] if r["name"] == "bench")
    assert bench["limit_s"] == 1.5 and 1.5 <= bench["seconds"] < 20
    assert summary["devices"] == {"backend": "cpu", "devices": ["cpu:0"]}
    logs = (tmp_path / "logs.txt").read_text()
    assert "boom" in logs and "started" in logs and "===== bench: timed out" in logs
    md = (tmp_path / "summary.md").read_text()
    assert "| tests | failed |" in md and "| bench | timed out |" in md and "| install | skipped |" in md
    assert not (tmp_path / "attention.md").exists()


def test_total_budget_skips_the_stages_it_cannot_start(tmp_path, monkeypatch):
    monkeypatch.setattr(ac, "plan", _fake_plan)
    # 15.5 s, less the 10 s grace a cut stage may take: devices gets 5.5 s and takes > 1, so less than 5 is left.
    ac.main(["--out", str(tmp_path), "--total-budget", "15.5", "--stages", "devices,bench,train"])
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert [r["name"] for r in stages] == ["devices", "bench", "train_seq2seq"]
    assert stages[0]["status"] == "ok" and stages[0]["limit_s"] <= 5.5
    assert [r["status"] for r in stages[1:]] == ["skipped", "skipped"]
    assert stages[1]["note"] == "no time left of the 16 s budget"


def test_device_plan_fits_eight_minutes_and_the_dry_plan_installs_nothing(tmp_path):
    device = ac.plan(ac.parse_args(["--out", str(tmp_path)]), str(tmp_path))
    assert sum(s.budget_s for s in device if s.name != "install") <= 470 == ac.parse_args([]).total_budget
    names = [s.name for s in device]
    assert names[:5] == ["install", "devices", "default", "tests", "bench"]
    assert {n for n in names if n.startswith("train_")} == {f"train_{m}" for m in ("bigru", "transformer",
                                                                                    "translate", "seq2seq")}
    assert device[0].argv[-2:] == ["-e", ".[gpu,test]"] and device[0].skip is None
    dry = ac.plan(ac.parse_args(["--dry-run", "--out", str(tmp_path)]), str(tmp_path))
    assert dry[0].skip == "--dry-run" and "--quick" in dry[4].argv
    bench = bench_attention.parse_args(list(ac.BENCH_GPU) + ["--out", str(tmp_path)])
    assert bench.lengths == [16384, 4096] and bench.passes == 1
    with pytest.raises(SystemExit):
        ac.parse_args(["--wheels", str(tmp_path / "missing")])


def test_out_defaults_to_the_device_tools_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert ac.parse_args([]).out == str(tmp_path)
    monkeypatch.delenv("OUT")
    assert ac.parse_args([]).out.endswith("accelerator_check")


def test_bench_lengths_flag_and_partial_json(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        bench_attention.parse_args(["--suite", "gpu", "--lengths", "100"])
    assert "has T in [1024, 2048" in capsys.readouterr().err

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # as a time limit would, after the measurements, before the final write

    monkeypatch.setattr(bench_attention, "merge_passes", stop)
    with pytest.raises(KeyboardInterrupt):
        bench_attention.main(list(ac.BENCH_DRY) + ["--out", str(tmp_path), "--only", "ours-chunked"])
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["complete"] is False and [r["impl"] for r in data["results"]] == ["ours-chunked"]


@pytest.mark.slow
def test_dry_run_walks_every_stage_on_cpu(tmp_path):
    rc = ac.main(["--dry-run", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {r["name"]: r["status"] for r in summary["stages"]}
    assert rc == 0, (status, (tmp_path / "logs.txt").read_text()[-4000:])
    assert status == {"install": "skipped", "devices": "ok", "default": "ok", "tests": "ok", "bench": "ok",
                      "train_bigru": "ok", "train_transformer": "ok", "train_translate": "ok", "train_seq2seq": "ok"}
    assert summary["devices"]["backend"] == "cpu" and summary["devices"]["machine"]["cpu_model"]
    assert summary["default"]["ok"] and all(c["expected"] in ("dense", "chunked") for c in summary["default"]["cases"])
    assert summary["tests"]["tests"] >= 2 and summary["tests"]["failures"] == 0
    assert summary["bench"]["complete"] and summary["bench"]["timed"] == summary["bench"]["rows"] > 0
    assert all(summary["train"][m] for m in ("bigru", "transformer", "translate", "seq2seq"))
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(ac.REPORT_FILES) and len(files) <= 8 and all(ALLOWED_NAME.match(f) for f in files)
    assert "Machine: CPU " in (tmp_path / "attention.md").read_text()


def test_a_cut_benchmark_still_leaves_a_report(tmp_path):
    row = dict(b=1, t=16384, n=16, h=128, dtype="bfloat16", causal=True, mode="fwd", impl="ours-auto", ms=2.0,
               gflops=1e5, runs=3, temp_bytes=None, total_bytes=None, device_peak_bytes=None, max_rss_bytes=None,
               note="")
    env = {"backend": "gpu", "device": "NVIDIA H200", "cpu_model": "Intel(R) Xeon(R)", "cpu_isa": ["avx512f"],
           "cpu_cores": 16, "gpu": "NVIDIA H200"}
    (tmp_path / "attention.json").write_text(json.dumps({"environment": env, "notes": [], "complete": False,
                                                         "results": [row, {**row, "impl": "jax.nn-cudnn"}]}))
    (tmp_path / "attention.json.tmp").write_text("{half a fi")
    got = ac._bench_details(str(tmp_path), ["--suite", "gpu"])
    assert got["complete"] is False and got["rows"] == got["timed"] == 2
    assert got["bars"][0].startswith("- PASS: None (ours-auto) within 5%")
    text = (tmp_path / "attention.md").read_text()
    assert "PARTIAL: the run was stopped at its time limit" in text and "Machine: CPU Intel(R) Xeon(R)" in text
    assert not (tmp_path / "attention.json.tmp").exists()
