"""Skip-gram with negative sampling (SGNS, Mikolov et al. 2013) in JAX.

For a (centre ``w``, context ``c``) pair and ``K`` noise words ``n_k`` drawn
from the unigram^0.75 distribution, the loss is (paper eq. 4)::

    -log σ(u_c · v_w) - Σ_k log σ(-u_{n_k} · v_w)

with input vectors ``v`` (the word vectors we keep, word2vec's ``syn0``) and
output vectors ``u`` (``syn1neg``). Initialisation as in the C code: ``v``
uniform in ``±0.5/D``, ``u`` zero.

One jitted step handles ``B`` pairs: it gathers the ``B`` centre rows and
``B·(K+1)`` output rows; the gradient is a scatter-add into dense ``[V, D]``
tables, which the optimiser then updates whole. At ``V = 10k`` that update
(2·10⁶ floats) is cheap next to a batch's 5.7·10⁶ gathered values; a
GloVe-size vocabulary would need a lazy, row-wise update. Pairs come from
:mod:`flax_attention.embed.pairs` (NumPy); the noise words are drawn inside
the step (a searchsorted into the noise CDF), so only ``2·B`` ids cross to the
device per step. Negatives that equal the true context are masked out.

Optimisers: ``"sgd"`` is word2vec's plain SGD on the *summed* per-pair losses
(``learning_rate`` is its per-pair ``alpha``) with a linear decay to
``1e-4·alpha`` over the run; ``"adam"`` is :func:`optax.adam` (dense moments)
with the same decay (Adam's step does not depend on the gradient's scale).
Adam at 0.01 is the default because it learned better in the same time
(measured on 25k IMDB reviews, one epoch, 8192-pair batches: final loss 2.544
vs SGD 2.591 at alpha=0.025 and 2.554 at 0.05; SGD at 0.1 diverged, since the
summed gradients of frequent noise words collide within a large batch; see
docs_issue13.md).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attention.embed import pairs as pairs_lib


@dataclasses.dataclass(frozen=True)
class SkipGramConfig:
    """Settings of the skip-gram word-vector learner (defaults: the measured IMDB run).

    Attributes:
      dim: vector size ``D`` (the classifier's ``embed_dim``).
      window: maximum context distance; each centre draws its window from ``1..window``.
      negatives: noise words ``K`` per pair.
      epochs: passes over the corpus.
      sample: subsampling threshold ``t`` (keep a token with ``min(1, sqrt(t/f) + t/f)``);
        0 disables subsampling.
      noise_power: exponent of the unigram noise distribution.
      optimizer: ``"sgd"`` (word2vec) or ``"adam"``.
      learning_rate: initial rate (SGD: per pair, word2vec's ``alpha``); decays linearly.
      min_lr_fraction: the rate's floor, as a fraction of ``learning_rate`` (word2vec: 1e-4).
      batch_size: pairs per jitted step (large: amortises dispatch on CPU).
      first_word_id: ids below it (pad / start / out-of-vocabulary) are dropped from the text.
      chunk_tokens: tokens whose pairs are shuffled together (memory bound).
      seed: the run is a pure function of the data and this seed.
    """

    dim: int = 100
    window: int = 5
    negatives: int = 5
    epochs: int = 1
    sample: float = 1e-4
    noise_power: float = 0.75
    optimizer: str = "adam"
    learning_rate: float = 0.01
    min_lr_fraction: float = 1e-4
    batch_size: int = 8192
    first_word_id: int = 3
    chunk_tokens: int = 1 << 20
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "window", "negatives", "epochs", "batch_size", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SkipGramConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"SkipGramConfig.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}.")
        if self.learning_rate <= 0 or not 0 < self.min_lr_fraction <= 1:
            raise ValueError("learning_rate must be > 0 and min_lr_fraction in (0, 1].")
        if self.sample < 0 or self.first_word_id < 0:
            raise ValueError("sample and first_word_id must be >= 0.")


@dataclasses.dataclass
class SkipGramResult:
    """What :func:`train_skipgram` learned and measured.

    Attributes:
      vectors: float32 ``[V, D]`` input vectors (rows of ids never seen keep their init).
      losses: mean loss per pair, one value per logged interval.
      steps: optimiser steps taken.
      pairs: training pairs seen.
      seconds: wall time of the training loop (compilation included).
    """

    vectors: np.ndarray
    losses: List[float]
    steps: int
    pairs: int
    seconds: float


def sgns_loss(params, centres, contexts, negatives):
    """Summed SGNS loss of a batch.

    Args:
      params: ``{"in": [V, D], "out": [V, D]}``.
      centres, contexts: int ``[B]``.
      negatives: int ``[B, K]``.

    Returns:
      Scalar: sum over the batch of ``-log σ(u_c·v_w) - Σ_k [n_k ≠ c] log σ(-u_{n_k}·v_w)``.
    """
    v = params["in"][centres]  # [B, D]
    pos = jnp.sum(v * params["out"][contexts], axis=-1)  # [B]
    neg = jnp.einsum("bd,bkd->bk", v, params["out"][negatives])  # [B, K]
    # A noise word equal to the context would push the pair apart and together at once.
    neg_ok = (negatives != contexts[:, None]).astype(v.dtype)
    return -jnp.sum(jax.nn.log_sigmoid(pos)) - jnp.sum(neg_ok * jax.nn.log_sigmoid(-neg))


def make_optimizer(config: SkipGramConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD or Adam with word2vec's linear learning-rate decay over ``total_steps``."""
    return _optimizer(config.optimizer, config.learning_rate, config.min_lr_fraction, max(int(total_steps), 1))


@functools.lru_cache(maxsize=None)  # the same object for the same settings: make_step's cache key
def _optimizer(name: str, learning_rate: float, min_lr_fraction: float, total_steps: int):
    schedule = optax.linear_schedule(learning_rate, learning_rate * min_lr_fraction, total_steps)
    return optax.adam(schedule) if name == "adam" else optax.sgd(schedule)


# Cached per (optimiser, K): a second run with the same settings (tests, a
# rerun in one process) reuses the compiled step instead of recompiling.
@functools.lru_cache(maxsize=None)
def make_step(tx: optax.GradientTransformation, negatives: int) -> Callable:
    """Jitted ``(params, opt_state, centres, contexts, key, noise_cdf) -> (params, opt_state, mean loss)``.

    ``noise_cdf``: float32 ``[V]`` cumulative noise distribution; the ``K``
    noise words of each pair are drawn by inverting it.
    """

    @jax.jit
    def step(params, opt_state, centres, contexts, key, cdf):
        u = jax.random.uniform(key, (centres.shape[0], negatives))
        noise = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), cdf.shape[0] - 1).astype(jnp.int32)
        loss, grads = jax.value_and_grad(sgns_loss)(params, centres, contexts, noise)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss / centres.shape[0]

    return step


def init_params(vocab_size: int, dim: int, seed: int):
    """word2vec's initialisation: ``in`` uniform in ``±0.5/D``, ``out`` zeros."""
    rng = np.random.default_rng([seed, 0x5EED])
    return {"in": jnp.asarray(rng.uniform(-0.5 / dim, 0.5 / dim, (vocab_size, dim)), jnp.float32),
            "out": jnp.zeros((vocab_size, dim), jnp.float32)}


def train_skipgram(token_sequences: Sequence[np.ndarray], vocab_size: int,
                   config: SkipGramConfig = SkipGramConfig(), progress: bool = True,
                   log_every: int = 50) -> SkipGramResult:
    """Learns word vectors from id sequences; see :func:`learn_word_vectors`."""
    c = config
    tokens, offsets = pairs_lib.flatten(token_sequences, c.first_word_id)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {vocab_size}.")
    counts = np.bincount(tokens, minlength=vocab_size)
    noise = pairs_lib.noise_distribution(counts, c.noise_power)
    keep = pairs_lib.keep_probability(counts, c.sample)
    steps_per_epoch = max(int(pairs_lib.expected_pairs(counts, keep, c.window)) // c.batch_size, 1)
    total = steps_per_epoch * c.epochs
    tx = make_optimizer(c, total)
    step = make_step(tx, c.negatives)
    cdf = jnp.asarray(np.cumsum(noise), jnp.float32)
    params = init_params(vocab_size, c.dim, c.seed)
    opt_state = tx.init(params)
    base_key = jax.random.PRNGKey(c.seed)
    losses: List[float] = []
    pending: List[jax.Array] = []
    n_steps = 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm only when a bar is shown

        bar = tqdm(total=total, desc="skip-gram", unit="step", dynamic_ncols=True)
    try:
        for epoch in range(c.epochs):
            rng = np.random.default_rng([c.seed, epoch])
            for centres, contexts in pairs_lib.epoch_batches(tokens, offsets, keep, c.window, c.batch_size,
                                                            rng, c.chunk_tokens):
                params, opt_state, loss = step(params, opt_state, centres, contexts,
                                               jax.random.fold_in(base_key, n_steps), cdf)
                pending.append(loss)
                n_steps += 1
                # Reading the loss waits for the device: only every log_every steps,
                # so the host prepares the next batches while the step runs.
                if len(pending) == log_every:
                    losses.append(float(np.mean(jax.device_get(pending))))
                    pending = []
                    _check_finite(losses[-1], n_steps, c)
                    if bar is not None:
                        bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch)
                if bar is not None:
                    bar.update(1)
        if pending:
            losses.append(float(np.mean(jax.device_get(pending))))
            _check_finite(losses[-1], n_steps, c)
        if n_steps == 0:  # random vectors must not pass for learned ones
            raise ValueError(f"the corpus ({tokens.size} tokens) yields fewer than batch_size={c.batch_size} "
                             "training pairs; use more text or a smaller batch_size.")
    finally:
        if bar is not None:
            bar.close()
    vectors = np.asarray(jax.device_get(params["in"]), np.float32)
    return SkipGramResult(vectors, losses, n_steps, n_steps * c.batch_size, time.perf_counter() - start)


def _check_finite(loss: float, step: int, c: SkipGramConfig) -> None:
    if not np.isfinite(loss):
        # Measured: SGD at alpha=0.1 with 8192-pair batches diverges (the summed
        # gradients of a frequent noise word collide within a batch).
        raise FloatingPointError(
            f"skip-gram loss is {loss} at step {step} ({c.optimizer}, learning_rate={c.learning_rate}, "
            f"batch_size={c.batch_size}); lower the learning rate (or the batch size for sgd).")


def learn_word_vectors(token_sequences: Sequence[np.ndarray], vocab_size: int,
                       config: Optional[SkipGramConfig] = None, progress: bool = True, **overrides) -> np.ndarray:
    """Word vectors by skip-gram with negative sampling.

    Args:
      token_sequences: int id sequences (e.g. one per review); ids below
        ``config.first_word_id`` are dropped, pairs never cross sequences.
      vocab_size: ``V``; ids must be ``< V``.
      config: :class:`SkipGramConfig` (default settings when ``None``).
      progress: show a tqdm bar with the running loss.
      **overrides: fields of the config, e.g. ``dim=100, window=5, negatives=5, epochs=1, seed=0``.

    Returns:
      float32 ``[V, D]``: row ``i`` is the vector of id ``i``. Deterministic
      given the data and ``seed`` (on one backend).
    """
    config = dataclasses.replace(config or SkipGramConfig(), **overrides)
    return train_skipgram(token_sequences, vocab_size, config, progress).vectors


def nearest_neighbours(vectors: np.ndarray, query_ids: Sequence[int], k: int = 8,
                       exclude_below: int = 3) -> np.ndarray:
    """Ids of the ``k`` most cosine-similar rows to each query (itself and ids ``< exclude_below`` excluded).

    Returns:
      int ``[len(query_ids), k]``.
    """
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = unit[np.asarray(query_ids)] @ unit.T  # [Q, V]
    sims[:, :exclude_below] = -np.inf
    sims[np.arange(len(query_ids)), np.asarray(query_ids)] = -np.inf
    return np.argsort(-sims, axis=1)[:, :k]
