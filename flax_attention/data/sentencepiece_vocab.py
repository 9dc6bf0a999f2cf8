"""The project's SentencePiece vocabulary (Kudo & Richardson 2018), shared by every subword task.

:class:`Tokenizer` wraps a trained ``sentencepiece`` model with fixed special
ids -- ``PAD_ID 0``, ``BOS_ID 1``, ``EOS_ID 2`` (as in
:mod:`flax_attention.data.synthetic`), ``UNK_ID 3`` -- learned in memory
(one thread, no sampling inside SentencePiece: the same sentences give the
same model) and saved whole-or-nothing (:mod:`flax_attention.data.atomic`).
Translation (:mod:`flax_attention.data.translate`) and the language model's
corpus (:mod:`flax_attention.data.lm_corpus`) save it as ``WORKDIR/spm.model``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import List, Sequence

import numpy as np

from flax_attention.data import atomic
from flax_attention.data.synthetic import BOS_ID, EOS_ID, PAD_ID

UNK_ID = 3
SPM_FILE = "spm.model"


class Tokenizer:
    """A SentencePiece model with the project's special ids (pad 0, bos 1, eos 2, unk 3)."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()) != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError("the SentencePiece model does not use pad 0, bos 1, eos 2, unk 3; it was not "
                             "written by this project. Train in a fresh --workdir.")

    @classmethod
    def train(cls, sentences: Sequence[str], vocab_size: int, model_type: str = "unigram",
              **options) -> "Tokenizer":
        """Learns a model from ``sentences``; ``options`` add or override ``SentencePieceTrainer`` settings
        (e.g. ``max_sentence_length`` for whole reviews)."""
        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, character_coverage=1.0,
            # One thread and no sampling: the same sentences give the same model.
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
            hard_vocab_limit=False, **options)
        return cls(buf.getvalue())

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """A saved model; a damaged file is a ValueError naming it (never rewritten: checkpoints use its ids)."""
        try:
            return cls(Path(path).read_bytes())
        except (RuntimeError, OSError, TypeError) as e:  # sentencepiece's parse failure is a RuntimeError
            raise ValueError(f"cannot read the SentencePiece model {path} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); restore it (the checkpoints in that "
                             "workdir need its ids), or use a fresh --workdir.") from None

    def save(self, path) -> None:
        atomic.write_bytes(path, self.proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts))

    def decode(self, rows) -> List[str]:
        """Token rows -> text; each row stops at its first EOS, PAD/BOS are dropped."""
        out = []
        for row in rows:
            ids = []
            for t in np.asarray(row).tolist():
                if t == EOS_ID:
                    break
                if t not in (PAD_ID, BOS_ID):
                    ids.append(t)
            out.append(self.sp.decode(ids))
        return out

    def pieces(self, ids: Sequence[int]) -> List[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]
