"""Multi-process training: 2 processes x 2 CPU devices == 1 process x 4 devices.

The processes talk through ``jax.distributed`` on 127.0.0.1 (Gloo collectives
on CPU). Both runs see the same mock reviews (``tfds.testing.mock_data`` in
each child) and keep dropout on, so the match also checks that process ``p``
feeds exactly the rows the single process gives devices ``2p`` and ``2p + 1``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_attention.training import distributed

ROOT = Path(__file__).parents[1]
_MOCK_MAIN = ("import sys, tensorflow_datasets as tfds, train\n"
              "with tfds.testing.mock_data(num_examples=32):\n"
              "    rc = train.main(sys.argv[1:])\n"
              "sys.exit(rc)\n")
RUN = ["--vocab_size", "60", "--embed_dim", "8", "--hidden_size", "6", "--attention_size", "4",
       "--max_length", "12", "--batch_size", "8", "--num_epochs", "1", "--log_every", "1"]


def _env(devices):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(workdir):
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir, "checkpoints").absolute(), item_names=("state", "meta")) as mgr:
        step = mgr.latest_step()
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state["params"])}


def _losses(workdir):
    records = [json.loads(line) for line in Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"], [r for r in records if r["event"] == "eval"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path):
    single = tmp_path / "single"
    ref = subprocess.Popen([sys.executable, "-c", _MOCK_MAIN, *RUN, "--workdir", str(single)], cwd=ROOT,
                           env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    multi, port = tmp_path / "multi", _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _MOCK_MAIN, *RUN, "--workdir", str(multi),
                               "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                               "--process_id", str(p)], cwd=ROOT, env=_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (0, 1)]
    outs = [p.communicate(timeout=400) for p in procs + [ref]]
    for p, (_, err) in zip(procs + [ref], outs):
        assert p.returncode == 0, err[-3000:]
    assert "4 device(s) [cpu] in 2 process(es)" in outs[0][0]
    # Process 1 prints nothing itself (Gloo's C++ connection notes aside, which C++ may split mid-line).
    assert [l for l in outs[1][0].splitlines()
            if l.strip() and not l.startswith("[Gloo]") and "connected peer ranks" not in l] == []
    assert "4 device(s) [cpu] in 1 process(es)" in outs[2][0]

    losses_1, evals_1 = _losses(single)
    losses_2, evals_2 = _losses(multi)
    assert len(losses_2) == len(losses_1) == 4  # one record per step: written once, by process 0
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)
    assert len(evals_2) == 1 and evals_2[0]["test_examples"] == 32  # every test review counted once
    np.testing.assert_allclose(evals_2[0]["test_loss"], evals_1[0]["test_loss"], rtol=1e-5)
    step_1, p1 = _params(single)
    step_2, p2 = _params(multi)
    assert step_1 == step_2 == 4
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert sorted(x.name for x in multi.iterdir()) == sorted(x.name for x in single.iterdir())


# ----------------------------------------------------------------------------- pure helpers


def test_process_batch_blocks_equal_single_process_device_split():
    """Process p's [L, B/(P L)] block == devices p*L .. p*L+L-1 of the single-process split."""
    batch = {"x": np.arange(24 * 3).reshape(24, 3), "y": np.arange(24)}
    single = distributed.process_batch(batch, 0, 1, 4)
    parts = [distributed.process_batch(batch, p, 2, 2) for p in (0, 1)]
    for k in batch:
        np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), single[k])
        assert parts[1][k].shape == (2, 6) + batch[k].shape[1:]
    with pytest.raises(ValueError, match="multiple of 8"):
        distributed.process_batch({"y": np.arange(12)}, 0, 2, 4)


def test_resolve_flags_env_and_errors():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve(environ={}) is None
    assert distributed.resolve(num_processes=1, environ={}) is None
    assert distributed.resolve(environ=env) == distributed.DistributedConfig("10.0.0.1:1234", 4, 3)
    # Flags win over the environment.
    assert distributed.resolve("host:99", 2, 0, environ=env) == distributed.DistributedConfig("host:99", 2, 0)
    for kwargs, msg in ((dict(num_processes=2, process_id=0), "coordinator"),
                        (dict(coordinator_address="h:1", num_processes=2), "--process_id must be in 0..1"),
                        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "0..1"),
                        (dict(coordinator_address="nohostport", num_processes=2, process_id=0), "HOST:PORT"),
                        (dict(process_id=1), "single-process")):
        with pytest.raises(distributed.DistributedSetupError, match=msg):
            distributed.resolve(environ={}, **kwargs)
    with pytest.raises(distributed.DistributedSetupError, match="JAX_NUM_PROCESSES must be an integer"):
        distributed.resolve(environ={"JAX_NUM_PROCESSES": "two"})
