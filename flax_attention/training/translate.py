"""Translation in the one trainer: ``python train.py --model translate`` (Multi30k de->en by default).

Data and vocabulary: :mod:`flax_attention.data.translate` (joint SentencePiece
model learned from the training split, saved as ``WORKDIR/spm.model``).
Every epoch ends with a teacher-forced evaluation of the validation split and
its greedy translation, scored with sacreBLEU (picks the best checkpoint).
After the last epoch the *selected* model -- the best checkpoint by
validation BLEU, or with ``--average_checkpoints k`` the mean of the newest
``k`` checkpoints -- translates the test split with beam search: the reported
figure, cased sacreBLEU plus the literature's lowercased, Moses-tokenised BLEU
(:mod:`flax_attention.training.bleu`). Each decoding writes its hypotheses, one
line per sentence in the order of the official raw files (Multi30k), to
``WORKDIR/translations/<split>-<tag>.<target_lang>`` (``tag`` ``step<N>`` or
``avg<first>-<last>``) and, once, the references to
``<split>.ref.<target_lang>``, so anyone can rescore with ``sacrebleu REF < HYP``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np

from flax_attention.data import translate as D
from flax_attention.data.synthetic import PAD_ID
from flax_attention.training import distributed
from flax_attention.training.bleu import bleu_score, literature_bleu
from flax_attention.training.seq2seq import (DECODE_RESUMABLE, MODEL_ADDED_FIELDS, PAPER_OPTIMIZER, DecodeConfig, Seq2SeqModelConfig,
                                             build_transformer, decode_dataset, seq2seq_init_inputs, seq2seq_loss)
from flax_attention.training.task import Task
from flax_attention.data import atomic

MAX_POSITIONS = 256  # sinusoid table and decode cache bound; Multi30k sentences are far shorter


@dataclasses.dataclass
class TranslationData:
    """Tokenised training pairs and the (uncut) evaluation split."""

    config: D.TranslateConfig
    train: D.Split
    test: D.Split
    extras: Dict[str, Any]

    @property
    def description(self) -> str:
        c = self.config
        return (f"{c.dataset} {c.source_lang}->{c.target_lang}: {len(self.train)} training pairs "
                f"(<= {c.max_tokens} subwords), {len(self.test)} {c.eval_split} pairs, "
                f"SentencePiece vocabulary {self.extras['tokenizer'].vocab_size}")

    def train_batches(self, batch_size: int, seed: int, epoch: int, start_step: int = 0) -> Iterator[dict]:
        for b in D.train_batches(self.train, batch_size, seed, epoch, start_step):
            yield {k: b[k] for k in ("src", "tgt_in", "tgt_out")}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        for b in D.eval_batches(self.test, batch_size):
            yield {k: b[k] for k in ("src", "tgt_in", "tgt_out")}  # padded rows are all PAD: weight 0

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.train) // batch_size

    def num_eval_batches(self, batch_size: int) -> int:
        return -(-len(self.test) // batch_size)


def _prepare(workdir, configs) -> TranslationData:
    cfg = configs["data"]
    tok = D.load_tokenizer(workdir, cfg, train=distributed.is_primary())
    if tok.vocab_size != cfg.vocab_size:
        print(f"note: SentencePiece made {tok.vocab_size} pieces (asked for {cfg.vocab_size}; the corpus has fewer)")
    sources, targets = D.sentence_pairs(cfg.dataset, cfg.train_split, cfg.source_lang, cfg.target_lang)
    n = cfg.train_examples or len(sources)
    train = D.encode_split(tok, sources[:n], targets[:n], max_tokens=cfg.max_tokens)
    test = D.encode_split(tok, *D.sentence_pairs(cfg.dataset, cfg.eval_split, cfg.source_lang, cfg.target_lang))
    return TranslationData(cfg, train, test, {"tokenizer": tok})


def _load_extras(workdir, configs) -> Dict[str, Any]:
    return {"tokenizer": D.load_tokenizer(workdir, configs["data"], train=False)}


def _model(configs, extras):
    # Without extras (flag checks before the vocabulary exists) the requested size stands in for the real one.
    vocab = extras["tokenizer"].vocab_size if extras else configs["data"].vocab_size
    return build_transformer(configs["model"].transformer(vocab, MAX_POSITIONS))


def encode_sources(tok: D.Tokenizer, sentences: Sequence[str]) -> np.ndarray:
    """``[M, S]`` padded source ids (``S`` a multiple of 8: one decoder compilation per width)."""
    ids = tok.encode(sentences)
    width = min(MAX_POSITIONS, max(8, -(-max(len(x) for x in ids) // 8) * 8))
    out = np.full((len(ids), width), PAD_ID, np.int32)
    for i, x in enumerate(ids):
        out[i, :min(len(x), width)] = x[:width]
    return out


def translate_sentences(model, params, tok: D.Tokenizer, sentences: Sequence[str], decode: DecodeConfig,
                        beam_size: int) -> List[str]:
    """Detokenised translations of raw source sentences (special tokens stripped)."""
    src = encode_sources(tok, sentences)
    max_len = min(MAX_POSITIONS, src.shape[1] + 16)  # targets are rarely much longer than sources
    pred = decode_dataset(model, params, src, max_len, min(decode.decode_batch, len(src)), beam_size, decode.alpha)
    return tok.decode(pred)


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    atomic.write_text(path, "".join(line.replace("\n", " ") + "\n" for line in lines))


def evaluate_split(model, params, configs, extras, split: str, beam_size: int, workdir=None,
                   tag: str = "step0") -> Dict[str, Any]:
    """Translates a whole split, scores it (cased sacreBLEU and the literature's lowercased, tokenised BLEU)
    and (``workdir``) writes hypotheses and references."""
    cfg, dec = configs["data"], configs["decode"]
    sources, references = D.sentence_pairs(cfg.dataset, split, cfg.source_lang, cfg.target_lang)
    hyps = translate_sentences(model, params, extras["tokenizer"], sources, dec, beam_size)
    out = {**bleu_score(hyps, references), **literature_bleu(hyps, references, cfg.target_lang)}
    if workdir is not None and distributed.is_primary():
        folder = Path(workdir) / "translations"
        folder.mkdir(parents=True, exist_ok=True)
        out["translations"] = str(folder / f"{split}-{tag}.{cfg.target_lang}")
        _write_lines(Path(out["translations"]), hyps)
        ref = folder / f"{split}.ref.{cfg.target_lang}"
        if not ref.exists() or ref.read_text(encoding="utf-8").splitlines() != list(references):
            _write_lines(ref, references)  # rewritten once by a workdir of the record-order era
    return out


def _decode_eval(model, params, configs, data, workdir, step: int, final: bool) -> Dict[str, Any]:
    cfg, dec = configs["data"], configs["decode"]
    return evaluate_split(model, params, configs, data.extras, cfg.eval_split, dec.eval_beam_size, workdir,
                          f"step{step}")


def _test_eval(model, params, configs, data, workdir, selection: Dict[str, Any], evaluate=None) -> Dict[str, Any]:
    """The reported figure: the selected parameters (best or averaged checkpoint) on the test split."""
    cfg, dec = configs["data"], configs["decode"]
    out: Dict[str, Any] = {}
    averaged = selection.get("averaged_steps")
    if averaged:  # its validation score too: averaging is a recipe choice, made on validation
        tag = f"avg{averaged[0]}-{averaged[-1]}"
        val = evaluate_split(model, params, configs, data.extras, cfg.eval_split, dec.eval_beam_size, workdir, tag)
        out.update({f"averaged_{k}": v for k, v in val.items()})
        what = f"average of the {len(averaged)} newest checkpoints (steps {', '.join(map(str, averaged))}; " \
               f"validation BLEU {val['bleu']:.2f})"
    else:
        tag = f"step{selection['selected_step']}"
        what = f"best validation checkpoint, step {selection['selected_step']}"
    test = evaluate_split(model, params, configs, data.extras, cfg.test_split, dec.beam_size, workdir, tag)
    out.update({f"test_{k}": v for k, v in test.items()})
    n = len(D.sentence_pairs(cfg.dataset, cfg.test_split, cfg.source_lang, cfg.target_lang)[0])
    print(f"{cfg.test_split} BLEU {test['bleu']:.2f} (lowercased, tokenised: {test['bleu_lc_tok']:.2f}; beam "
          f"{dec.beam_size}, alpha {dec.alpha}; {what}) on all {n} sentences: {test.get('translations', '')}\n"
          f"  {test['bleu_signature']}")
    return out


TRANSLATE = Task(
    name="translate",
    config_classes={"model": Seq2SeqModelConfig, "data": D.TranslateConfig, "decode": DecodeConfig},
    prepare=_prepare,
    load_extras=_load_extras,
    build_model=_model,
    init_inputs=seq2seq_init_inputs,
    loss_and_metrics=None,
    make_loss=lambda configs: seq2seq_loss(configs["decode"].label_smoothing),
    selection_metric="bleu",
    flag_defaults={**PAPER_OPTIMIZER, "d_model": 256, "num_heads": 4, "d_ff": 1024, "num_encoder_layers": 3,
                   "num_decoder_layers": 3, "dropout_rate": 0.1, "learning_rate": 1e-3, "warmup_steps": 1000,
                   "cooldown_fraction": 0.2, "batch_size": 128, "num_epochs": 20, "eval_batch_size": 200,
                   "beam_size": 4, "decode_batch": 200},
    resumable=DECODE_RESUMABLE,
    added_fields=MODEL_ADDED_FIELDS,
    decode_eval=_decode_eval,
    test_eval=_test_eval,
    summary=lambda m: f"loss {m['loss']:.4f} token acc {m['accuracy']:.4f} | BLEU {m.get('bleu', float('nan')):.2f}",
    eval_name="validation tokens",
)
