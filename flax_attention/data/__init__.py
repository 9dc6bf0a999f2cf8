"""Input pipelines (NumPy, host-side) for the training program."""

from flax_attention.data.imdb import IMDBConfig, Vocabulary, encode, tokenize

__all__ = ["IMDBConfig", "Vocabulary", "encode", "tokenize"]
