"""Generation throughput of the decoder-only LM: cached vs uncached vs a PyTorch twin, plus training tokens/s.

Run from the repository root on an otherwise idle machine::

    python -m benchmarks.bench_generate                      # writes benchmarks/results/generate.{json,md}
    python -m benchmarks.bench_generate --quick --out /tmp/g # smoke run (tiny model, seconds of work)

One run, one machine, same weights (random, seed 0), greedy decoding of
``--new_tokens`` tokens after ``--prompt_len``-token prompts (no EOS stop), at
each batch size in ``--batches``:

* **ours**: :func:`flax_attention.linen.generation.generate` (prefill into the
  KV cache, then ``lax.while_loop`` phases of cached decode steps, one jitted
  call); its prefill time is that of the same call with ``max_new_tokens=1``;
* **uncached**: the same model recomputing the whole prefix at every step (one
  jitted ``fori_loop``; the prefix is padded up to a multiple of ``--bucket``
  tokens, one ``lax.switch`` branch per bucket, so each step costs at most
  ``bucket - 1`` positions more than the exact prefix; causality makes the padding inert);
* **torch**: the same weights in the PyTorch twin (:mod:`benchmarks.torch_lm`:
  SDPA against a preallocated KV cache, eager, ``inference_mode``) in its own
  process. Its logits on a check prompt are compared with ours (reported).

Prefill tokens/s = ``B·P / t_prefill`` (the call that turns the prompts into
the first token's logits); decode tokens/s = ``B·N / (t_generate - t_prefill)``.
Times are medians after a warm-up call (compile excluded). The model is the
``train.py --model lm`` architecture (its default flags) with ``max_length =
P + N`` (RoPE has no learned positions: the parameters do not depend on it).
Training tokens/s: one jitted AdamW step on ``--train_batch`` rows of
``--train_len`` tokens (next-token cross-entropy), median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.machine import describe, summary_line, usable_cores
from benchmarks.timing import median_time

# The train.py --model lm defaults (flax_attention/training/lm.py FLAG_DEFAULTS) and the sizes.
MODEL = dict(vocab_size=8000, d_model=192, num_heads=4, num_kv_heads=0, num_layers=3, d_ff=768)
QUICK_MODEL = dict(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, d_ff=64)
TIMING = dict(budget_s=20.0, min_runs=3, max_runs=10, slow_call_s=60.0, single_run_s=300.0)
QUICK_TIMING = dict(budget_s=0.0, min_runs=1, max_runs=1, slow_call_s=60.0, single_run_s=300.0)


def build(model_kw, max_length):
    import jax
    import jax.numpy as jnp

    from flax_attention.models.lm import LanguageModel, LMConfig

    config = LMConfig(max_length=max_length, dropout_rate=0.0, **model_kw)
    model = LanguageModel(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def uncached_generate(model, params, prompts, new_tokens: int, bucket: int):
    """Greedy generation without a cache: every step runs the model on the whole prefix (bucketed)."""
    import jax
    import jax.numpy as jnp

    b, p = prompts.shape
    total = p + new_tokens
    sizes = sorted({min(total, -(-n // bucket) * bucket) for n in range(p, total)})

    def branch(size):
        def run(buf, pos):  # logits at position pos - 1 from the first `size` tokens
            logits = model.apply({"params": params}, buf[:, :size])
            return jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False)
        return run

    branches = [branch(s) for s in sizes]
    starts = jnp.asarray(sizes, jnp.int32)

    def step(i, buf):
        pos = p + i  # tokens known so far
        which = jnp.searchsorted(starts, pos, side="left").astype(jnp.int32)  # smallest bucket >= pos
        tok = jnp.argmax(jax.lax.switch(which, branches, buf, pos), axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice(buf, tok[:, None], (jnp.int32(0), pos))

    buf = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompts)
    return jax.lax.fori_loop(0, new_tokens, step, buf)[:, p:]


def time_jax(model, params, prompts_by_batch, new_tokens, bucket, timing):
    """``{impl: {batch: {prefill_s, generate_s, tokens}}}`` for ours and uncached."""
    import jax
    import jax.numpy as jnp

    from flax_attention.linen.generation import generate

    out = {"ours": {}, "uncached": {}}
    for b, prompts in prompts_by_batch.items():
        prompts = jnp.asarray(prompts)
        full_prefill = jax.jit(lambda x: jnp.argmax(model.apply({"params": params}, x)[:, -1], -1))  # noqa: E731
        ours = lambda n=new_tokens: jax.block_until_ready(generate(  # noqa: E731
            model, params, prompts, max_new_tokens=n, temperature=0.0, stop_at_eos=False))
        slow = jax.jit(lambda x: uncached_generate(model, params, x, new_tokens, bucket))  # noqa: E731
        # Our prefill is generate's own first call: a fresh cache, the prompts, token 0 chosen.
        for name, pre, gen in (("ours", lambda: ours(1), ours),
                               ("uncached", lambda: jax.block_until_ready(full_prefill(prompts)),
                                lambda: jax.block_until_ready(slow(prompts)))):
            t_pre, _ = median_time(pre, **timing)
            t_gen, runs = median_time(gen, **timing)
            out[name][b] = {"prefill_s": t_pre, "generate_s": t_gen, "runs": runs, "tokens": np.asarray(gen()).tolist()}
            print(f"{name} B={b}: prefill {t_pre:.4f} s, generate {t_gen:.3f} s", flush=True)
    return out


def time_training(model, params, batch, length, timing):
    """Median seconds of one jitted AdamW step on ``[batch, length]`` random tokens."""
    import jax
    import jax.numpy as jnp
    import optax

    opt = optax.adamw(1e-3)
    tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 3, model.config.vocab_size, jnp.int32)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1], train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    sec, _ = median_time(lambda: jax.block_until_ready(step(params, state)), **timing)
    return sec


def run_torch(model, params, prompts_by_batch, new_tokens, threads, timing):
    """The PyTorch twin in its own process; ``None`` (with the reason) when torch is missing."""
    import importlib.util

    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    if importlib.util.find_spec("torch") is None:
        return None, "torch is not installed (pip install torch==2.13.0)"
    check = jnp.asarray(next(iter(prompts_by_batch.values())))[:1]
    check_logits = np.asarray(jax.jit(model.apply)({"params": params}, check)[:, -1])
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        np.savez(weights, **{"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()})
        c = model.config
        request = {"weights": weights, "threads": threads, "timing": timing, "new_tokens": new_tokens,
                   "batches": list(prompts_by_batch),
                   "prompts": {str(b): np.asarray(p).tolist() for b, p in prompts_by_batch.items()},
                   "check_prompts": np.asarray(check).tolist(), "check_logits": check_logits.tolist(),
                   "config": {k: getattr(c, k) for k in ("d_model", "num_heads", "num_kv_heads", "num_layers",
                                                         "max_length", "rope_base", "norm_epsilon")}}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        res = subprocess.run([sys.executable, "-m", "benchmarks.torch_lm"], input=json.dumps(request), text=True,
                             capture_output=True, cwd=root, env=dict(os.environ, PYTHONPATH=root))
    if res.returncode:
        return None, "torch twin failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:200]
    out = json.loads(res.stdout)
    out["cases"] = {case["batch"]: case for case in out["cases"]}
    return out, ""


def agreement(a, b) -> float:
    """Mean fraction of each row's tokens before the first disagreement (greedy paths split on near-ties)."""
    a, b = np.asarray(a), np.asarray(b)
    diff = a != b
    first = np.where(diff.any(1), diff.argmax(1), a.shape[1])
    return float(np.mean(first / a.shape[1]))


def report(results, args, env) -> str:
    p, n = args.prompt_len, args.new_tokens
    lines = [
        "# Generation throughput: KV-cached vs uncached vs PyTorch (same weights)",
        "",
        f"`python -m benchmarks.bench_generate {' '.join(sys.argv[1:])}`".rstrip() + " — "
        f"model {results['model']}, random weights; greedy, {p}-token prompts, {n} new tokens (no EOS stop). "
        f"Machine: {summary_line(env)}; 1-minute load average {results['load_average']:.1f} at the end. "
        f"{results['torch_version'] or results['torch_missing']}; JAX {results['jax']}.",
        "",
        "| B | impl | prefill s | prefill tok/s | generate s | decode tok/s | decode vs uncached | "
        "decode vs torch | tokens = ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in args.batches:
        rows = {k: results[k][b] for k in ("ours", "uncached", "torch") if results.get(k) and b in results[k]}
        # Decode time = generate - prefill; a noisy run where that is not positive has no rate.
        rate = {k: b * n / (r["generate_s"] - r["prefill_s"]) for k, r in rows.items()
                if r["generate_s"] > r["prefill_s"]}
        ratio = lambda k, other: f"{rate[k] / rate[other]:.2f}x" if k in rate and other in rate else "—"  # noqa
        for k, r in rows.items():
            lines.append(f"| {b} | {k} | {r['prefill_s']:.4f} | {b * p / r['prefill_s']:.0f} | {r['generate_s']:.3f} "
                         f"| {f'{rate[k]:.0f}' if k in rate else '—'} | {ratio(k, 'uncached')} | "
                         f"{ratio(k, 'torch')} | {agreement(r['tokens'], rows['ours']['tokens']):.2f} |")
    lines += ["", f"Training: {results['train_tokens_per_s']:.0f} tokens/s (jitted AdamW step, batch "
              f"{args.train_batch} x {args.train_len} tokens, median {results['train_step_s']:.3f} s/step).", ""]
    if results.get("torch_check_max_abs_diff") is not None:
        lines.append(f"Twin check: max |logits_torch - logits_ours| = {results['torch_check_max_abs_diff']:.2e} "
                     "on one prompt (float32). `tokens = ours`: mean fraction of each row's tokens before the "
                     "first difference from ours (greedy paths may split on near-ties).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 16 (quick: 1 2)")
    p.add_argument("--prompt_len", type=int, default=None, help="default 128 (quick: 8)")
    p.add_argument("--new_tokens", type=int, default=None, help="default 256 (quick: 8)")
    p.add_argument("--bucket", type=int, default=32, help="uncached prefix padding granularity")
    p.add_argument("--train_batch", type=int, default=None, help="default 32 (quick: 2)")
    p.add_argument("--train_len", type=int, default=None, help="default 128 (quick: 16)")
    p.add_argument("--threads", type=int, default=usable_cores(), help="PyTorch threads")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--out", default="benchmarks/results/generate")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("batches", [1, 16], [1, 2]), ("prompt_len", 128, 8), ("new_tokens", 256, 8),
                              ("train_batch", 32, 2), ("train_len", 128, 16)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    model_kw, timing = (QUICK_MODEL, QUICK_TIMING) if q else (MODEL, TIMING)

    model, params = build(model_kw, max(args.prompt_len + args.new_tokens, args.train_len))
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(3, model.config.vocab_size, size=(b, args.prompt_len)).astype(np.int32)
               for b in args.batches}
    start = time.time()
    results = time_jax(model, params, prompts, args.new_tokens, args.bucket, timing)
    train_s = time_training(model, params, args.train_batch, args.train_len, timing)
    torch_out, why = (None, "PyTorch skipped (--skip_torch)") if args.skip_torch else run_torch(
        model, params, prompts, args.new_tokens, args.threads, timing)
    import jax

    results.update(
        torch=torch_out and torch_out["cases"], torch_version=torch_out and f"PyTorch {torch_out['torch']}",
        torch_missing=why, torch_check_max_abs_diff=torch_out and torch_out["check_max_abs_diff"],
        model=", ".join(f"{k}={v}" for k, v in model_kw.items()), train_step_s=train_s,
        train_tokens_per_s=args.train_batch * args.train_len / train_s, load_average=os.getloadavg()[0],
        jax=jax.__version__, wall_s=time.time() - start, machine=describe())
    md = report(results, args, results["machine"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
