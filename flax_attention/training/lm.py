"""The decoder-only language model in the one trainer: ``python train.py --model lm``.

Data: :mod:`flax_attention.data.lm_corpus` (IMDB ``train`` + ``unsupervised``
reviews, SentencePiece vocabulary ``WORKDIR/spm.model`` learned from them,
reviews packed into rows with document boundaries as ``segment_ids``).
Model: :class:`~flax_attention.models.lm.LanguageModel`.

Loss: next-token cross-entropy summed over the counted targets (a target
counts iff it lies in its input's document: no prediction crosses a review
boundary; padding never counts), divided by the global token count by the
trainer. Metric sums per batch: ``loss`` (NLL, nats), ``accuracy`` (greedy
next-token hits), ``words`` (whitespace words, see below) and ``weight``
(counted target tokens); the trainer divides every sum by ``weight``.

Evaluation after every epoch: the validation set, ``--valid_reviews``
(default 1,000) training reviews carved off by a fixed seed (never trained
on, not in the vocabulary's sample), packed the same way; the checkpoint
with the best validation ``log_likelihood`` is the selected one (what
``train.py generate`` and ``--init_from`` load). After training, the selected
parameters are evaluated *once* on the whole ``test`` split (25,000 reviews,
:attr:`Task.test_eval`): the reported figures, logged as the ``test`` event
with ``test_``-prefixed keys. Reported on both:

* ``token_perplexity = exp(NLL / tokens)``, tokens = each review's
  SentencePiece pieces + its EOS (the BOS is an input only);
* ``word_perplexity = exp(NLL / words)``, words = each review's
  ``len(clean(text).split())`` + 1 for its EOS (the PTB/WikiText
  convention). The NLL is the same total, so this figure is comparable across
  vocabularies and tokenisers;
* ``log_likelihood = -NLL / tokens``, the selection metric (the trainer keeps
  the checkpoint with the *highest* selection metric; higher log-likelihood is
  lower perplexity).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_attention.core.reductions import top_token_hits
from flax_attention.data import lm_corpus as C
from flax_attention.models.lm import LanguageModel, LMConfig
from flax_attention.training import distributed
from flax_attention.training.task import Task


def lm_loss(params, apply_fn, batch, rngs, train: bool):
    """Summed next-token cross-entropy over counted targets and the metric sums (see the module docstring)."""
    logits = apply_fn({"params": params}, batch["inputs"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], train=train, rngs=rngs)
    w = batch["weights"].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    nll = jnp.where(w > 0, nll, 0.0)  # padding rows' logits are meaningless: keep them out of every sum
    correct = top_token_hits(logits, batch["targets"]).astype(jnp.float32)
    loss_sum = jnp.sum(w * nll)
    return loss_sum, {"loss": loss_sum, "accuracy": jnp.sum(w * correct),
                      "words": jnp.sum(batch["words"].astype(jnp.float32)), "weight": jnp.sum(w)}


def perplexities(metrics: Mapping[str, float]) -> Dict[str, float]:
    """Token and word perplexity and mean log-likelihood from the trainer's means.

    ``metrics["loss"]`` is NLL per token and ``metrics["words"]`` words per
    token (both divided by the token count), so NLL per word is their ratio.
    """
    loss, words = metrics["loss"], metrics.get("words", 0.0)
    return {"token_perplexity": math.exp(min(loss, 700.0)),
            "word_perplexity": math.exp(min(loss / words, 700.0)) if words > 0 else float("nan"),
            "log_likelihood": -loss}


@dataclasses.dataclass
class EvalSplit:
    """One evaluation corpus as the trainer's ``evaluate`` reads it (every row once)."""

    corpus: C.EncodedCorpus
    max_length: int

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        return C.eval_batches(self.corpus, self.max_length, batch_size)

    def num_eval_batches(self, batch_size: int) -> int:
        return -(-C.num_rows(self.corpus, self.max_length) // batch_size)


@dataclasses.dataclass
class LMData:
    """Training corpus (its rows for the trainer's length checks), validation and test corpora, the tokenizer.

    ``eval_batches`` (the per-epoch evaluation) read the validation corpus;
    the test corpus is read once, by :func:`test_eval`.
    """

    config: C.LMDataConfig
    train_corpus: C.EncodedCorpus
    valid_corpus: C.EncodedCorpus
    test_corpus: C.EncodedCorpus
    extras: Dict[str, Any]

    @property
    def train(self) -> C.PackedRows:  # len() = rows per epoch
        return C.PackedRows(self.train_corpus, range(len(self.train_corpus)), self.config.max_length)

    @property
    def test(self) -> C.EncodedCorpus:
        return self.test_corpus

    def split(self, name: str) -> EvalSplit:
        """``"valid"`` or ``"test"`` as an evaluation split."""
        return EvalSplit({"valid": self.valid_corpus, "test": self.test_corpus}[name], self.config.max_length)

    @property
    def description(self) -> str:
        tr, va, te, L = self.train_corpus, self.valid_corpus, self.test_corpus, self.config.max_length
        return (f"IMDB language modelling: {len(tr)} training reviews ({len(tr.ids) + len(tr)} target tokens, "
                f"{C.num_rows(tr, L)} rows of {L}), {len(va)} validation reviews ({len(va.ids) + len(va)} tokens), "
                f"{len(te)} test reviews ({len(te.ids) + len(te)} tokens, {int(te.words.sum()) + len(te)} words, "
                f"evaluated once after training), SentencePiece vocabulary {self.extras['tokenizer'].vocab_size}")

    def train_batches(self, batch_size: int, seed: int, epoch: int, start_step: int = 0) -> Iterator[dict]:
        return C.train_batches(self.train_corpus, self.config.max_length, batch_size, seed, epoch, start_step)

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        return self.split("valid").eval_batches(batch_size)

    def steps_per_epoch(self, batch_size: int) -> int:
        return C.num_rows(self.train_corpus, self.config.max_length) // batch_size

    def num_eval_batches(self, batch_size: int) -> int:
        return self.split("valid").num_eval_batches(batch_size)


def check_validation(cfg: C.LMDataConfig) -> None:
    """Training needs a validation split: ``--valid_reviews 0`` only marks workdirs written before it existed."""
    if cfg.valid_reviews < 1:
        raise ValueError("--valid_reviews 0: model selection needs validation reviews carved from the training "
                         "text (the test split is evaluated once, after training); give --valid_reviews N >= 1 "
                         "(default 1000). A workdir written before --valid_reviews existed chose its checkpoints on "
                         "the test split: retrain in a fresh --workdir.")


def _prepare(workdir, configs) -> LMData:
    cfg = configs["data"]
    check_validation(cfg)
    texts = functools.lru_cache(maxsize=1)(lambda: C.read_reviews(C.TRAIN_SPLITS))

    def train_texts():  # the vocabulary never sees a validation review
        keep, _ = C.split_validation(len(texts()), cfg.valid_reviews)
        return [texts()[i] for i in keep]

    tok = C.load_tokenizer(workdir, cfg, train_texts, train=distributed.is_primary())
    if tok.vocab_size != cfg.vocab_size:
        print(f"note: SentencePiece made {tok.vocab_size} pieces (asked for {cfg.vocab_size}; the corpus has fewer)")
    # The cache holds all 75,000 encoded reviews; the split is recomputed from their count (a pure function).
    everything = C.load_encoded(workdir, "train+unsupervised", tok, texts)
    keep, valid = C.split_validation(len(everything), cfg.valid_reviews)
    train = everything.select(keep).first(cfg.train_reviews)
    test = C.load_encoded(workdir, C.TEST_SPLIT, tok, lambda: C.read_reviews([C.TEST_SPLIT]))
    return LMData(cfg, train, everything.select(valid), test, {"tokenizer": tok})


def evaluate_test(model, params, configs, data: LMData, workdir, selection: Mapping[str, Any],
              evaluate=None) -> Dict[str, Any]:
    """The reported figures: the selected parameters' perplexities on the whole test split, computed once.

    ``evaluate(params, split)``: the trainer's teacher-forced evaluation
    (per-token means) on the run's devices. With ``--average_checkpoints`` the
    average's validation perplexities are reported too (averaging is a recipe
    choice, judged on validation).
    """
    assert evaluate is not None, "the trainer passes its evaluation function"
    out: Dict[str, Any] = {}
    averaged = selection.get("averaged_steps")
    if averaged:
        val = evaluate(params, data.split("valid"))
        out.update({f"averaged_{k}": v for k, v in {**val, **perplexities(val)}.items()})
        what = f"average of the checkpoints of steps {', '.join(map(str, averaged))}"
    else:
        what = f"best validation checkpoint, step {selection['selected_step']}"
    test = evaluate(params, data.split("test"))
    test.update(perplexities(test))
    out.update({f"test_{k}": v for k, v in test.items()})
    if distributed.is_primary():
        print(f"test: {_summary(test)} ({what}) on all {int(test['examples'])} test tokens "
              f"({len(data.test_corpus)} reviews)")
    return out


def check_special_ids(configs) -> None:
    """``--pad_id/--bos_id/--eos_id`` must be the ids the SentencePiece model is trained with; a validation split."""
    check_validation(configs["data"])
    m = configs["model"]
    if (m.pad_id, m.bos_id, m.eos_id) != (C.PAD_ID, C.BOS_ID, C.EOS_ID):
        raise ValueError(f"--pad_id/--bos_id/--eos_id {m.pad_id}/{m.bos_id}/{m.eos_id}: the SentencePiece model "
                         f"of --model lm uses {C.PAD_ID}/{C.BOS_ID}/{C.EOS_ID}; leave these flags out.")


def refuse_lm_workdir(workdir, command: str) -> None:
    """``predict``/``translate``/``visualize`` on an ``lm`` workdir: a one-line pointer to ``generate``."""
    from flax_attention.training.checkpointing import read_config_file

    path = Path(workdir) / "config.json"
    if path.is_file() and read_config_file(path).get("model_name") == "lm":
        raise ValueError(f"{workdir} holds a --model lm run, which {command} does not apply to; continue text "
                         f"with `python train.py generate --workdir {workdir} --prompt \"...\"`.")


def load_extras(workdir, configs) -> Dict[str, Any]:
    return {"tokenizer": C.load_tokenizer(workdir, configs["data"], train=False)}


@functools.lru_cache(maxsize=None)
def _language_model(config: LMConfig) -> LanguageModel:
    # One module per (frozen, hashable) config: apply_fn is a static pmap argument, so reuse keeps compilations.
    return LanguageModel(config)


def model_config(configs, extras=None) -> LMConfig:
    """The model's config with the vocabulary SentencePiece actually made (the flag's size before it exists)."""
    cfg = configs["model"]
    if extras and extras["tokenizer"].vocab_size != cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=extras["tokenizer"].vocab_size)
    return cfg


def build_model(configs, extras) -> LanguageModel:
    return _language_model(model_config(configs, extras))


def _init_inputs(configs):
    return (jnp.ones((1, configs["model"].max_length), jnp.int32),)


def _summary(m: Mapping[str, float]) -> str:
    return (f"token perplexity {m['token_perplexity']:.2f}, word perplexity {m['word_perplexity']:.2f} "
            f"(loss {m['loss']:.4f}, token acc {m['accuracy']:.4f})")


# Defaults sized for the budget, pretraining in <= ~100 minutes on 2 CPU cores. Measured (2-core AMD EPYC
# Zen 3 VM, 2026-12-07, `python train.py --model lm --train_reviews 40000`, the defaults now): 1.2-1.3 s per
# 4,096-token step, 3,358 target tokens/s, 3,200 steps in 64.9 min; vocabulary and encoding 1.3 min; the
# whole-test-split evaluation (7.97M tokens) 24.5 min while the test suite shared the cores (~13 min alone).
# 60,000 reviews (the earlier default, 4,786 steps) ran at 1.3 s/step there: ~106 min of training. For that
# compute a small model seeing most of the corpus beats a larger one seeing less of it (Hoffmann et al. 2022: ~20
# tokens per parameter; this one has ~1.3M non-embedding parameters). --train_reviews 0 uses all 74,000.
FLAG_DEFAULTS = {
    "vocab_size": 8000, "max_length": 128, "d_model": 192, "num_heads": 4, "num_kv_heads": 0, "num_layers": 3,
    "d_ff": 768, "dropout_rate": 0.0, "train_reviews": 40_000, "valid_reviews": 1000,
    "learning_rate": 1e-3, "lr_schedule": "cosine", "warmup_steps": 200, "adam_b2": 0.98, "clip_norm": 1.0,
    "batch_size": 32, "num_epochs": 1, "eval_batch_size": 128, "checkpoint_every": 500, "log_every": 20,
}

LM = Task(
    name="lm",
    config_classes={"model": LMConfig, "data": C.LMDataConfig},
    prepare=_prepare,
    load_extras=load_extras,
    build_model=build_model,
    init_inputs=_init_inputs,
    loss_and_metrics=lm_loss,
    selection_metric="log_likelihood",
    flag_defaults=FLAG_DEFAULTS,
    summary=_summary,
    eval_name="validation tokens",
    eval_metrics=perplexities,
    preflight=check_special_ids,
    test_eval=evaluate_test,
    # Written before the validation split: 0 marks them (loadable for generate/--init_from, refused for training).
    added_fields={"data.valid_reviews": 0},
)


# --------------------------------------------------------------------------- train.py generate


def check_generate_flags(temperature: float, top_k: Optional[int], top_p: float, max_new_tokens: Optional[int],
                         num_samples: int) -> None:
    """The ``train.py generate`` flags, checked before anything is loaded: one-line ValueErrors."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature {temperature} must be >= 0 (0 = greedy, 1 = the model's distribution).")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k {top_k} must be >= 1 (leave it out to keep every token).")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"--top_p {top_p} must be in (0, 1] (1 = off), e.g. 0.9.")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens {max_new_tokens} must be >= 0.")
    if num_samples < 1:
        raise ValueError(f"--num_samples {num_samples} must be >= 1.")


def encode_prompts(tok, prompts: Sequence[str], config: LMConfig, max_new_tokens: Optional[int]):
    """``(ids [P, T] right-padded, lengths [P], max_new_tokens)``: each prompt is ``BOS + pieces``.

    ``max_new_tokens=None`` fills the model's ``max_length`` after the longest prompt.

    Raises:
      ValueError: a prompt (with the new tokens) longer than the model's ``max_length``.
    """
    rows = [[config.bos_id] + ids for ids in tok.encode([C.clean(p) for p in prompts])]
    longest = max(len(r) for r in rows)
    which = max(range(len(rows)), key=lambda i: len(rows[i]))
    if longest > config.max_length or (max_new_tokens or 0) + longest > config.max_length:
        room = config.max_length - longest
        fix = (f"lower --max_new_tokens to {room} or shorten it" if room > 0 else
               "shorten it (the model was trained on rows of max_length tokens)")
        raise ValueError(f"prompt {which + 1} is {longest} tokens (BOS included); with --max_new_tokens "
                         f"{max_new_tokens or 0} it exceeds the model's max_length {config.max_length}: {fix}.")
    out = np.full((len(rows), longest), config.pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, np.asarray([len(r) for r in rows], np.int32), (
        config.max_length - longest if max_new_tokens is None else max_new_tokens)


def generate_texts(workdir, prompts: Sequence[str], *, num_samples: int = 1, temperature: float = 1.0,
                   top_k: Optional[int] = None, top_p: float = 1.0, max_new_tokens: Optional[int] = None,
                   seed: int = 0) -> List[List[str]]:
    """Continuations of each prompt by the workdir's best checkpoint; prints and returns them.

    Returns:
      ``[prompt][sample]`` texts: the prompt followed by its continuation (until EOS).
    """
    from flax_attention.linen.generation import generate
    from flax_attention.training import restore
    from flax_attention.training.checkpointing import load_config

    check_generate_flags(temperature, top_k, top_p, max_new_tokens, num_samples)
    if not prompts:
        raise ValueError('give a prompt, e.g. --prompt "This movie was" (--prompt "" starts from nothing).')
    if not (Path(workdir) / "config.json").exists():
        raise FileNotFoundError(f"{workdir}/config.json not found: train first with "
                                f"`python train.py --model lm --workdir {workdir}`.")
    name = load_config(workdir).get("model_name")
    if name != "lm":
        raise ValueError(f"{workdir} holds a --model {name} run; generate needs a --model lm workdir.")
    configs = restore.task_configs(workdir, LM)
    tok = load_extras(workdir, configs)["tokenizer"]
    ids, lengths, new = encode_prompts(tok, prompts, model_config(configs, {"tokenizer": tok}), max_new_tokens)
    model, params, _, step = restore.restore_best(workdir, LM, configs)
    ids, lengths = np.repeat(ids, num_samples, 0), np.repeat(lengths, num_samples, 0)
    out = np.asarray(generate(model, params, ids, lengths, key=jax.random.key(seed), max_new_tokens=new,
                              temperature=temperature, top_k=top_k, top_p=top_p))
    texts = tok.decode([np.concatenate([ids[i, :lengths[i]], out[i]]) for i in range(len(ids))])
    results = [texts[p * num_samples:(p + 1) * num_samples] for p in range(len(prompts))]
    print(f"# {workdir}, checkpoint step {step}; temperature {temperature}, top_k {top_k or 'off'}, "
          f"top_p {top_p}, up to {new} new tokens, seed {seed}")
    for p, samples in enumerate(results):
        for s, text in enumerate(samples):
            print(f"[{p + 1}.{s + 1}] {text}")
    return results
