"""BiGRU + attention training-step benchmark: our JAX model against PyTorch ``nn.GRU``.

Run from the repository root::

    python -m benchmarks.bench_gru                     # reference shapes, writes benchmarks/results/gru.md
    python -m benchmarks.bench_gru --quick --out /tmp/gru   # tiny smoke run

One *training step* = forward + backward + Adam update of the whole model
(``Embedding(V, E) -> BiGRU(U) -> masked additive attention(A) -> dropout ->
Dense(1)``, sigmoid BCE, Adam 1e-3), batch ``B`` of length ``T``. PyTorch runs
the same model with the fused ``nn.GRU(bidirectional=True)`` in a process of its
own (sharing a process makes the two runtimes' thread pools fight), both with
``--threads`` intra-op threads. Variants are timed *interleaved*: each round
runs every variant for ``--steps`` steps, so machine-load drift hits all alike;
the table reports the median step time over all rounds and the load average.

Lengths: ``--lengths real`` samples log-normal lengths (median ~0.92 T, capped
at T, like IMDB truncated at 250 tokens); ``full`` uses T everywhere. Our scan
always runs T steps (padding is masked), so only ``torch-packed`` profits from
shorter sequences.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from benchmarks import machine

TORCH_VARIANTS = ("torch-padded", "torch-packed")


def sample_lengths(b: int, t: int, mode: str, seed: int = 0) -> np.ndarray:
    if mode == "full":
        return np.full((b,), t, np.int32)
    rng = np.random.default_rng(seed)
    raw = np.round(rng.lognormal(np.log(0.92 * t), 0.45, size=b))
    return np.clip(raw, 1, t).astype(np.int32)


def make_batch(cfg: dict):
    rng = np.random.default_rng(1)
    lengths = sample_lengths(cfg["batch"], cfg["length"], cfg["lengths"])
    tokens = rng.integers(1, cfg["vocab"], size=(cfg["batch"], cfg["length"])).astype(np.int32)
    tokens[np.arange(cfg["length"])[None, :] >= lengths[:, None]] = 0
    labels = rng.integers(0, 2, size=(cfg["batch"],)).astype(np.float32)
    return tokens, lengths, labels


# ------------------------------------------------------------------ PyTorch worker


def torch_worker() -> int:
    """JSON lines on stdin: first the config, then ``{"variant", "steps"}``; replies per-step seconds."""
    import torch
    from torch import nn

    cfg = json.loads(sys.stdin.readline())
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    tokens, lengths, labels = (torch.from_numpy(a) for a in make_batch(cfg))
    tokens, lengths = tokens.long(), lengths.long()
    mask = torch.arange(cfg["length"])[None, :] < lengths[:, None]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg["vocab"], cfg["embed"], padding_idx=0)
            self.gru = nn.GRU(cfg["embed"], cfg["hidden"], batch_first=True, bidirectional=True)
            self.proj = nn.Linear(2 * cfg["hidden"], cfg["attn"])
            self.context = nn.Parameter(torch.randn(cfg["attn"]) / cfg["attn"] ** 0.5)
            self.drop = nn.Dropout(cfg["dropout"])
            self.head = nn.Linear(2 * cfg["hidden"], 1)

        def forward(self, packed: bool):
            x = self.embed(tokens)
            if packed:
                seq = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                h, _ = nn.utils.rnn.pad_packed_sequence(self.gru(seq)[0], batch_first=True,
                                                        total_length=cfg["length"])
            else:  # plain padded: the backward direction also reads the padding (cheaper, not length-exact)
                h, _ = self.gru(x)
            scores = torch.tanh(self.proj(h)) @ self.context
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            pooled = torch.einsum("bs,bsd->bd", weights, h)
            return self.head(self.drop(pooled))[:, 0]

    models = {}
    for name in TORCH_VARIANTS:
        model = Model()
        models[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
    loss_fn = nn.BCEWithLogitsLoss()
    print(json.dumps({"torch": f"{torch.__version__} (threads={torch.get_num_threads()})"}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        model, opt = models[req["variant"]]
        times = []
        for _ in range(req["steps"]):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(req["variant"] == "torch-packed"), labels)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times, "loss": float(loss.detach())}), flush=True)
    return 0


# ------------------------------------------------------------------ JAX side


def jax_variants(quick: bool):
    """(name, scan unroll, fused VJP) for levers (c) unroll and (d) fused weight-gradient VJP."""
    unrolls = (1, 2) if quick else (1, 2, 4, 8)
    out = [(f"jax-autodiff-u{u}", u, False) for u in unrolls]
    out += [(f"jax-fusedvjp-u{u}", u, True) for u in unrolls]
    return out


def build_jax_step(cfg: dict, unroll: int, fused: bool):
    import jax
    import jax.numpy as jnp
    import optax

    from flax_attention.models.bigru import BiGRUClassifier, BiGRUConfig

    model_cfg = BiGRUConfig(vocab_size=cfg["vocab"], embed_dim=cfg["embed"], hidden_size=cfg["hidden"],
                            attention_size=cfg["attn"], dropout_rate=cfg["dropout"], scan_unroll=unroll,
                            fused_vjp=fused)
    model = BiGRUClassifier(model_cfg)
    tokens, lengths, labels = (jnp.asarray(a) for a in make_batch(cfg))
    params = model.init(jax.random.PRNGKey(0), tokens[:1], lengths[:1])
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    def loss_fn(p, rng):
        logits, _ = model.apply(p, tokens, lengths, train=True, rngs={"dropout": rng})
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    def step(p, s, rng):
        loss, grads = jax.value_and_grad(loss_fn)(p, rng)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, jax.random.PRNGKey(0)).compile()
    state = {"p": params, "s": opt_state, "i": 0}

    def run(steps: int):
        times, loss = [], None
        for _ in range(steps):
            start = time.perf_counter()
            state["p"], state["s"], loss = compiled(state["p"], state["s"], jax.random.PRNGKey(state["i"]))
            loss.block_until_ready()
            times.append(time.perf_counter() - start)
            state["i"] += 1
        return times, float(loss)

    return run


# ------------------------------------------------------------------ driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for gru.md (created)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--length", type=int, default=250)
    p.add_argument("--vocab", type=int, default=10_000)
    p.add_argument("--embed", type=int, default=100)
    p.add_argument("--hidden", type=int, default=150)
    p.add_argument("--attn", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lengths", choices=("real", "full"), default="real")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all variants")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (JAX uses the process's cores)")
    p.add_argument("--variants", default="", help="comma list to run a subset (default: all)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch (e.g. not installed)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (CI smoke)")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.vocab, args.embed, args.hidden, args.attn = 8, 16, 100, 8, 8, 4
        args.rounds, args.steps = 2, 2
    for name in ("batch", "length", "rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def start_torch(cfg: dict):
    """The PyTorch worker process, or ``(None, reason)`` when PyTorch is unavailable."""
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_gru", "--torch-worker"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(cfg) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        return None, "PyTorch worker failed to start (is torch installed?)"
    return proc, json.loads(line)["torch"]


def torch_run(proc, variant: str, steps: int):
    proc.stdin.write(json.dumps({"variant": variant, "steps": steps}) + "\n")
    proc.stdin.flush()
    reply = json.loads(proc.stdout.readline())
    return reply["times"], reply["loss"]


def render(cfg, env, rows, loads) -> str:
    refs = {v: next((r["ms"] for r in rows if r["name"] == v), None) for v in TORCH_VARIANTS}
    lines = [
        "# BiGRU + attention training step (forward + backward + Adam)",
        "",
        f"B={cfg['batch']}, T={cfg['length']}, V={cfg['vocab']}, E={cfg['embed']}, U={cfg['hidden']}, "
        f"A={cfg['attn']}, dropout={cfg['dropout']}, lengths={cfg['lengths']} "
        f"(mean {cfg['mean_len']:.0f}, median {cfg['median_len']:.0f}).",
        "",
        f"{env['date_utc']} UTC, {env['machine']}, {env['cpu_count']} cores, jax {env['jax']}, "
        f"{machine.summary_line(env) + ', ' if 'cpu_model' in env else ''}"
        f"{env['torch']}. Load average (1 min) during the run: "
        f"min {min(loads):.2f}, median {np.median(loads):.2f}, max {max(loads):.2f}.",
        f"Median over {cfg['rounds']} interleaved rounds x {cfg['steps']} steps; ratio = the torch variant's "
        "ms / this row's ms (> 1: faster than that PyTorch variant). torch-padded runs nn.GRU on the padded "
        "batch (its backward direction reads the padding: cheaper, not length-exact); torch-packed packs the "
        "sequences (length-exact, like ours).",
        "",
        "| variant | ms/step | examples/s | ratio vs torch-padded | ratio vs torch-packed | steps timed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratios = [f"{refs[v] / r['ms']:.2f}" if refs[v] else "n/a" for v in TORCH_VARIANTS]
        lines.append(f"| {r['name']} | {r['ms']:.1f} | {cfg['batch'] / r['ms'] * 1e3:.0f} | {' | '.join(ratios)} "
                     f"| {r['n']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torch_worker:
        return torch_worker()
    import jax

    cfg = {k: getattr(args, k) for k in ("batch", "length", "vocab", "embed", "hidden", "attn", "dropout",
                                         "lengths", "threads", "rounds", "steps")}
    lens = make_batch(cfg)[1]
    cfg["mean_len"], cfg["median_len"] = float(lens.mean()), float(np.median(lens))
    wanted = set(filter(None, args.variants.split(",")))
    runners = {}
    for name, unroll, fused in jax_variants(args.quick):
        if not wanted or name in wanted:
            print(f"compiling {name} ...", file=sys.stderr, flush=True)
            runners[name] = build_jax_step(cfg, unroll, fused)
    torch_desc, proc = "torch: not run", None
    if not args.no_torch and (not wanted or wanted & set(TORCH_VARIANTS)):
        proc, torch_desc = start_torch(cfg)
        if proc is not None:
            for v in TORCH_VARIANTS:
                if not wanted or v in wanted:
                    runners[v] = lambda n, v=v: torch_run(proc, v, n)
            torch_desc = "torch " + torch_desc
        else:
            print(f"warning: {torch_desc}", file=sys.stderr)
    times = {name: [] for name in runners}
    loads = []
    try:
        for name, run in runners.items():  # warm-up (first-call costs) outside the timed rounds
            run(1)
        for rnd in range(args.rounds):
            order = list(runners)
            order = order[rnd % len(order):] + order[:rnd % len(order)]  # rotate: no fixed position bias
            for name in order:
                loads.append(os.getloadavg()[0])
                times[name] += runners[name](args.steps)[0]
            print(f"round {rnd + 1}/{args.rounds} done, load {loads[-1]:.2f}", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.stdin.close()
            proc.wait()
    rows = [{"name": n, "ms": float(np.median(t)) * 1e3, "n": len(t)} for n, t in times.items()]
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "machine": f"{platform.system()} {platform.machine()} {platform.processor() or ''}".strip(),
           "cpu_count": os.cpu_count(), "jax": jax.__version__, "torch": torch_desc, **machine.describe()}
    text = render(cfg, env, rows, loads)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gru.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "gru.json"), "w") as f:
        json.dump({"config": cfg, "env": env, "loads": loads, "times_s": times}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
