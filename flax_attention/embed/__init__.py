"""Word embeddings: learning them (skip-gram) and putting pretrained ones into a model.

* :mod:`flax_attention.embed.pairs`: skip-gram training pairs (NumPy).
* :mod:`flax_attention.embed.skipgram`: the SGNS learner (JAX), :func:`learn_word_vectors`.
* :mod:`flax_attention.embed.imdb_vectors`: vectors from IMDB train + unsupervised reviews.
* :mod:`flax_attention.embed.pretrained`: :func:`init_embedding`, :func:`freeze`.

Reading and writing vector files is :mod:`flax_attention.data.word_vectors`.
"""

from flax_attention.embed.pretrained import EMBEDDING_PATH, freeze, init_embedding, path_is
from flax_attention.embed.skipgram import SkipGramConfig, learn_word_vectors, nearest_neighbours, train_skipgram

__all__ = ["EMBEDDING_PATH", "SkipGramConfig", "freeze", "init_embedding", "learn_word_vectors",
           "nearest_neighbours", "path_is", "train_skipgram"]
