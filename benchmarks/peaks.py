"""Dense peak matmul throughput per accelerator, for "% of peak" in the attention report.

Values are the vendors' *dense* tensor-core / MXU figures in TFLOP/s per JAX
device (NVIDIA datasheets quote "with sparsity" numbers, twice the dense rate,
for TF32 and below; those are halved here). Sources:

* NVIDIA H100 Tensor Core GPU datasheet (SXM, PCIe, NVL columns) and NVIDIA
  H200 Tensor Core GPU datasheet (SXM, NVL); GH200 uses the H100 SXM die and
  clocks. FP32 is the non-tensor-core (CUDA core) rate.
* NVIDIA A100 Tensor Core GPU datasheet (the SXM and PCIe parts share peaks).
* Google Cloud TPU documentation, "TPU versions" pages (v4, v5e, v5p, v6e):
  bf16 peak per chip; JAX exposes one device per chip on these generations.

Lookup is by substring of ``jax.devices()[0].device_kind`` (for example
``"NVIDIA H100 80GB HBM3"``, ``"NVIDIA H200"``, ``"TPU v5 lite"``); the first
matching row wins, so the more specific names come first. Unknown devices
(including every CPU) get no peak, and the report prints "—".
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

# (substrings, any of which identifies the device, lower case) -> peaks in TFLOP/s.
# Keys of the peaks: "bf16" (= fp16 rate on these parts), "tf32", "fp32".
_H100_SXM = {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0}
_H100_NVL = {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}
PEAK_TABLE: Tuple[Tuple[Tuple[str, ...], str, Dict[str, float]], ...] = (
    (("h100 pcie",), "NVIDIA H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    (("h100 nvl",), "NVIDIA H100 NVL", _H100_NVL),
    (("h200 nvl",), "NVIDIA H200 NVL", _H100_NVL),
    (("gh200",), "NVIDIA GH200", _H100_SXM),  # before "h200", which it contains
    (("h100",), "NVIDIA H100 SXM", _H100_SXM),
    (("h200",), "NVIDIA H200 SXM", _H100_SXM),
    (("a100",), "NVIDIA A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # "TPU v4 lite" is the inference part (v4i): a different chip, so it must not match "v4".
    (("tpu v4 lite",), "", {}),
    (("tpu v4",), "TPU v4", {"bf16": 275.0}),
    (("tpu v5 lite", "tpu v5e"), "TPU v5e", {"bf16": 197.0}),
    (("tpu v5p", "tpu v5"), "TPU v5p", {"bf16": 459.0}),
    (("tpu v6 lite", "tpu v6e"), "TPU v6e", {"bf16": 918.0}),
)

# jax_default_matmul_precision values under which XLA:GPU may run float32 dots on
# TF32 tensor cores (its DEFAULT/HIGH precision allows TF32); HIGHEST/"float32" forbid it.
_TF32_OK = {None, "default", "high", "tensorfloat32", "bfloat16", "TF32_TF32_F32"}
_FULL_FP32 = {"highest", "float32", "F32_F32_F32"}
# On TPU, float32 dots at DEFAULT precision are one bf16 MXU pass, so the bf16 peak bounds them.
_TPU_ONE_PASS = {None, "default", "bfloat16", "BF16_BF16_F32"}


def allows_tf32(matmul_precision: Optional[str]) -> bool:
    """Whether float32 dots may run as TF32 on an NVIDIA GPU at this JAX precision."""
    return matmul_precision in _TF32_OK


def device_row(device_kind: str) -> Optional[Tuple[str, Dict[str, float]]]:
    """The ``(name, peaks)`` row for a JAX ``device_kind``, or ``None`` if it is not listed."""
    kind = device_kind.lower()
    for keys, name, peaks in PEAK_TABLE:
        if any(k in kind for k in keys):
            return (name, peaks) if peaks else None
    return None


def float32_arithmetic(device_kind: str, matmul_precision: Optional[str]) -> Optional[str]:
    """What float32 dots run on: ``"tf32"``, ``"fp32"``, ``"bf16"`` (TPU one-pass) or ``None`` (unknown).

    Only listed devices are classified; on CPUs the question does not arise.
    """
    row = device_row(device_kind)
    if row is None:
        return None
    if row[0].startswith("TPU"):
        return "bf16" if matmul_precision in _TPU_ONE_PASS else None
    if matmul_precision in _TF32_OK:
        return "tf32"
    return "fp32" if matmul_precision in _FULL_FP32 else None


_WHY = {
    "tf32": "TF32 tensor-core (float32 dots at this precision may use TF32 on XLA:GPU)",
    "fp32": "FP32 CUDA-core (this precision forbids TF32)",
    "bf16": "bf16 MXU (float32 dots at default precision are one bf16 pass)",
}


def peak_tflops(device_kind: str, dtype: str, matmul_precision: Optional[str] = None
                ) -> Tuple[Optional[float], str]:
    """Dense peak TFLOP/s for attention on ``dtype`` inputs, and a label naming it.

    Args:
      device_kind: ``jax.devices()[0].device_kind``.
      dtype: the inputs' dtype name (``"bfloat16"``, ``"float16"``, ``"float32"``).
      matmul_precision: ``jax.config.jax_default_matmul_precision`` for the run
        (``None`` or ``"default"`` when unset); decides whether float32 inputs
        are held to the TF32 or the FP32 peak.

    Returns:
      ``(peak, label)``; ``peak`` is ``None`` (label ``"—"``) for unlisted
      devices, dtypes or precisions.
    """
    row = device_row(device_kind)
    if row is None:
        return None, "—"
    name, peaks = row
    if dtype in ("bfloat16", "float16"):
        key, why = "bf16", f"{dtype} tensor-core/MXU"
    elif dtype == "float32" and float32_arithmetic(device_kind, matmul_precision):
        key = float32_arithmetic(device_kind, matmul_precision)
        why = _WHY[key]
    else:
        return None, "—"
    if key not in peaks:
        return None, "—"
    return peaks[key], f"{name} {why}, dense: {peaks[key]:g} TFLOP/s"
