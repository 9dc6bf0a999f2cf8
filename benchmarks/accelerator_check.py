"""One command for the first GPU/TPU: install, devices, tests, benchmark, training, in one budgeted go.

    python -m benchmarks.accelerator_check                  # on a GPU machine with network: everything
    python -m benchmarks.accelerator_check --skip-install   # jax[cuda] & co. already installed
    python -m benchmarks.accelerator_check --dry-run --out /tmp/acc   # the same stages on CPU, tiny

Stages, in order, each a subprocess with a hard time limit (SIGINT at the limit,
so pytest and Python still write what they have, then SIGKILL), run whatever
the previous ones gave: ``install`` (``pip install -e '.[gpu,test]'``, or
offline wheels from ``--wheels``), ``devices`` and ``default``
(:mod:`benchmarks.accelerator_probes`: the devices, and ``implementation=None``
checked against the selection rule and the dense path), ``tests`` (the kernel,
backend and module tests, JUnit XML), ``bench`` (``bench_attention --suite gpu``
cut to a few minutes), then ``train_<model>``: one tiny ``train.py`` run per
model family on TFDS mock data (seq2seq: its synthetic task), so no dataset
has to reach the machine. The whole run stops starting stages at
``--total-budget`` seconds (470 by default: under 8 minutes on an H200).

Writes to ``--out`` (default ``$OUT`` when set, else ``accelerator_check/``),
at most 8 files: ``summary.md`` and ``summary.json`` (per stage: ok / failed /
timed out / skipped, seconds, limit, exit code, the probes' results, test
counts, benchmark bars, each training run's last metrics), ``logs.txt`` (every
stage's output), ``tests.xml``, and the benchmark's ``attention.md``,
``attention.json`` and ``attention.png``. Exit code 0 when every stage that ran
was ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
REPORT_FILES = ("summary.md", "summary.json", "logs.txt", "tests.xml", "attention.md", "attention.json",
                "attention.png")
# Kernel, backend and module tests: pure JAX, no data, no subprocess (a child process would
# not find GPU memory next to a parent that holds it).
DEVICE_TESTS = ("tests/test_attention.py", "tests/test_flash.py", "tests/test_backends.py",
                "tests/test_attention_guarantees.py", "tests/test_masks.py", "tests/test_multihead.py",
                "tests/test_transformer.py", "tests/test_decoding.py", "tests/test_additive.py",
                "tests/test_positions.py")
DRY_TESTS = ("tests/test_backends.py::test_capabilities",
             "tests/test_backends.py::test_every_auto_kernel_names_its_evidence")
# The GPU suite cut to a few minutes: bfloat16 (cuDNN's dtype), T=16384 first (the published
# cuDNN comparison's length; only O(T) kernels run) then T=4096 (dense peers too at H=128), H 64
# and 128, causal and not, both modes, one pass, short timing. PyTorch runs after the JAX cases.
BENCH_GPU = ("--suite", "gpu", "--lengths", "16384,4096", "--dtypes", "bfloat16", "--passes", "1",
             "--budget", "0.2", "--min-runs", "2", "--max-runs", "10")
BENCH_DRY = ("--quick", "--modes", "fwd", "--causal", "yes", "--no-torch", "--passes", "1", "--budget", "0",
             "--min-runs", "1", "--max-runs", "1")
_S2S = ["--model", "seq2seq", "--task", "copy", "--num_symbols", "4", "--max_len", "3", "--test_max_len", "4",
        "--steps_per_epoch", "4", "--batch_size", "8", "--warmup_steps", "2", "--eval_examples", "8",
        "--length_eval_per_length", "2", "--decode_batch", "8", "--eval_batch_size", "8"]
# Tiny configurations of every model family (the tests' own, one epoch); imdb/multi30k read TFDS mock data.
TRAIN_FLAGS = {
    "bigru": ["--model", "bigru", "--vocab_size", "60", "--embed_dim", "8", "--hidden_size", "6",
              "--attention_size", "4", "--max_length", "12", "--batch_size", "8"],
    "transformer": ["--model", "transformer", "--vocab_size", "60", "--d_model", "8", "--num_heads", "2",
                    "--d_ff", "16", "--num_layers", "1", "--attention_size", "4", "--max_length", "12",
                    "--max_len", "12", "--batch_size", "8", "--pooling", "attention"],
    "translate": ["--model", "translate", "--train_examples", "32", "--vocab_size", "40", "--d_model", "16",
                  "--num_heads", "2", "--d_ff", "32", "--num_encoder_layers", "1", "--num_decoder_layers", "1",
                  "--batch_size", "16", "--warmup_steps", "2", "--beam_size", "2", "--decode_batch", "32",
                  "--eval_batch_size", "32"],
    "seq2seq": _S2S,
}
MOCK_EXAMPLES = 32
GRACE_S = 10  # from SIGINT to SIGKILL when a stage runs out of time
TRAIN_BUDGET_S = {"bigru": 35, "transformer": 35, "translate": 60, "seq2seq": 40}  # translate: + beam search
# What the project needs beyond a CUDA image that already has jax, flax, optax, orbax, pytest,
# sentencepiece and sacrebleu (the device tool's H200 image), pinned as in the project's venv:
# TFDS (mock data) and tensorboardX for train.py, tokamax for the benchmark's peers.
DEVICE_WHEELS = ("tensorboardX==2.6.5", "tensorflow-datasets==4.9.10", "array-record==0.8.6", "dm-tree==0.1.10",
                 "immutabledict==4.3.1", "simple-parsing==0.1.9", "docstring-parser==0.18.0",
                 "tensorflow-metadata==1.21.0", "googleapis-common-protos==1.76.0", "termcolor==3.3.0",
                 "toml==0.10.2", "importlib-resources==7.1.0", "tokamax==0.0.12", "einshape==1.0", "qwix==0.1.8",
                 "typeguard==2.13.3", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
                 "typing-inspection==0.4.5", "typing-extensions")
SDIST_ONLY = ("promise==2.3",)  # no wheel on PyPI: built here (pure Python)
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
_TRAIN_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import train
argv = {argv!r}
if {mock!r}:
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples={n}):
        rc = train.main(argv)
else:
    rc = train.main(argv)
sys.exit(rc)
"""


@dataclasses.dataclass
class Stage:
    """One step of the check: a command, its time limit, its extra environment."""

    name: str
    argv: List[str]
    budget_s: float
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    skip: Optional[str] = None  # why the stage is not run (recorded as "skipped")


def plan(args, scratch: str) -> List[Stage]:
    """The stages for this run; budgets in seconds (dry run: CPU, tiny shapes, no install)."""
    dry = args.dry_run
    stages = []
    if args.wheels:
        install = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                   os.path.join(scratch, "site")] + sorted(
            os.path.join(args.wheels, f) for f in os.listdir(args.wheels) if f.endswith(".whl"))
    else:
        install = [PY, "-m", "pip", "install", "-q", "-e", ".[gpu,test]"]
    skip = "--dry-run" if dry else "--skip-install" if args.skip_install else None
    stages.append(Stage("install", install, 150, skip=skip))
    stages.append(Stage("devices", [PY, "-m", "benchmarks.accelerator_probes", "devices"], 60 if dry else 25))
    stages.append(Stage("default", [PY, "-m", "benchmarks.accelerator_probes", "default"], 120 if dry else 45))
    tests = list(DRY_TESTS if dry else DEVICE_TESTS)
    # The tests' float32 tolerances assume float32 dots; XLA:GPU's default would use TF32.
    stages.append(Stage("tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit2",
                                  f"--junitxml={os.path.join(args.out, 'tests.xml')}", *tests],
                        120 if dry else 100, env={"JAX_DEFAULT_MATMUL_PRECISION": "highest"}))
    stages.append(Stage("bench", [PY, "-m", "benchmarks.bench_attention", *(BENCH_DRY if dry else BENCH_GPU),
                                  "--out", args.out], 120 if dry else 125))
    for model, flags in TRAIN_FLAGS.items():
        workdir = os.path.join(scratch, f"train_{model}")
        argv = flags + ["--num_epochs", "1", "--workdir", workdir]
        script = _TRAIN_SCRIPT.format(root=ROOT, argv=argv, mock=model != "seq2seq", n=MOCK_EXAMPLES)
        stages.append(Stage(f"train_{model}", [PY, "-c", script], 240 if dry else TRAIN_BUDGET_S[model]))
    return stages


def fetch_wheels(folder: str, python_version: str) -> int:
    """Downloads :data:`DEVICE_WHEELS` (and builds :data:`SDIST_ONLY`) for an offline x86-64 machine."""
    os.makedirs(folder, exist_ok=True)
    platforms = [flag for p in WHEEL_PLATFORMS for flag in ("--platform", p)]
    download = [PY, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                python_version, "--implementation", "cp", *platforms, "-d", folder, *DEVICE_WHEELS]
    build = [PY, "-m", "pip", "wheel", "-q", "--no-deps", "-w", folder, *SDIST_ONLY]
    return subprocess.run(download).returncode or subprocess.run(build).returncode


def run_stage(stage: Stage, timeout: float, env: Dict[str, str], log) -> Dict:
    """Runs one stage; SIGINT at ``timeout`` (pytest writes its XML), SIGKILL :data:`GRACE_S` later."""
    start = time.monotonic()
    record = {"name": stage.name, "limit_s": round(timeout, 1), "returncode": None,
              "command": " ".join(stage.argv[:8]) + (" ..." if len(stage.argv) > 8 else "")}
    try:
        proc = subprocess.Popen(stage.argv, cwd=ROOT, env={**env, **stage.env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    except OSError as err:
        return {**record, "status": "failed", "seconds": 0.0, "output": f"could not start: {err}"}
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(proc, signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            output, _ = proc.communicate()
    seconds = time.monotonic() - start
    status = "timed out" if timed_out else "ok" if proc.returncode == 0 else "failed"
    log(f"[{stage.name}] {status} in {seconds:.1f} s (limit {timeout:.0f} s, exit {proc.returncode})")
    return {**record, "status": status, "seconds": round(seconds, 1), "returncode": proc.returncode,
            "output": output or ""}


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signals the stage's whole process group (its own session); it may have just exited."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _probe_json(output: str) -> Optional[Dict]:
    from benchmarks.accelerator_probes import PREFIX

    lines = [line for line in output.splitlines() if line.startswith(PREFIX)]
    return json.loads(lines[-1][len(PREFIX):]) if lines else None


def _junit_counts(path: str) -> Optional[Dict[str, int]]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def _bench_details(out: str, argv: Sequence[str]) -> Optional[Dict]:
    """The benchmark's bars, and attention.md rendered from a partial attention.json if it was cut."""
    from benchmarks import report

    path = os.path.join(out, "attention.json")
    if os.path.exists(path + ".tmp"):  # a write cut by the time limit; attention.json is the last whole one
        os.remove(path + ".tmp")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    rows, env = data["results"], data["environment"]
    if not data.get("complete") or not os.path.exists(os.path.join(out, "attention.md")):
        notes = data.get("notes", []) + ["PARTIAL: the run was stopped at its time limit; rows so far."]
        with open(os.path.join(out, "attention.md"), "w") as f:
            f.write(report.markdown(rows, env, " ".join(argv), notes))
    lines = report.bars(rows) + [line for line in [report.auto_bar(rows, env.get("backend", "cpu"))] if line]
    return {"complete": bool(data.get("complete")), "rows": len(rows),
            "timed": sum(r["ms"] is not None for r in rows), "bars": lines}


def _last_metrics(workdir: str) -> Optional[Dict]:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return json.loads(lines[-1]) if lines else None


def summarize(records: List[Dict], meta: Dict) -> str:
    """``summary.md``: one row per stage, then the probes, tests, benchmark bars and training."""
    out = ["# Accelerator check", "", f"`{meta['command']}` — {meta['mode']}, started {meta['started_utc']} UTC, "
           f"{meta['total_s']:.0f} s of {meta['total_budget_s']:.0f} s budget", ""]
    dev = meta.get("devices") or {}
    if dev:
        out += [f"Devices: {dev.get('backend')} {dev.get('device_kind')} ×{len(dev.get('devices', []))}; "
                f"jax {dev.get('jax')}, flax {dev.get('flax')}, cuDNN {dev.get('cudnn_version')}", ""]
    out += ["| stage | status | seconds | limit s | exit | note |", "|---|---|---:|---:|---:|---|"]
    for r in records:
        out.append(f"| {r['name']} | {r['status']} | {r.get('seconds', 0):.1f} | {r.get('limit_s', 0):.0f} | "
                   f"{'' if r.get('returncode') is None else r['returncode']} | {r.get('note', '')} |")
    default = meta.get("default")
    if default:
        out += ["", "## implementation=None on this device (vs the dense path in float32)", "",
                "| case | dtype | selected | cuDNN in program | out err | grad err | ok |",
                "|---|---|---|---|---:|---:|---|"]
        for c in default["cases"]:
            out.append(f"| {c['case']} | {c.get('dtype', '')} | {c.get('expected', '')} | "
                       f"{c.get('cudnn_in_program', '')} | {c.get('out_rel_err', float('nan')):.2g} | "
                       f"{c.get('grad_rel_err', float('nan')):.2g} | "
                       f"{'ok' if c['ok'] else 'FAILED ' + c.get('error', '')} |")
    if meta.get("tests"):
        out += ["", "Tests: " + ", ".join(f"{k} {v}" for k, v in meta["tests"].items()) + " (tests.xml)"]
    if meta.get("bench"):
        b = meta["bench"]
        out += ["", f"Benchmark: {b['timed']}/{b['rows']} measurements"
                f"{'' if b['complete'] else ' (PARTIAL: stopped at its limit)'} (attention.md)", ""] + b["bars"]
    if meta.get("train"):
        out += ["", "Training (last metrics line of each run):", ""]
        out += [f"- {m}: {json.dumps(v) if v else 'no metrics written'}" for m, v in meta["train"].items()]
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "accelerator_check",
                   help="report folder (default: $OUT when set, else ./accelerator_check)")
    p.add_argument("--dry-run", action="store_true", help="every stage on CPU with tiny shapes, no install")
    p.add_argument("--skip-install", action="store_true", help="the [gpu,test] extras are already installed")
    p.add_argument("--wheels", default=None, help="install these .whl files offline (pip --no-index --no-deps) "
                   "into a scratch folder put on PYTHONPATH, instead of pip install -e '.[gpu,test]'")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds after which no stage starts and the running one is cut (default 470; dry run 900)")
    p.add_argument("--fetch-wheels", default=None, metavar="DIR",
                   help="only download the wheels an offline GPU machine needs into DIR (run where pip "
                        "reaches PyPI), for --wheels DIR there")
    p.add_argument("--wheel-python", default="3.12", help="the offline machine's Python, for --fetch-wheels")
    p.add_argument("--stages", default=None, help="comma list: run only these stages (e.g. devices,default,bench)")
    args = p.parse_args(argv)
    if args.wheels and not os.path.isdir(args.wheels):
        p.error(f"--wheels {args.wheels}: no such folder; give the folder holding the .whl files.")
    args.wheels = args.wheels and os.path.abspath(args.wheels)
    args.total_budget = args.total_budget or (900.0 if args.dry_run else 470.0)
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels, args.wheel_python)
    os.makedirs(args.out, exist_ok=True)
    for name in REPORT_FILES + ("attention.json.tmp",):  # a reused report folder never mixes two runs
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    scratch = tempfile.mkdtemp(prefix="accelerator_check_")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    if args.wheels:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(scratch, "site"), env.get("PYTHONPATH")]))
    stages = plan(args, scratch)
    if args.stages:
        keep = set(args.stages.split(","))
        stages = [s for s in stages if s.name in keep or (s.name.startswith("train_") and "train" in keep)]
    start, records = time.monotonic(), []
    meta = {"command": "python -m benchmarks.accelerator_check " + " ".join(sys.argv[1:] if argv is None else argv),
            "mode": "dry run (CPU)" if args.dry_run else "device",
            "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "total_budget_s": args.total_budget, "train": {}}
    log_path = os.path.join(args.out, "logs.txt")

    def say(line):
        print(line, file=sys.stderr, flush=True)

    with open(log_path, "w") as logs:
        for stage in stages:
            left = args.total_budget - (time.monotonic() - start) - GRACE_S  # a cut stage's grace fits too
            if stage.skip or left < 5:
                why = stage.skip or f"no time left of the {args.total_budget:.0f} s budget"
                records.append({"name": stage.name, "status": "skipped", "seconds": 0.0, "note": why})
                say(f"[{stage.name}] skipped: {why}")
                continue
            say(f"[{stage.name}] running (limit {min(stage.budget_s, left):.0f} s)")
            rec = run_stage(stage, min(stage.budget_s, left), env, say)
            output = rec.pop("output")
            logs.write(f"===== {stage.name}: {rec['status']} in {rec['seconds']} s (exit {rec['returncode']}) "
                       f"=====\n$ {' '.join(stage.argv)[:2000]}\n{output}\n")
            logs.flush()
            records.append(rec)
            _collect(stage, rec, output, args, scratch, meta)
    meta["total_s"] = time.monotonic() - start
    meta["stages"] = records
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(meta, f, indent=1)
    text = summarize(records, meta)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


def _collect(stage: Stage, rec: Dict, output: str, args, scratch: str, meta: Dict) -> None:
    """Reads what a finished stage left (probe JSON, JUnit counts, benchmark rows, metrics) into ``meta``."""
    if stage.name in ("devices", "default"):
        meta[stage.name] = _probe_json(output)
    elif stage.name == "tests":
        meta["tests"] = counts = _junit_counts(os.path.join(args.out, "tests.xml"))
        if counts:
            rec["note"] = ", ".join(f"{v} {k}" for k, v in counts.items())
    elif stage.name == "bench":
        try:
            meta["bench"] = _bench_details(args.out, stage.argv[3:])
        except Exception as err:  # noqa: BLE001 - a broken report must not stop the check
            rec["note"] = f"report: {type(err).__name__}: {err}"
    elif stage.name.startswith("train_"):
        metrics = _last_metrics(os.path.join(scratch, stage.name))
        meta["train"][stage.name[len("train_"):]] = metrics
        if rec["status"] == "ok" and metrics is None:
            rec["status"], rec["note"] = "failed", "exit 0 but no metrics.jsonl"


if __name__ == "__main__":
    sys.exit(main())
