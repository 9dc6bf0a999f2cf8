"""``train.py --mesh``: jit + NamedSharding training against the pmap path, on 8 simulated CPU devices.

The test process already holds a 1-device JAX backend, so every multi-device
run is a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(IMDB runs inside ``tfds.testing.mock_data``, as in test_reliability.py).
Dropout is off where the two paths are compared: the mesh path draws one
dropout mask for the global batch, pmap one per device.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from flax_attention.linen.partitioning import logical_axis_annotations, mesh_axes
from flax_attention.training.mesh import parse_mesh, parse_seq_method

ROOT = Path(__file__).parents[1]
_MOCK_MAIN = ("import sys, tensorflow_datasets as tfds, train\n"
              "with tfds.testing.mock_data(num_examples=32):\n"
              "    rc = train.main(sys.argv[1:])\n"
              "sys.exit(rc)\n")
BIGRU = ["--vocab_size", "60", "--embed_dim", "8", "--hidden_size", "6", "--attention_size", "4",
         "--max_length", "12", "--batch_size", "8", "--log_every", "1", "--dropout_rate", "0",
         "--lr_schedule", "constant"]  # constant: num_epochs may grow on resume
TRANSFORMER = ["--model", "transformer", "--vocab_size", "60", "--d_model", "16", "--num_heads", "2", "--d_ff", "32",
               "--num_layers", "1", "--max_length", "12", "--batch_size", "8", "--log_every", "1",
               "--dropout_rate", "0", "--num_epochs", "1"]
SEQ2SEQ = ["--model", "seq2seq", "--task", "reverse", "--num_symbols", "4", "--max_len", "3", "--test_max_len", "4",
           "--d_model", "16", "--num_heads", "2", "--d_ff", "32", "--num_encoder_layers", "1",
           "--num_decoder_layers", "1", "--batch_size", "8", "--warmup_steps", "3", "--steps_per_epoch", "3",
           "--num_epochs", "2", "--eval_examples", "8", "--length_eval_per_length", "2", "--decode_batch", "8",
           "--eval_batch_size", "8", "--log_every", "1"]
CACHE = {}


def _env(devices):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, **CACHE, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(_child_compilation_cache):
    """Child processes share the worker's compilation cache (tests/conftest.py): same HLO -> same numerics."""
    CACHE.update(_child_compilation_cache)


def _start(devices, args, workdir, mock=True):
    cmd = [sys.executable, "-c", _MOCK_MAIN] if mock else [sys.executable, "train.py"]
    return subprocess.Popen(cmd + [*args, "--workdir", str(workdir)], cwd=ROOT, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_SEQUENCE_MAIN = """
import json, sys, tensorflow_datasets as tfds, train
mock, runs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for i, argv in enumerate(runs):
    print(f"===== run {i}", flush=True)
    if mock:
        with tfds.testing.mock_data(num_examples=32):
            rc = train.main(argv)
    else:
        rc = train.main(argv)
    print(f"===== rc {rc}", flush=True)
    if rc:
        sys.exit(rc)
"""


def _run_in_one_process(devices, runs, mock=True, timeout=600):
    """Trains ``[(args, workdir), ...]`` one after another in one process (one JAX start-up, one set of
    imports; pmap and mesh runs share the 8-device process); all must succeed. Returns each run's stdout."""
    argvs = [[*args, "--workdir", str(workdir)] for args, workdir in runs]
    out = subprocess.run([sys.executable, "-c", _SEQUENCE_MAIN, json.dumps(mock), json.dumps(argvs)], cwd=ROOT,
                         env=_env(devices), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    parts = out.stdout.split("===== run ")[1:]
    assert len(parts) == len(runs) and all("===== rc 0" in p for p in parts), out.stdout[-3000:]
    return parts


def _run_all(*procs, timeout=600):
    """Waits for every process; all must succeed. Returns their stdouts."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [o for o, _ in outs]


def _records(workdir, event):
    lines = Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _losses(workdir):
    return [r["loss"] for r in _records(workdir, "train")]


def _params(workdir, step=None):
    """``(step, {path: array})`` of a checkpoint, read as NumPy arrays whatever devices wrote it.

    (A restore without a target would rebuild the writer's device mesh, which this process lacks.)
    """
    import orbax.checkpoint as ocp
    from flax_attention.training.checkpointing import Checkpointer

    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), ckpt.manager.item_metadata(step).state)
        state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    finally:
        ckpt.close()
    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}


def _assert_same_state(a, b):
    (step_a, a), (step_b, b) = _params(a), _params(b)
    assert step_a == step_b and a.keys() == b.keys()
    for k in a:
        # Attention key biases shift every logit of a query equally: their exact gradient is 0, and
        # Adam turns the rounding noise of either path into lr-sized steps. Nothing else may differ.
        if "['key']['bias']" not in k:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- fast: flags and rules


def test_parse_mesh_reads_sizes_and_rejects_bad_text():
    assert parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "seq": 1}
    assert parse_mesh(" seq = 8 ") == {"data": 1, "fsdp": 1, "seq": 8}
    for bad in ("data=2,data=2", "model=2", "data=0", "data=two", "data=2;fsdp=4", ""):
        with pytest.raises(ValueError, match="AXIS=SIZE"):
            parse_mesh(bad)
    assert parse_mesh("data=2,seq=4:zigzag") == {"data": 2, "fsdp": 1, "seq": 4}
    assert parse_seq_method("data=2,seq=4:zigzag") == "context_parallel:zigzag"
    assert parse_seq_method("seq=4:ulysses") == "context_parallel:ulysses"
    assert parse_seq_method("data=2,seq=4") == "context_parallel"
    with pytest.raises(ValueError, match="not :striped"):
        parse_mesh("seq=4:striped")


def test_rules_shard_over_fsdp_and_fall_back_when_it_does_not_divide():
    mesh = AbstractMesh((2, 4, 1), ("data", "fsdp", "seq"))
    assert mesh_axes(("vocab", "embed"), (64, 6), mesh) == P("fsdp", None)
    assert mesh_axes(("vocab", "embed"), (61, 8), mesh) == P(None, "fsdp")  # the next named dimension
    assert mesh_axes(("vocab", "embed"), (61, 6), mesh) == P(None, None)  # nothing divides: replicated
    assert mesh_axes(("embed", "heads", "kv"), (16, 2, 8), mesh) == P("fsdp", None, None)  # one dim per axis
    assert mesh_axes(("batch", "length"), (8, 12), AbstractMesh((2, 2, 2), ("data", "fsdp", "seq"))) == \
        P(("data", "fsdp"), "seq")
    with pytest.raises(ValueError, match="do not match"):
        mesh_axes(("embed",), (4, 4), mesh)


def _models():
    from flax_attention.linen.layers import TransformerConfig
    from flax_attention.models.bigru import BiGRUClassifier, BiGRUConfig
    from flax_attention.models.classifier import TransformerClassifier, TransformerClassifierConfig
    from flax_attention.linen.transformer import Transformer

    tokens, lengths = jnp.ones((2, 8), jnp.int32), jnp.array([3, 8])
    yield BiGRUClassifier(BiGRUConfig(vocab_size=40, embed_dim=8, hidden_size=6, attention_size=4)), (tokens, lengths)
    yield TransformerClassifier(TransformerClassifierConfig(vocab_size=40, d_model=16, num_heads=2, d_ff=32,
                                                            num_layers=1, pooling="attention")), (tokens, lengths)
    yield Transformer(TransformerConfig(vocab_size=40, d_model=16, num_heads=4, num_kv_heads=2, d_ff=32,
                                        num_encoder_layers=1, num_decoder_layers=1, share_embeddings=False,
                                        tie_output=False)), (tokens, tokens)


@pytest.mark.parametrize("index", range(3))
def test_annotations_are_opt_in_and_unbox_to_the_plain_tree(index):
    """Plain init: no boxes (the pmap path and flax drop-ins see the same tree as before);
    annotated init: same paths, shapes and values once unboxed, every >= 2-D parameter named."""
    model, inputs = list(_models())[index]
    key = jax.random.PRNGKey(0)
    plain = model.init(key, *inputs)["params"]
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    assert not any(is_box(x) for x in jax.tree_util.tree_leaves(plain, is_leaf=is_box))
    with logical_axis_annotations():
        boxed = model.init(key, *inputs)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
    for path, leaf in leaves:
        value = leaf.value if is_box(leaf) else leaf
        assert not value.ndim >= 2 or is_box(leaf), f"{jax.tree_util.keystr(path)} has no logical names"
        if is_box(leaf):
            assert len(leaf.names) == value.ndim, jax.tree_util.keystr(path)
    unboxed = nn.meta.unbox(boxed)
    assert jax.tree_util.tree_structure(unboxed) == jax.tree_util.tree_structure(plain)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(unboxed)):
        np.testing.assert_array_equal(a, b)


def test_context_parallel_model_keeps_parameters_and_refuses_what_the_route_cannot_take():
    from flax_attention.linen.layers import TransformerConfig
    from flax_attention.models.bigru import BiGRUClassifier, BiGRUConfig
    from flax_attention.models.classifier import TransformerClassifier, TransformerClassifierConfig
    from flax_attention.training.mesh import context_parallel_model
    from flax_attention.linen.transformer import Transformer

    base = TransformerConfig(vocab_size=40, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                             num_decoder_layers=1)
    adapted = context_parallel_model(Transformer(base))
    assert adapted.config.attention_implementation == "context_parallel" and adapted.config.d_model == 16
    classifier = TransformerClassifierConfig(vocab_size=40, d_model=16, num_heads=2, d_ff=32, num_layers=1)
    assert context_parallel_model(TransformerClassifier(classifier)).attention_implementation == "context_parallel"
    tokens = jnp.ones((2, 8), jnp.int32)
    plain = Transformer(base).init(jax.random.PRNGKey(0), tokens, tokens)  # no mesh: the route runs locally
    np.testing.assert_array_equal(adapted.apply(plain, tokens, tokens), Transformer(base).apply(plain, tokens, tokens))
    for model, named in ((BiGRUClassifier(BiGRUConfig(vocab_size=40)), "recurrence"),
                         (Transformer(dataclasses.replace(base, position="alibi")), "--position alibi"),
                         (Transformer(dataclasses.replace(base, attention_dropout_rate=0.1)), "attention_dropout"),
                         (TransformerClassifier(dataclasses.replace(classifier, pooling="cls")), "--pooling cls")):
        with pytest.raises(ValueError, match=named):
            context_parallel_model(model)


@pytest.mark.parametrize("devices, args, expected", [
    (1, ["--mesh", "data=2"], "--mesh data=2,fsdp=1,seq=1 spans 2 devices but this run has 1"),
    (1, ["--mesh", "model=2"], "expected comma-separated AXIS=SIZE"),
    (8, ["--mesh", "data=2,fsdp=4", "--batch_size", "4"], "--batch_size 4 is not divisible by data x fsdp = 8"),
    (2, ["--mesh", "seq=2"], "BiGRUClassifier has none (the BiGRU's recurrence runs along the sequence)"),
])
def test_bad_mesh_flags_fail_with_one_line_before_writing(tmp_path, devices, args, expected):
    out = subprocess.run([sys.executable, "train.py", *BIGRU, *args, "--workdir", str(tmp_path / "w")], cwd=ROOT,
                         env=_env(devices), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], out.stderr[-2000:]
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- slow: 8 simulated devices

_SHARDING_CHILD = """
import json, jax, jax.numpy as jnp
from flax_attention.models.bigru import BiGRUClassifier, BiGRUConfig
from flax_attention.training.config import TrainConfig
from flax_attention.training.mesh import MeshPlacement, param_shardings
placement = MeshPlacement({"data": 2, "fsdp": 4, "seq": 1})
model = BiGRUClassifier(BiGRUConfig(vocab_size=60, embed_dim=8, hidden_size=6, attention_size=4))
state = placement.create_state(model, (jnp.ones((1, 12), jnp.int32), jnp.ones((1,), jnp.int32)), TrainConfig(),
                               jax.random.PRNGKey(0), 10)
emb, mu = state.params["embed"]["embedding"], state.opt_state[0].mu["embed"]["embedding"]
print(json.dumps({"specs": {k: str(v) for k, v in param_shardings(state).items()},
                  "shards": sorted({tuple(s.data.shape) for s in emb.addressable_shards}),
                  "devices": len(emb.sharding.device_set), "mu": str(mu.sharding.spec),
                  "step": str(state.step.sharding.spec)}))
"""


@pytest.mark.slow
def test_parameters_and_optimizer_state_are_split_over_fsdp():
    out = subprocess.run([sys.executable, "-c", _SHARDING_CHILD], cwd=ROOT, env=_env(8), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["specs"]["['embed']['embedding']"] == "P('fsdp', None)"
    assert got["shards"] == [[15, 8]] and got["devices"] == 8  # 60 rows / fsdp 4, replicated over data 2
    assert got["mu"] == "P('fsdp', None)"  # Adam's moments follow their parameter
    assert got["specs"]["['bigru']['w_ih']"] == "P(None, 'fsdp', None)"
    assert got["specs"]["['bigru']['b_hh']"] == "P(None, None)"  # 18 gates: fsdp 4 does not divide
    assert got["step"] == "P()"


@pytest.fixture(scope="module")
def bigru_runs(tmp_path_factory):
    """pmap on 8 devices for 2 epochs; the mesh for 1 epoch (checkpoint at step 4), both 4 steps/epoch."""
    root = tmp_path_factory.mktemp("bigru")
    outs = _run_in_one_process(8, [(BIGRU + ["--num_epochs", "2"], root / "pmap8"),
                                   (BIGRU + ["--num_epochs", "1", "--mesh", "data=2,fsdp=4"], root / "mesh8")])
    assert ["on a mesh" in out for out in outs] == [False, True]
    return root


@pytest.mark.slow
def test_bigru_mesh_reproduces_the_pmap_losses(bigru_runs):
    pmap, mesh = _losses(bigru_runs / "pmap8"), _losses(bigru_runs / "mesh8")
    assert len(mesh) == 4 and len(pmap) == 8
    np.testing.assert_allclose(mesh, pmap[:4], rtol=1e-5)
    (ev_p, _), (ev_m,) = _records(bigru_runs / "pmap8", "eval"), _records(bigru_runs / "mesh8", "eval")
    np.testing.assert_allclose(ev_m["test_loss"], ev_p["test_loss"], rtol=1e-5)
    assert ev_m["test_examples"] == ev_p["test_examples"] == 32


@pytest.mark.slow
def test_checkpoints_move_between_device_counts_meshes_and_pmap(bigru_runs, tmp_path):
    """The 8-device mesh checkpoint resumes on a 4-device mesh and on 4-device pmap; the 8-device pmap
    checkpoint resumes on a 4-device mesh. Each finishes epoch 2 as the uninterrupted pmap run did."""
    mesh_to_mesh, mesh_to_pmap, pmap_to_mesh = tmp_path / "m2m", tmp_path / "m2p", tmp_path / "p2m"
    shutil.copytree(bigru_runs / "mesh8", mesh_to_mesh)
    shutil.copytree(bigru_runs / "mesh8", mesh_to_pmap)
    shutil.copytree(bigru_runs / "pmap8", pmap_to_mesh)
    shutil.rmtree(pmap_to_mesh / "checkpoints" / "8")  # resume from the pmap checkpoint of step 4
    outs = _run_in_one_process(4, [(BIGRU + ["--num_epochs", "2", "--mesh", "fsdp=4"], mesh_to_mesh),
                                   (BIGRU + ["--num_epochs", "2"], mesh_to_pmap),
                                   (BIGRU + ["--num_epochs", "2", "--mesh", "data=2,fsdp=2"], pmap_to_mesh)])
    reference = _losses(bigru_runs / "pmap8")
    assert ["on a mesh" in out for out in outs] == [True, False, True]
    for w, out in zip((mesh_to_mesh, mesh_to_pmap, pmap_to_mesh), outs):
        assert "Resuming from step 4" in out and "4 device(s)" in out
        np.testing.assert_allclose(_losses(w), reference, rtol=1e-5, err_msg=str(w))
        _assert_same_state(bigru_runs / "pmap8", w)


@pytest.mark.slow
def test_two_processes_on_one_mesh_match_one_process(bigru_runs, tmp_path):
    """2 processes x 4 devices (jax.distributed, Gloo) on a data=2,fsdp=4 mesh == 1 process x 8 devices:
    each process fills only its shards of the batch and of the sharded state, and writes its checkpoint shards."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = BIGRU + ["--num_epochs", "1", "--mesh", "data=2,fsdp=4", "--coordinator_address", f"127.0.0.1:{port}",
                    "--num_processes", "2"]
    outs = _run_all(*[_start(4, args + ["--process_id", str(p)], tmp_path / "multi") for p in (0, 1)])
    assert "8 device(s) on a mesh data=2 x fsdp=4 x seq=1 [cpu] in 2 process(es)" in outs[0]
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(bigru_runs / "mesh8"), rtol=1e-5)
    _assert_same_state(bigru_runs / "mesh8", tmp_path / "multi")


@pytest.mark.slow
@pytest.mark.parametrize("args, mock, meshes", [
    (SEQ2SEQ, False, ["data=2,fsdp=4", "data=2,seq=4"]),
    (TRANSFORMER, True, ["data=2,fsdp=4", "data=2,seq=4", "data=2,seq=4:zigzag"]),
], ids=["seq2seq", "transformer"])
def test_transformer_models_on_the_mesh_reproduce_the_pmap_losses(tmp_path, args, mock, meshes):
    """--mesh data=2,fsdp=4 (batch over data x fsdp, parameters over fsdp) and --mesh data=2,seq=4 (batch
    over 2, every sequence over 4 with context-parallel attention, ring or zigzag): the losses, test losses,
    greedy decodes and final state of the pmap run. One 8-device process trains them all (one pmap reference)."""
    runs = [(args, tmp_path / "pmap")] + [(args + ["--mesh", m], tmp_path / f"mesh{i}") for i, m in enumerate(meshes)]
    outs = _run_in_one_process(8, runs, mock)
    assert "on a mesh" not in outs[0] and all("on a mesh" in out for out in outs[1:])  # each took its path
    for _, w in runs[1:]:
        np.testing.assert_allclose(_losses(w), _losses(tmp_path / "pmap"), rtol=1e-5, err_msg=str(w))
        for a, b in zip(_records(tmp_path / "pmap", "eval"), _records(w, "eval")):
            np.testing.assert_allclose(b["test_loss"], a["test_loss"], rtol=1e-5)
            assert b.get("exact_match") == a.get("exact_match")  # greedy decoding of the seq2seq task
        _assert_same_state(tmp_path / "pmap", w)


_SEQ_CHILD = """
import json, jax, jax.numpy as jnp, numpy as np
from flax_attention.linen.layers import TransformerConfig
from flax_attention.training.config import TrainConfig
from flax_attention.training.mesh import MeshPlacement
from flax_attention.training.seq2seq import seq2seq_loss
from flax_attention.linen.transformer import Transformer
placement = MeshPlacement({"data": 2, "fsdp": 1, "seq": 4})
model = Transformer(TransformerConfig(vocab_size=12, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                                      num_decoder_layers=1, dropout_rate=0.0))
state = placement.create_state(model, (np.ones((1, 2), np.int32),) * 2, TrainConfig(), jax.random.PRNGKey(0), 10)
rng = np.random.default_rng(0)
batch = placement.batch({k: rng.integers(1, 12, (4, 7)).astype(np.int32) for k in ("src", "tgt_in", "tgt_out")})
step = jax.jit(lambda s, b: s.apply_fn({"params": s.params}, b["src"], b["tgt_in"]))
with placement.context():
    hlo = step.lower(state, batch).compile().as_text()
print(json.dumps({"shape": batch["src"].shape, "spec": str(batch["src"].sharding.spec),
                  "ppermute": "collective-permute" in hlo,
                  "impl": state.apply_fn.__self__.config.attention_implementation}))
"""


@pytest.mark.slow
def test_seq_axis_splits_tokens_and_runs_the_ring():
    out = subprocess.run([sys.executable, "-c", _SEQ_CHILD], cwd=ROOT, env=_env(8), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["shape"] == [4, 8]  # 7 tokens padded to a multiple of seq = 4
    assert got["spec"] == "P(('data', 'fsdp'), 'seq')"
    assert got["impl"] == "context_parallel" and got["ppermute"]  # K/V blocks travel around the ring


@pytest.mark.slow
def test_mesh_sigterm_checkpoints_the_step_and_resume_matches_uninterrupted(tmp_path):
    args = BIGRU + ["--num_epochs", "6", "--mesh", "data=2,fsdp=4"]
    reference = tmp_path / "reference"
    _run_all(_start(8, args, reference))
    w = tmp_path / "run"
    proc, t_end = _start(8, args, w), time.time() + 300
    while proc.poll() is None and time.time() < t_end:
        if (w / "metrics.jsonl").exists() and any(r["step"] >= 5 for r in _records(w, "train")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("stopped: SIGTERM received")]
    assert len(line) == 1, err[-2000:]
    stopped_at, _ = _params(w)
    assert 5 <= stopped_at < 24 and f"after step {stopped_at}" in line[0]
    out, = _run_all(_start(8, args, w))
    assert f"Resuming from step {stopped_at}" in out
    _assert_same_state(reference, w)


@pytest.mark.slow
def test_mesh_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    w = tmp_path / "run"
    proc = _start(8, BIGRU + ["--num_epochs", "2", "--checkpoint_every", "1", "--learning_rate", "1e30",
                              "--mesh", "fsdp=8"], w)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "diverged" in line[0], err[-2000:]
    step, leaves = _params(w)
    assert f"last good checkpoint (step {step})" in line[0] and step < 8
    assert all(np.isfinite(v).all() for v in leaves.values() if v.dtype.kind == "f")


_EMBED_CHILD = """
import json, sys, numpy as np, tensorflow_datasets as tfds, train
from flax_attention.data.word_vectors import save_word_vectors
w, tiny = sys.argv[1], sys.argv[2:]
with tfds.testing.mock_data(num_examples=16):
    print("RC", train.main(tiny + ["--workdir", w + "/plain", "--num_epochs", "1"]))
    words = json.load(open(w + "/plain/vocab.json"))["words"][:5]
    save_word_vectors(w + "/vec.txt", words, np.arange(5 * 8, dtype=np.float32).reshape(5, 8) / 10)
    print("RC", train.main(tiny + ["--workdir", w + "/frozen", "--num_epochs", "1", "--embeddings", w + "/vec.txt",
                                   "--freeze_embeddings", "true"]))
print("WORDS", json.dumps(words))
"""


@pytest.mark.slow
def test_mesh_loads_pretrained_embeddings_and_keeps_a_frozen_table_exact(tmp_path):
    """--embeddings / --freeze_embeddings on the mesh: the file's rows are placed into the sharded table
    and the frozen (optax.multi_transform) table never moves."""
    out = subprocess.run([sys.executable, "-c", _EMBED_CHILD, str(tmp_path), *BIGRU, "--mesh", "fsdp=8"], cwd=ROOT,
                         env=_env(8), capture_output=True, text=True, timeout=600)
    assert [line for line in out.stdout.splitlines() if line.startswith("RC ")] == ["RC 0", "RC 0"], \
        out.stdout[-2000:] + out.stderr[-3000:]
    vocab = json.loads((tmp_path / "frozen" / "vocab.json").read_text())["words"]
    ids = [vocab.index(word) + 3 for word in json.loads(out.stdout.split("WORDS ")[1])]
    step, state = _params(tmp_path / "frozen")
    assert step == 2 and int(state["['step']"]) == 2
    table = state["['params']['embed']['embedding']"]
    np.testing.assert_array_equal(table[ids], np.arange(40, dtype=np.float32).reshape(5, 8) / 10)
