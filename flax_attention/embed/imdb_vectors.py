"""Word vectors learned from IMDB's own reviews (train + unsupervised splits), the whole pipeline.

Uses the classifier's vocabulary (:func:`flax_attention.data.imdb.load_vocabulary`:
``workdir/vocab.json``, built from the *training* split if absent) and its
tokenizer, so every vector row lines up with the classifier's ids. The test
split is never read. Full reviews are used (no ``max_length`` truncation):
the vectors should see all the text there is.

The trainer's ``train.py embed --out PATH`` calls :func:`learn_imdb_vectors`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from flax_attention.data import imdb
from flax_attention.data.word_vectors import save_word_vectors
from flax_attention.embed.skipgram import SkipGramConfig, nearest_neighbours, train_skipgram
from flax_attention.data import atomic

SPLITS = ("train", "unsupervised")  # never "test": the vectors must not see evaluation text
PROBE_WORDS = ("good", "bad", "excellent", "boring", "actor", "funny")


@dataclasses.dataclass
class EmbedReport:
    """Outcome of :func:`learn_imdb_vectors`.

    Attributes:
      path: the vector file written.
      vocab_words: vectors written (vocabulary words, reserved ids excluded).
      reviews: reviews read (train + unsupervised).
      tokens: in-vocabulary tokens of those reviews.
      steps: optimiser steps.
      pairs: (centre, context) pairs trained on.
      seconds: training wall time (compilation included, data loading excluded).
      data_seconds: time to read, tokenise and encode the reviews (0 when cached).
      final_loss: mean SGNS loss per pair over the last logged interval.
      neighbours: nearest words of a few probe words (cosine similarity).
    """

    path: str
    vocab_words: int
    reviews: int
    tokens: int
    steps: int
    pairs: int
    seconds: float
    data_seconds: float
    final_loss: float
    neighbours: Dict[str, List[str]]

    def summary(self) -> str:
        lines = [f"wrote {self.vocab_words} vectors to {self.path}: {self.reviews} reviews, {self.tokens} tokens, "
                 f"{self.pairs} pairs in {self.steps} steps, {self.seconds:.0f} s (+{self.data_seconds:.0f} s data), "
                 f"final loss {self.final_loss:.4f}"]
        lines += [f"  {w}: {' '.join(ns)}" for w, ns in self.neighbours.items()]
        return "\n".join(lines)


def encoded_reviews(workdir, data_config: imdb.IMDBConfig) -> Tuple[imdb.Vocabulary, List[np.ndarray], float]:
    """``(vocabulary, one int32 id array per train/unsupervised review, seconds spent)``.

    The id arrays are cached in ``workdir/data_cache`` keyed by the
    vocabulary's hash and the tokenizer version (tokenising 75k reviews takes
    tens of seconds).
    """
    start = time.perf_counter()
    vocab = imdb.load_vocabulary(workdir, data_config)
    cache = Path(workdir) / "data_cache" / f"{imdb.DATASET}-wordvec-{vocab.digest()}-{imdb.TOKENIZER_VERSION}.npz"
    if cache.exists():
        with np.load(cache) as z:
            tokens, offsets = z["tokens"], z["offsets"]
    else:
        seqs = []
        for split in SPLITS:
            texts, _ = imdb.load_split(split)
            seqs += [np.asarray(vocab.encode_words(imdb.tokenize(t)), np.int32) for t in texts]
        offsets = np.concatenate([[0], np.cumsum([s.size for s in seqs])]).astype(np.int64)
        tokens = np.concatenate(seqs).astype(np.int32)
        with atomic.atomic_open(cache, "wb") as f:
            np.savez(f, tokens=tokens, offsets=offsets)
    seqs = [tokens[offsets[i]:offsets[i + 1]] for i in range(offsets.size - 1)]
    return vocab, seqs, time.perf_counter() - start


def learn_imdb_vectors(workdir, out_path, data_config: imdb.IMDBConfig = imdb.IMDBConfig(),
                       config: SkipGramConfig = SkipGramConfig(), progress: bool = True,
                       probe_words: Sequence[str] = PROBE_WORDS, header: bool = True) -> EmbedReport:
    """Learns skip-gram vectors from IMDB train + unsupervised and writes them as text.

    Args:
      workdir: holds (or receives) ``vocab.json`` and the encoded-review cache;
        use the classifier's workdir so both share one vocabulary.
      out_path: the vector file (word2vec text format, one line per vocabulary word).
      data_config: the classifier's data settings (``vocab_size`` matters).
      config: learner settings; ``config.dim`` must equal the classifier's ``embed_dim``.
      progress: tqdm bar with the running loss.
      probe_words: words whose nearest neighbours the report lists.
      header: write the word2vec ``count dim`` header line.

    Returns:
      An :class:`EmbedReport`.
    """
    vocab, seqs, data_seconds = encoded_reviews(workdir, data_config)
    result = train_skipgram(seqs, vocab.size, config, progress=progress)
    words = vocab.words
    save_word_vectors(out_path, words, result.vectors[imdb.NUM_RESERVED:vocab.size], header=header)
    ids = {w: i + imdb.NUM_RESERVED for i, w in enumerate(words)}
    probes = [w for w in probe_words if w in ids]
    neighbours = {}
    if probes:
        near = nearest_neighbours(result.vectors[:vocab.size], [ids[w] for w in probes], k=8,
                                  exclude_below=imdb.NUM_RESERVED)
        neighbours = {w: [vocab.id_to_word(int(i)) for i in row] for w, row in zip(probes, near)}
    n_tokens = int(sum(int((s >= config.first_word_id).sum()) for s in seqs))
    return EmbedReport(str(out_path), len(words), len(seqs), n_tokens, result.steps, result.pairs,
                       result.seconds, data_seconds, result.losses[-1] if result.losses else float("nan"),
                       neighbours)
