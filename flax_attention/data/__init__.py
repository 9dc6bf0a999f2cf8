"""Input pipelines (NumPy, host-side) for the training program."""

from flax_attention.data.imdb import IMDBConfig, Vocabulary, encode, tokenize

from flax_attention import _compat

_compat.register(__name__, {"tasks": ("synthetic",)})  # the old name of .synthetic

__all__ = ["IMDBConfig", "Vocabulary", "encode", "tokenize"]
