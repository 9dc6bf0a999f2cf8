"""The PyTorch twin of :class:`flax_attention.models.lm.LanguageModel` for :mod:`benchmarks.bench_generate`.

Run in a process of its own (JAX and PyTorch thread pools contend for the same
cores, see :mod:`benchmarks.torch_worker`): a JSON request on stdin names an
``.npz`` of the JAX model's parameters (flattened ``layers_0/self_attention/query/kernel``
paths) and the cases; a JSON result goes to stdout.

The twin is the same computation written the way a PyTorch user would: token
embedding times ``sqrt(E)``, pre-norm blocks with RMSNorm, RoPE (interleaved
pairs, the package's layout), grouped-query
``F.scaled_dot_product_attention`` (``enable_gqa``) against a **preallocated**
KV cache ``[B, K, L, H]`` written in place, tanh-GELU feed-forward, tied
float32 logits, greedy argmax, under ``torch.inference_mode``. It supports the
bench's configurations only (RMSNorm, RoPE, no attention bias, no window, equal-length prompts).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from benchmarks.timing import median_time


class TorchLM:
    """Greedy generation with a preallocated KV cache; weights from the JAX parameter dict."""

    def __init__(self, weights: dict, cfg: dict):
        import torch

        t = lambda name: torch.from_numpy(np.ascontiguousarray(weights[name]))  # noqa: E731
        self.torch, self.cfg = torch, cfg
        e, n, k = cfg["d_model"], cfg["num_heads"], cfg["num_kv_heads"] or cfg["num_heads"]
        self.n, self.k, self.h = n, k, e // n
        self.embedding = t("embedding/embedding")
        self.layers = []
        for i in range(cfg["num_layers"]):
            p = f"layers_{i}/"
            self.layers.append(dict(
                norm1=t(p + "self_attention_norm/scale"), norm2=t(p + "ffn_norm/scale"),
                wq=t(p + "self_attention/query/kernel").reshape(e, n * self.h),
                wk=t(p + "self_attention/key/kernel").reshape(e, k * self.h),
                wv=t(p + "self_attention/value/kernel").reshape(e, k * self.h),
                wo=t(p + "self_attention/out/kernel").reshape(n * self.h, e),
                wi=t(p + "ffn/wi/kernel"), bi=t(p + "ffn/wi/bias"), wo2=t(p + "ffn/wo/kernel"), bo2=t(p + "ffn/wo/bias")))
        self.final = t("final_norm/scale")
        inv = cfg["rope_base"] ** (-np.arange(0, self.h, 2) / self.h)
        angles = torch.from_numpy((np.arange(cfg["max_length"])[:, None] * inv).astype(np.float32))
        self.cos, self.sin = angles.cos(), angles.sin()  # [L, H/2]

    def _rms(self, x, scale):
        return x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["norm_epsilon"]) * scale

    def _rope(self, x, start):  # x [B, T, heads, H]; pairs (2i, 2i+1)
        t = x.shape[1]
        cos, sin = self.cos[start:start + t, None, :], self.sin[start:start + t, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return self.torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    def new_cache(self, b, length):
        z = lambda: self.torch.zeros(b, self.k, length, self.h)  # noqa: E731
        return [(z(), z()) for _ in self.layers]

    def forward(self, tokens, start, cache):
        """Last-position float32 logits ``[B, V]`` of ``tokens [B, T]`` at positions ``start..``; fills ``cache``."""
        import torch.nn.functional as F

        b, t = tokens.shape
        if t > 1 and start:
            raise ValueError("the twin prefills at position 0 only")
        x = self.embedding[tokens] * math.sqrt(self.cfg["d_model"])
        for layer, (ck, cv) in zip(self.layers, cache):
            h = self._rms(x, layer["norm1"])
            q = self._rope((h @ layer["wq"]).view(b, t, self.n, self.h), start).transpose(1, 2)
            k = self._rope((h @ layer["wk"]).view(b, t, self.k, self.h), start).transpose(1, 2)
            ck[:, :, start:start + t] = k
            cv[:, :, start:start + t] = (h @ layer["wv"]).view(b, t, self.k, self.h).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, ck[:, :, :start + t], cv[:, :, :start + t], is_causal=t > 1,
                                               enable_gqa=self.k != self.n)
            x = x + o.transpose(1, 2).reshape(b, t, self.n * self.h) @ layer["wo"]
            h = self._rms(x, layer["norm2"])
            x = x + F.gelu(h @ layer["wi"] + layer["bi"], approximate="tanh") @ layer["wo2"] + layer["bo2"]
        return self._rms(x[:, -1], self.final) @ self.embedding.T

    def generate(self, prompts, new_tokens):
        b, p = prompts.shape
        cache = self.new_cache(b, p + new_tokens)
        out = self.torch.empty(b, new_tokens, dtype=self.torch.long)
        tok = self.forward(prompts, 0, cache).argmax(-1)
        out[:, 0] = tok
        for i in range(1, new_tokens):
            tok = self.forward(tok[:, None], p + i - 1, cache).argmax(-1)
            out[:, i] = tok
        return out


def main() -> int:
    import torch

    request = json.load(sys.stdin)
    torch.set_num_threads(request["threads"])
    cfg = request["config"]
    model = TorchLM(dict(np.load(request["weights"])), cfg)
    results = {"torch": f"{torch.__version__} (threads={torch.get_num_threads()}, cpu)", "cases": []}
    with torch.inference_mode():
        check = torch.from_numpy(np.asarray(request["check_prompts"], np.int64))
        logits = model.forward(check, 0, model.new_cache(*check.shape))
        results["check_max_abs_diff"] = float(np.max(np.abs(logits.numpy() - np.asarray(request["check_logits"]))))
        for b in request["batches"]:
            prompts = torch.from_numpy(np.asarray(request["prompts"][str(b)], np.int64))
            n = request["new_tokens"]
            prefill = lambda: model.forward(prompts, 0, model.new_cache(b, prompts.shape[1] + n))  # noqa: E731
            t_pre, _ = median_time(prefill, **request["timing"])
            t_gen, runs = median_time(lambda: model.generate(prompts, n), **request["timing"])
            tokens = model.generate(prompts, n).numpy()
            results["cases"].append({"batch": b, "prefill_s": t_pre, "generate_s": t_gen, "runs": runs,
                                     "tokens": tokens.tolist()})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
