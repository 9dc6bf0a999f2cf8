"""PyTorch SDPA timings, run in a process of their own.

Sharing a process with JAX slows PyTorch's CPU kernels by an order of
magnitude on small shapes (the two runtimes' thread pools contend for the same
cores), so :mod:`benchmarks.bench_attention` sends every PyTorch case here in one
batch: a JSON list of cases on stdin, a JSON list of results on stdout.

Inputs are standard-normal ``[B, N, T, H]`` tensors (PyTorch's layout) of the
case's dtype on the best torch device; values do not affect the timing. In a
GPU/TPU run the parent sets ``require_cuda``: without a CUDA device (a CPU-only
torch build, or a TPU host) every case is reported as skipped rather than timed
on the host CPU, which would be neither comparable nor quick at GPU sizes.
``allow_tf32`` makes float32 matmuls match the JAX side's precision setting.
"""

from __future__ import annotations

import json
import sys

from benchmarks.timing import median_time


def run(case: dict, timing: dict) -> dict:
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, case["dtype"])
    # Drawn on the device itself: at GPU-suite sizes host-side randn and copies take seconds.
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case["b"], case["n"], case["t"], case["h"])
    backward = case["mode"] == "fwd+bwd"
    q, k, v, do = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(backward)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=case["causal"])
        sync()

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=case["causal"]).backward(do)
        sync()

    try:
        sec, runs = median_time(fwd_bwd if backward else fwd, **timing)
        return {"impl": f"torch-sdpa-{device}", "ms": sec * 1e3, "runs": runs, "note": ""}
    except Exception as err:  # noqa: BLE001 - reported in the table
        return {"impl": f"torch-sdpa-{device}", "ms": None, "runs": 0,
                "note": f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"}


def main() -> int:
    import torch

    request = json.load(sys.stdin)
    if request.get("threads"):
        torch.set_num_threads(request["threads"])
    cuda = torch.cuda.is_available()
    desc = f"{torch.__version__} (threads={torch.get_num_threads()}, device={'cuda' if cuda else 'cpu'}"
    if cuda:
        tf32 = bool(request.get("allow_tf32"))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        desc += f", {torch.cuda.get_device_name(0)}, allow_tf32={tf32}"
    desc += ")"
    if request.get("require_cuda") and not cuda:
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else "torch sees no CUDA device")
        results = [{"impl": "torch-sdpa", "ms": None, "runs": 0, "note": f"skipped: {why} ({torch.__version__})"}
                   for _ in request["cases"]]
    else:
        results = [run(c, request["timing"]) for c in request["cases"]]
    json.dump({"torch": desc, "results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
