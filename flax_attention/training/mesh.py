"""Training on a device mesh (``train.py --mesh data=D[,fsdp=F][,seq=S]``): ``jax.jit`` + ``NamedSharding``.

The mesh has the axes ``("data", "fsdp", "seq")`` (absent ones have size 1)
over all devices of all processes; ``D * F * S`` must equal the device count.

* Batch: every array's first axis over ``("data", "fsdp")``; token arrays
  ``[B, T]`` also their second over ``seq`` (``PartitionSpec(("data",
  "fsdp"), "seq")``), so ``--batch_size`` must be a multiple of ``D * F``.
* Parameters and optimizer state: sharded over ``fsdp`` by their logical
  axis names (:mod:`flax_attention.linen.partitioning`), replicated over ``data``
  and ``seq``; initialised directly in that layout (``jit`` with
  ``out_shardings``), never whole on one device.
* Steps: one ``jax.jit`` program each, run under ``jax.set_mesh(mesh)``
  (context-parallel attention reads the mesh from there). The loss is the
  global-batch mean, as in the pmap path, so both follow the same trajectory
  up to float rounding; only dropout masks differ (one key per step for the
  global batch instead of one per device).
* Sequence (``seq > 1``, Transformer models): the state's ``apply_fn`` is
  the model with ``attention_implementation="context_parallel"``
  (:func:`context_parallel_model`); token arrays are right-padded with id 0
  to a multiple of ``S``.
* Checkpoints: the sharded global arrays (orbax writes each process's
  shards); they restore onto any mesh or device count, or onto the pmap path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_attention.linen.partitioning import LOGICAL_AXIS_RULES, logical_axis_annotations, logical_to_mesh_sharding
from flax_attention.training.steps import TrainState, make_optimizer

AXES = ("data", "fsdp", "seq")
BATCH = ("data", "fsdp")
TOKEN_KEYS = ("tokens", "src", "tgt_in", "tgt_out")  # [B, T] arrays whose T may be split over "seq"
CONTEXT_PARALLEL = "context_parallel"  # the attention implementation that splits T over "seq"


SEQ_METHODS = {"ring": CONTEXT_PARALLEL, "zigzag": CONTEXT_PARALLEL + ":zigzag",
               "ulysses": CONTEXT_PARALLEL + ":ulysses"}


def parse_seq_method(text: str) -> str:
    """The attention implementation that ``seq=S[:METHOD]`` in the ``--mesh`` text asks for.

    ``ring`` (default: contiguous chunks), ``zigzag`` (ring with the causal
    load-balanced layout) or ``ulysses`` (all-to-all; heads divisible by S).
    """
    m = re.search(r"seq\s*=\s*\d+\s*:\s*(\w+)", text)
    method = m.group(1) if m else "ring"
    if method not in SEQ_METHODS:
        raise ValueError(f"--mesh {text!r}: the seq axis takes :{', :'.join(SEQ_METHODS)} after its size "
                         f"(e.g. seq=4:zigzag), not :{method}.")
    return SEQ_METHODS[method]


def parse_mesh(text: str) -> Dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4, "seq": 1}`` (a ``:METHOD`` after seq's size is
    read by :func:`parse_seq_method`).

    Raises:
      ValueError: unknown axis, repeated axis, or a size that is not a positive integer.
    """
    parse_seq_method(text)
    sizes: Dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*(?::\s*\w+\s*)?", part)
        if not m or m.group(1) not in AXES or m.group(1) in sizes or int(m.group(2)) < 1:
            raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS among "
                             f"{', '.join(AXES)} (each once) and SIZE >= 1, e.g. --mesh data=2,fsdp=4.")
        sizes[m.group(1)] = int(m.group(2))
    return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(sizes: Dict[str, int]) -> Mesh:
    """The ``("data", "fsdp", "seq")`` mesh over every device of every process."""
    n = jax.device_count()
    if math.prod(sizes.values()) != n:
        shown = ",".join(f"{a}={s}" for a, s in sizes.items())
        raise ValueError(f"--mesh {shown} spans {math.prod(sizes.values())} devices but this run has {n} "
                         f"({jax.process_count()} process(es)); make the sizes multiply to {n}.")
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


@functools.lru_cache(maxsize=None)
def _all_finite() -> Callable:
    def check(leaves):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)
    return jax.jit(check)


class MeshPlacement:
    """The training state and batches as global arrays on a ``("data", "fsdp", "seq")`` mesh."""

    sharded_checkpoints = True

    def __init__(self, sizes: Dict[str, int], rules=LOGICAL_AXIS_RULES, seq_method: str = CONTEXT_PARALLEL):
        self.sizes, self.rules, self.seq_method = dict(sizes), rules, seq_method
        self.mesh = make_mesh(self.sizes)
        self.replicated = NamedSharding(self.mesh, P())
        self.state_shardings: Any = None  # a TrainState of NamedShardings, set by create_state

    def describe(self) -> str:
        return f"{jax.device_count()} device(s) on a mesh " + " x ".join(f"{a}={s}" for a, s in self.sizes.items())

    def check_batch(self, batch_size: int, flag: str) -> None:
        rows = self.sizes["data"] * self.sizes["fsdp"]
        if batch_size % rows:
            raise ValueError(f"{flag} {batch_size} is not divisible by data x fsdp = {rows} (the mesh axes "
                             f"that split the batch); use a multiple of {rows}.")

    def check_model(self, model) -> None:
        """A ``seq`` axis needs Transformer attention that the context-parallel route takes."""
        if self.sizes["seq"] > 1:
            context_parallel_model(model, self.seq_method)

    def context(self):
        return jax.set_mesh(self.mesh)

    # ------------------------------------------------------------------ state

    def create_state(self, model, init_inputs: Tuple, config, rng, total_steps: int, wrap_optimizer=None):
        """A fresh ``TrainState`` (same values as the pmap path's) initialised in its sharded layout.

        With a ``seq`` axis the state's ``apply_fn`` is the model with
        context-parallel attention (:func:`context_parallel_model`); its
        parameters are the model's own, initialised by the plain model.
        """
        apply_fn = context_parallel_model(model, self.seq_method).apply if self.sizes["seq"] > 1 else model.apply

        def init_params(key, annotated: bool):
            with logical_axis_annotations(annotated):
                return model.init(jax.random.split(key)[0], *init_inputs)["params"]

        def optimizer(params):
            tx = make_optimizer(config, max(int(total_steps), 1))
            return tx if wrap_optimizer is None else wrap_optimizer(tx, params)

        def init(key, annotated: bool, tx):
            return TrainState.create(apply_fn=apply_fn, params=init_params(key, annotated), tx=tx,
                                     dropout_key=jax.random.split(key)[1])

        # The boxed tree (abstract: nothing is computed) gives every leaf of the params and
        # of the optimizer state its logical names; the real state is built unboxed.
        boxed = jax.eval_shape(lambda k: init_params(k, True), rng)
        tx = optimizer(nn.meta.unbox(boxed))
        shardings = logical_to_mesh_sharding(jax.eval_shape(lambda k: init(k, True, optimizer(boxed)), rng),
                                             self.mesh, self.rules)
        # Static fields (model, optimizer) as the real state has them.
        self.state_shardings = shardings.replace(apply_fn=apply_fn, tx=tx)
        with self.context():
            return jax.jit(lambda k: init(k, False, tx), out_shardings=self.state_shardings)(rng)

    def restore_latest(self, ckpt, state, report=print) -> Tuple[Any, Dict[str, Any]]:
        """The newest intact checkpoint, read straight into this mesh's shardings (whatever wrote it)."""
        target = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                        state, self.state_shardings)
        return ckpt.restore_latest(target, report=report)

    def host_template(self, state):
        """A restore target whose checkpoints come back as host NumPy arrays (e.g. for model selection)."""
        template = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), state)
        return template.replace(step=np.asarray(self.step(state), template.step.dtype))

    def params(self, state):
        """The parameters as host NumPy arrays (gathered from every process), as the decoding functions take them."""
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(state.params, tiled=True)

    def with_params(self, state, params):
        return state.replace(params=self._put(params, self.state_shardings.params))

    def step(self, state) -> int:
        return int(np.asarray(state.step))

    def saveable(self, state):
        return state

    def finite(self, saveable) -> bool:
        leaves = [x for x in jax.tree_util.tree_leaves(saveable)
                  if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
        return bool(np.asarray(_all_finite()(leaves)))

    @staticmethod
    def _put(tree, shardings):
        """Host arrays (the same on every process) -> global arrays; each process fills only its shards."""
        def one(x, s):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
        return jax.tree_util.tree_map(one, tree, shardings)

    # ------------------------------------------------------------------ steps and batches

    def batch_sharding(self, key: str, ndim: int) -> NamedSharding:
        seq = "seq" if key in TOKEN_KEYS and ndim >= 2 and self.sizes["seq"] > 1 else None
        return NamedSharding(self.mesh, P(BATCH, seq) if seq else P(BATCH))

    def batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
        """The global batch (computed identically by every process) as arrays sharded over the mesh.

        With a ``seq`` axis, token arrays are right-padded with id 0 (padding
        in every task: masked as keys, weight 0 in the loss, after every real
        position) to a multiple of its size.
        """
        # zigzag splits each shard into two chunks: pad to a multiple of 2·seq
        seq = self.sizes["seq"] * (2 if self.seq_method.endswith(":zigzag") else 1)
        if seq > 1:
            batch = {k: np.pad(v, [(0, 0), (0, -v.shape[1] % seq)] + [(0, 0)] * (v.ndim - 2))
                     if k in TOKEN_KEYS and v.ndim >= 2 else v for k, v in batch.items()}
        return {k: self._put(v, self.batch_sharding(k, np.ndim(v))) for k, v in batch.items()}

    def train_step(self, loss_fn: Callable) -> Callable:
        step = jax.jit(functools.partial(_train_step, loss_fn), donate_argnums=(0,),
                       out_shardings=(self.state_shardings, self.replicated))
        return self._in_mesh(step)

    def eval_step(self, loss_fn: Callable) -> Callable:
        step = jax.jit(lambda state, batch: loss_fn(state.params, state.apply_fn, batch, {}, False)[1],
                       out_shardings=self.replicated)
        return self._in_mesh(step)

    def _in_mesh(self, step: Callable) -> Callable:
        def run(*args):
            with self.context():
                return step(*args)
        return run


def _train_step(loss_fn: Callable, state: TrainState, batch):
    """One optimiser step on the global batch: the gradient of the mean loss over its real examples."""
    key = jax.random.fold_in(state.dropout_key, state.step)

    def mean_loss(params):
        loss_sum, sums = loss_fn(params, state.apply_fn, batch, {"dropout": key}, True)
        return loss_sum / jnp.maximum(sums["weight"], 1.0), sums

    (_, sums), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), sums


def context_parallel_model(model, implementation: str = CONTEXT_PARALLEL):
    """``model`` (same parameters) with every attention layer context-parallel over the ``seq`` mesh axis.

    The route (``implementation="context_parallel"``, see
    :mod:`flax_attention.functional.context_parallel`) takes key-padding masks and
    ``is_causal`` only, so attention dropout, ALiBi biases, sliding windows and
    ``cls`` pooling (one extra position) are refused here, before anything is written.

    Raises:
      ValueError: the model has no Transformer attention to split (the
        BiGRU's recurrence runs along the sequence), or uses one of the above.
    """
    from flax_attention.linen.layers import TransformerConfig
    from flax_attention.models.classifier import TransformerClassifier

    if isinstance(model, TransformerClassifier):
        config, problems = model.config.encoder_config(), []
        if model.config.pooling == "cls":
            problems.append("--pooling cls (its extra position breaks the even split; use mean or attention)")
        adapted = model.clone(attention_implementation=implementation)
    elif isinstance(getattr(model, "config", None), TransformerConfig):
        config, problems = model.config, []
        adapted = model.clone(config=dataclasses.replace(config, attention_implementation=implementation))
    else:
        raise ValueError(f"--mesh seq=S splits sequences inside Transformer attention, and {type(model).__name__} "
                         "has none (the BiGRU's recurrence runs along the sequence); use --model transformer, "
                         "seq2seq or translate, or leave seq out.")
    if config.attention_dropout_rate > 0:
        problems.append("--attention_dropout_rate > 0")
    if config.position == "alibi":
        problems.append("--position alibi (a logit bias)")
    if config.attention_window is not None:
        problems.append("an attention window")
    if problems:
        raise ValueError(f"--mesh seq=S runs context-parallel attention, which takes key-padding masks and causal "
                         f"masking only; this model has {', '.join(problems)}. Change it, or leave seq out.")
    return adapted


def param_shardings(state) -> Any:
    """``{path: PartitionSpec}`` of a state's parameters (for inspection and tests)."""
    return {jax.tree_util.keystr(k): v.sharding.spec for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
