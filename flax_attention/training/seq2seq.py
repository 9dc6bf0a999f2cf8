"""Encoder-decoder Transformer tasks of the one trainer: the shared seq2seq pieces and the synthetic tasks.

``python train.py --model seq2seq --task reverse`` trains the small
Transformer (``E = 64, N = 4, F = 256``, 2 + 2 post-LN layers, no dropout: the
data are unlimited) on a task of :mod:`flax_attention.data.synthetic`. An "epoch"
is ``--steps_per_epoch`` fresh batches; every epoch ends with a teacher-forced
evaluation and greedy decoding of the held-out set (exact match picks the best
checkpoint), the last one adds exact match by length up to ``--test_max_len``.
Training as in the paper: teacher forcing, label smoothing, Adam(0.9, 0.98,
1e-9) with Eq. 3 (warm-up 500), plus a linear cooldown over the last 30 %.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from flax_attention.core.reductions import top_token_hits
from flax_attention.data import synthetic as T
from flax_attention.data.synthetic import PAD_ID
from flax_attention.linen.layers import TransformerConfig
from flax_attention.training.seq2seq_loss import sequence_match, smoothed_cross_entropy
from flax_attention.training.task import Task
from flax_attention.linen.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Seq2SeqModelConfig:
    """Size of the encoder-decoder Transformer (``TransformerConfig`` fields; see its docs).

    Attributes:
      d_model: ``E``, model width (shared, tied embeddings are scaled by sqrt(E)).
      num_heads: ``N`` attention heads.
      d_ff: ``F``, feed-forward width.
      num_encoder_layers: encoder depth.
      num_decoder_layers: decoder depth.
      dropout_rate: residual/embedding dropout (the paper's P_drop).
      attention_dropout_rate: dropout on attention weights.
      pre_ln: pre-LN residual blocks instead of the paper's post-LN.
      position: ``sinusoidal`` (absolute, added to the embeddings; the
        paper), ``rope`` (rotary, Su et al. 2021), ``alibi`` (linear biases,
        Press et al. 2022) or ``none``.
    """

    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 256
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    pre_ln: bool = False
    position: str = "sinusoidal"

    def transformer(self, vocab_size: int, max_len: int) -> TransformerConfig:
        return TransformerConfig(vocab_size=vocab_size, max_len=max_len, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Loss and decoding settings of the seq2seq tasks.

    Attributes:
      label_smoothing: ``ε_ls`` of the training loss (the paper: 0.1).
      beam_size: beam width of the final evaluation (1 = greedy).
      eval_beam_size: beam width of the per-epoch evaluations (1 = greedy).
      alpha: GNMT length-penalty exponent of beam search.
      decode_batch: sentences per decoding call (the last call is padded).
    """

    label_smoothing: float = 0.1
    beam_size: int = 1
    eval_beam_size: int = 1
    alpha: float = 0.6
    decode_batch: int = 250

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if min(self.beam_size, self.eval_beam_size, self.decode_batch) < 1:
            raise ValueError("--beam_size, --eval_beam_size and --decode_batch must be >= 1.")
        if not self.alpha >= 0:  # beam search's early-stopping bound needs it; checked before any training
            raise ValueError(f"--alpha must be >= 0 (GNMT length-penalty exponent; 0 = none), got {self.alpha}.")


MODEL_ADDED_FIELDS = {"model.position": "sinusoidal"}  # workdirs written before the field existed
DECODE_RESUMABLE = tuple(f"decode.{k}" for k in ("beam_size", "eval_beam_size", "alpha", "decode_batch"))
PAPER_OPTIMIZER = {"lr_schedule": "rsqrt", "adam_b2": 0.98, "adam_eps": 1e-9}


@functools.lru_cache(maxsize=None)  # one function per ε: the pmapped steps are cached per loss function
def seq2seq_loss(label_smoothing: float):
    """``loss_and_metrics`` (see :mod:`flax_attention.training.steps`) of teacher-forced seq2seq training.

    Sums over real target tokens (``tgt_out != PAD``): the smoothed loss,
    ``accuracy`` (arg-max == target) and ``weight`` (the token count), so
    every token weighs the same whatever the batch or device split.
    """

    def loss_and_metrics(params, apply_fn, batch, rngs, train: bool):
        logits = apply_fn({"params": params}, batch["src"], batch["tgt_in"], deterministic=not train, rngs=rngs)
        w = (batch["tgt_out"] != PAD_ID).astype(jnp.float32)
        loss_sum = jnp.sum(w * smoothed_cross_entropy(logits, batch["tgt_out"], label_smoothing))
        correct = jnp.sum(w * top_token_hits(logits, batch["tgt_out"]))
        return loss_sum, {"loss": loss_sum, "accuracy": correct, "weight": jnp.sum(w)}

    return loss_and_metrics


@functools.lru_cache(maxsize=None)
def build_transformer(config: TransformerConfig) -> Transformer:
    # One module per (frozen, hashable) config: TrainState.apply_fn is a static
    # pmap argument, so reusing the instance reuses compiled steps.
    return Transformer(config)


def seq2seq_init_inputs(configs) -> tuple:
    sample = np.full((1, 2), T.BOS_ID, np.int32)  # parameter shapes do not depend on the data
    return sample, sample


def decode_dataset(model, params, src: np.ndarray, max_len: int, decode_batch: int,
                   beam_size: int = 1, alpha: float = 0.6) -> np.ndarray:
    """Decodes ``src [M, S]`` in fixed-size chunks (the last one padded: one compile) -> ``[M, L]``."""
    from flax_attention.linen.decoding import beam_search, greedy_decode

    outs = []
    for start in range(0, len(src), decode_batch):
        chunk = src[start:start + decode_batch]
        n = len(chunk)
        chunk = np.pad(chunk, [(0, decode_batch - n), (0, 0)], constant_values=PAD_ID)
        if beam_size == 1:
            out = greedy_decode(model, params, jnp.asarray(chunk), max_len=max_len)
        else:
            out = beam_search(model, params, jnp.asarray(chunk), beam_size=beam_size, max_len=max_len,
                              alpha=alpha)[0][:, 0]
        outs.append(np.asarray(out)[:n])
    return np.concatenate(outs)


# --------------------------------------------------------------------------- synthetic tasks


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic task of :mod:`flax_attention.data.synthetic` (generated from a seed, nothing downloaded).

    Attributes:
      task: copy, reverse, sort, dedup or add.
      num_symbols: alphabet size (add needs >= 11).
      min_len: shortest training source.
      max_len: longest training source.
      test_max_len: longest source of the by-length (extrapolation) evaluation.
      data_seed: seed of the task's data streams.
      steps_per_epoch: fresh batches per "epoch" (each epoch ends with an evaluation).
      eval_examples: held-out examples at the training lengths.
      length_eval_per_length: examples per length of the final by-length evaluation.
    """

    task: str = "reverse"
    num_symbols: int = 10
    min_len: int = 1
    max_len: int = 20
    test_max_len: int = 30
    data_seed: int = 0
    steps_per_epoch: int = 250
    eval_examples: int = 500
    length_eval_per_length: int = 20

    def __post_init__(self):
        if self.task == "translate":
            raise ValueError("translation is its own model now: use --model translate (Multi30k by default).")
        if self.data_seed < 0:
            raise ValueError(f"--data_seed must be >= 0 (it seeds NumPy's generators), got {self.data_seed}.")
        if min(self.steps_per_epoch, self.eval_examples, self.length_eval_per_length) < 1:
            raise ValueError("--steps_per_epoch, --eval_examples and --length_eval_per_length must be >= 1.")
        self.task_config()  # validates the task fields

    def task_config(self) -> T.TaskConfig:
        return T.TaskConfig(name=self.task, num_symbols=self.num_symbols, min_len=self.min_len,
                            max_len=self.max_len, test_max_len=self.test_max_len, seed=self.data_seed)


@dataclasses.dataclass
class SyntheticData:
    """Batches of a synthetic task; batch ``i`` of the run depends only on ``i`` (resumable anywhere)."""

    config: SyntheticConfig
    test: Dict[str, np.ndarray]
    extras: Dict[str, Any]

    @property
    def description(self) -> str:
        return f"{self.config.task}: fresh batches every step, {len(self.test['src'])} held-out examples"

    def train_batches(self, batch_size: int, seed: int, epoch: int, start_step: int = 0) -> Iterator[dict]:
        task, spe = self.config.task_config(), self.config.steps_per_epoch
        for i in range(start_step, spe):
            b = task.train_batch(batch_size, epoch * spe + i)
            yield {k: b[k] for k in ("src", "tgt_in", "tgt_out")}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        return padded_chunks(self.test, batch_size)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.config.steps_per_epoch

    def num_eval_batches(self, batch_size: int) -> int:
        return -(-len(self.test["src"]) // batch_size)


def padded_chunks(data: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict]:
    """``src``/``tgt_in``/``tgt_out`` in chunks of ``batch_size``; the last is padded with all-PAD rows (weight 0)."""
    n = len(data["src"])
    for start in range(0, n, batch_size):
        yield {k: np.pad(data[k][start:start + batch_size], [(0, max(0, start + batch_size - n)), (0, 0)],
                         constant_values=PAD_ID) for k in ("src", "tgt_in", "tgt_out")}


def _prepare_synthetic(workdir, configs) -> SyntheticData:
    cfg = configs["data"]
    return SyntheticData(cfg, cfg.task_config().test_set(cfg.eval_examples), {})


def _synthetic_model(configs, extras):
    task = configs["data"].task_config()
    return build_transformer(configs["model"].transformer(task.vocab_size, task.longest_target))


def decoded_metrics(model, params, data: Mapping[str, np.ndarray], decode: DecodeConfig, beam_size: int) -> Dict:
    """Decodes a task set: ``decoded_token_accuracy``, ``exact_match`` and ``exact_by_length``."""
    tgt = data["tgt_out"]
    pred = decode_dataset(model, params, data["src"], tgt.shape[1], decode.decode_batch, beam_size, decode.alpha)
    real = tgt != PAD_ID
    exact = np.asarray(sequence_match(jnp.asarray(pred), jnp.asarray(tgt)))
    return {"decoded_token_accuracy": float(((pred == tgt) & real).sum() / real.sum()),
            "exact_match": float(exact.mean()),
            "exact_by_length": {int(n): float(exact[data["length"] == n].mean()) for n in np.unique(data["length"])}}


def _synthetic_decode_eval(model, params, configs, data: SyntheticData, workdir, step: int, final: bool) -> Dict:
    dec = configs["decode"]
    out = decoded_metrics(model, params, data.test, dec, dec.beam_size if final else dec.eval_beam_size)
    out.pop("exact_by_length")
    if final:
        cfg = configs["data"]
        task = cfg.task_config()
        lengths = range(task.min_len, task.test_max_len + 1)
        by_len = decoded_metrics(model, params, T.length_test_set(task, lengths, cfg.length_eval_per_length),
                                 dec, dec.beam_size)["exact_by_length"]
        print("exact match by length: " + " ".join(f"{n}:{v:.3f}" for n, v in by_len.items()))
        out.update({f"exact_len{n}": v for n, v in by_len.items()})
    return out


SEQ2SEQ = Task(
    name="seq2seq",
    config_classes={"model": Seq2SeqModelConfig, "data": SyntheticConfig, "decode": DecodeConfig},
    prepare=_prepare_synthetic,
    load_extras=lambda workdir, configs: {},
    build_model=_synthetic_model,
    init_inputs=seq2seq_init_inputs,
    loss_and_metrics=None,
    make_loss=lambda configs: seq2seq_loss(configs["decode"].label_smoothing),
    selection_metric="exact_match",
    flag_defaults={**PAPER_OPTIMIZER, "learning_rate": (64 * 500) ** -0.5, "warmup_steps": 500,
                   "cooldown_fraction": 0.3, "batch_size": 64, "num_epochs": 8, "eval_batch_size": 250},
    resumable=DECODE_RESUMABLE + ("data.eval_examples", "data.length_eval_per_length"),
    added_fields=MODEL_ADDED_FIELDS,
    decode_eval=_synthetic_decode_eval,
    summary=lambda m: (f"loss {m['loss']:.4f} token acc {m['accuracy']:.4f} | greedy exact match "
                       f"{m.get('exact_match', float('nan')):.4f}"),
    eval_name="held-out tokens",
)
