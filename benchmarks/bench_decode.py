"""Decoding throughput, before/after caching the cross-attention keys/values.

Run from the repository root::

    python -m benchmarks.bench_decode                       # writes benchmarks/results/decode.{json,md}
    python -m benchmarks.bench_decode --quick --out /tmp/decode   # smoke run

Compares two versions of the package: ``--before`` (a git revision, default
the commit before issue 12, whose decoder re-projected the encoder states in
every cross-attention at every step) and the working tree. Each version runs
in its own process (a fresh ``git archive`` of the revision on ``PYTHONPATH``);
the two alternate over ``--rounds`` rounds so that machine-load drift hits
both alike, and the table reports the median over all timed calls.

Model: the small CPU Transformer (E=64, N=4, F=256, 2+2 layers, vocabulary
16), random parameters. ``eos_id=-1`` (never generated), so every call decodes
exactly ``max_len`` tokens per sequence; throughput = generated tokens per
second (beam: ``B·W·L`` hypothesis tokens).
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

# (search, batch B, source length S, generated tokens L, beam W); "step" = a Python
# loop over a jitted one-token Transformer.decode call (the README's step-wise API).
CONFIGS = [("greedy", 32, 20, 21, 1), ("greedy", 32, 100, 32, 1), ("greedy", 16, 400, 16, 1),
           ("beam", 8, 20, 21, 4), ("beam", 8, 100, 32, 4),
           ("step", 32, 20, 21, 1), ("step", 32, 100, 32, 1), ("step", 16, 400, 16, 1)]
QUICK = [("greedy", 4, 10, 5, 1), ("beam", 2, 10, 5, 2), ("step", 2, 10, 5, 1)]


def _stepwise(model, params, src, length):
    """Greedy decoding by hand: one jitted ``Transformer.decode`` call per token (encoder excluded).

    The old API had to pass ``encoded`` at every step (the cross-attention
    keys/values were re-projected by every call); the new one passes it once.
    """
    import inspect

    import jax
    import jax.numpy as jnp

    from flax_attention.linen.transformer import Transformer, init_cache

    reuse = "lengths" in inspect.signature(Transformer.decode).parameters  # the new API
    def step_fn(cache, tok, enc):  # one call per token: the next token and the new cache
        logits, state = model.apply({"params": params, "cache": cache}, tok, enc, src, decode=True,
                                    mutable=["cache"], method=Transformer.decode)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], state["cache"]

    # Donating the cache lets the unchanged cross-attention memory alias its input
    # instead of being copied into the output at every step (both versions alike).
    step = jax.jit(step_fn, donate_argnums=0)

    encode = jax.jit(lambda s: model.apply({"params": params}, s, method=Transformer.encode))

    # Outside the timing: init_cache traces the model; encoding is the same work in both versions.
    empty, encoded = init_cache(model, src.shape[0], length), encode(src)

    def call():
        cache, tok = jax.tree.map(jnp.copy, empty), jnp.ones((src.shape[0], 1), jnp.int32)  # BOS
        for i in range(length):
            tok, cache = step(cache, tok, None if reuse and i else encoded)
        return tok

    return call


def worker(configs, repeats):
    """Times every config with the ``flax_attention`` on ``sys.path``; prints one JSON line."""
    import jax
    import jax.numpy as jnp

    from flax_attention.linen.decoding import beam_search, greedy_decode
    from flax_attention.linen.layers import TransformerConfig
    from flax_attention.linen.transformer import Transformer

    cfg = TransformerConfig(vocab_size=16, d_model=64, num_heads=4, d_ff=256, num_encoder_layers=2,
                            num_decoder_layers=2, dropout_rate=0.0, max_len=512)
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
    out = {}
    for search, b, s, length, w in configs:
        src = jax.random.randint(jax.random.key(1), (b, s), 3, 16, jnp.int32)
        if search == "step":
            call = _stepwise(model, params, src, length)
        elif search == "greedy":
            call = lambda: greedy_decode(model, params, src, max_len=length, eos_id=-1)  # noqa: E731
        else:
            call = lambda: beam_search(model, params, src, beam_size=w, max_len=length, eos_id=-1)[0]  # noqa: E731
        jax.block_until_ready(call())  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
        out[f"{search} B={b} S={s} L={length} W={w}"] = times
    print(json.dumps(out))


def _run(code_dir, configs, repeats):
    env = dict(os.environ, PYTHONPATH=code_dir, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", f"import benchmarks.bench_decode as b; b.worker({configs!r}, {repeats})"]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = code_dir + os.pathsep + here  # the package from code_dir, this script from here
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code_dir, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="1c02be6")
    p.add_argument("--repo", default=None, help="git repository holding --before (default: this checkout)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/decode")
    args = p.parse_args()
    configs = QUICK if args.quick else CONFIGS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before_dir = tempfile.mkdtemp(prefix="decode_before_")
    subprocess.run(f"git -C {args.repo or root} archive {args.before} flax_attention | tar -x -C {before_dir}",
                   shell=True, check=True)
    versions = {f"before ({args.before})": before_dir, "after (working tree)": root}
    times = {v: {} for v in versions}
    loads = []
    for r in range(args.rounds):
        for name, code in versions.items():
            for key, ts in _run(code, configs, args.repeats).items():
                times[name].setdefault(key, []).extend(ts)
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}/{args.rounds} {name} done (load {loads[-1]:.1f})", flush=True)
    rows = []
    for search, b, s, length, w in configs:
        key = f"{search} B={b} S={s} L={length} W={w}"
        med = {v: float(np.median(times[v][key])) for v in versions}
        tokens = b * w * length
        rows.append((key, *[(med[v], tokens / med[v]) for v in versions]))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"times_s": times, "load_average": loads}, f, indent=1)
    (bname, aname) = versions
    lines = [
        "# Decoding throughput: cross-attention keys/values cached once per source",
        "",
        "`python -m benchmarks.bench_decode` — small Transformer (E=64, N=4, F=256, 2+2 layers, V=16), "
        "random parameters, every sequence decoded to `L` tokens (`eos_id=-1`), jitted "
        "`greedy_decode` / `beam_search`, compile excluded. Median of "
        f"{args.rounds} interleaved rounds x {args.repeats} calls per version. `step` rows: a Python "
        "loop over a jitted one-token `Transformer.decode` call (cache donated, encoder excluded), "
        "`encoded` passed at every step before (the only way then) and only at the first step after.",
        "",
        "Inside the jitted `greedy_decode`/`beam_search` loops the old code already computed the "
        "cross-attention keys/values once: XLA's while-loop-invariant code motion hoists their "
        "projections out of the loop (checked in the optimised HLO of greedy, B=32, S=100: no "
        "`[B*S, E]` projection `dot` in the loop body, before or after). So the explicit cache "
        "changes nothing there: those rows should read ~1.0x, and their spread shows the noise of "
        "this loaded machine (repeating a row moved it by up to 2x). It pays off where each step "
        "is a separate call (`step` rows).",
        "",
        "Machine: 2-core AMD EPYC VM, **shared and loaded** (other agents' training jobs ran "
        f"throughout; 1-minute load average {min(loads):.1f}-{max(loads):.1f} on 2 cores), so absolute "
        "figures are pessimistic and noisy; the before/after ratio is the useful number.",
        "",
        f"| config | {bname} s | tokens/s | {aname} s | tokens/s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for key, (tb, rb), (ta, ra) in rows:
        lines.append(f"| {key} | {tb:.3f} | {rb:.0f} | {ta:.3f} | {ra:.0f} | {tb / ta:.2f}x |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
