"""Names the machine a benchmark ran on: CPU model, the ISA flags that decide CPU kernel speed, cores, GPU.

CPU figures differ by CPU family, and even between VMs of one family (the
same kernel ran at 1.2x PyTorch on one 2-core AMD EPYC VM, ~0.9x on another
with the same ISA, and 0.5x on a 2-core Intel Xeon; issue 20), so every report
says which CPU it was measured on. Parsing is a pure function of
``/proc/cpuinfo``'s text, tested on any machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Dict, List, Optional

# The flags that change which vector/matrix code CPU libraries (XLA, oneDNN, MKL) can run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile",
             "amx_bf16", "amx_int8", "amx_fp16")


def parse_cpuinfo(text: str) -> Dict[str, object]:
    """``{"cpu_model", "cpu_isa", "cpu_logical"}`` from ``/proc/cpuinfo`` text (x86 or Arm).

    Args:
      text: the file's contents.

    Returns:
      The first ``model name`` with its x86 ``cpu family``/``model`` numbers
      (Arm: ``CPU implementer``/``CPU part``, else ``"unknown"``), the
      :data:`ISA_FLAGS` present in the first ``flags`` line (Arm:
      ``Features``), in that order, and the number of ``processor`` entries.
    """
    fields: Dict[str, str] = {}
    logical = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            logical += 1
        fields.setdefault(key, value.strip())
    model = fields.get("model name") or fields.get("Model") or ""
    if model and "cpu family" in fields and "model" in fields:
        # VMs often hide the SKU ("AMD EPYC"); family/model still tell Zen 2/3/4 or
        # Intel generations apart.
        model = f"{model} (family {fields['cpu family']}, model {fields['model']})"
    if not model and "CPU implementer" in fields:
        model = f"Arm implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"cpu_model": model or "unknown", "cpu_isa": [f for f in ISA_FLAGS if f in flags],
            "cpu_logical": logical}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_names() -> List[str]:
    """GPU names from ``nvidia-smi`` (empty when it is absent or fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def describe(cpuinfo_path: str = "/proc/cpuinfo", accelerator: Optional[str] = None) -> Dict[str, object]:
    """This machine: :func:`parse_cpuinfo` fields, ``cpu_cores`` (usable), ``gpu`` (names or ``None``).

    Args:
      cpuinfo_path: where to read the CPU description (absent off Linux).
      accelerator: the JAX device kind when JAX runs on a GPU/TPU; used as
        ``gpu`` when ``nvidia-smi`` names nothing (e.g. a TPU).
    """
    try:
        with open(cpuinfo_path) as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        info = {"cpu_model": platform.processor() or platform.machine() or "unknown", "cpu_isa": [],
                "cpu_logical": os.cpu_count()}
    info["cpu_cores"] = usable_cores()
    gpus = gpu_names()
    info["gpu"] = "; ".join(gpus) if gpus else accelerator
    return info


def summary_line(env: Dict[str, object]) -> str:
    """One line naming the machine, for a report's header (fields as :func:`describe` returns them)."""
    isa = ", ".join(env.get("cpu_isa") or []) or "none of " + "/".join(ISA_FLAGS[:3])
    line = f"CPU {env.get('cpu_model', 'unknown')}, {env.get('cpu_cores', '?')} cores usable, ISA: {isa}"
    return line + (f"; GPU/accelerator: {env['gpu']}" if env.get("gpu") else "; no GPU")
