"""Pretrained word vectors in a Flax model: write them into the embedding table, optionally freeze it.

Both IMDB classifiers (:class:`~flax_attention.models.BiGRUClassifier` and
:class:`~flax_attention.models.classifier.TransformerClassifier`) keep their
table at ``params["embed"]["embedding"]`` (``nn.Embed(name="embed")``), shape
``[V, E]``: :data:`EMBEDDING_PATH`.

Typical use (``rows, found`` from
:func:`flax_attention.data.word_vectors.load_word_vectors`)::

    params = init_embedding(params, EMBEDDING_PATH, rows, found)
    tx = freeze(optax.adam(1e-3), params, path_is(EMBEDDING_PATH))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple, Union

import jax
import numpy as np
import optax

EMBEDDING_PATH: Tuple[str, ...] = ("embed", "embedding")

PathLike = Union[str, Sequence[str]]


def _as_path(path: PathLike) -> Tuple[str, ...]:
    return tuple(p for p in path.split("/") if p) if isinstance(path, str) else tuple(path)


def _get(tree, path: Tuple[str, ...]):
    node = tree
    for depth, key in enumerate(path):
        if not hasattr(node, "keys") or key not in node:
            where = "/".join(path[:depth]) or "<root>"
            have = sorted(node.keys()) if hasattr(node, "keys") else type(node).__name__
            raise KeyError(f"no {key!r} under {where} of the params tree (it has {have}); "
                           f"pass the embedding's path, e.g. {'/'.join(EMBEDDING_PATH)!r} for the IMDB classifiers.")
        node = node[key]
    return node


def _replace(tree, path: Tuple[str, ...], value):
    """Copy of ``tree`` with the leaf at ``path`` replaced; the input is not modified."""
    if not path:
        return value
    new = {k: tree[k] for k in tree.keys()}
    new[path[0]] = _replace(tree[path[0]], path[1:], value)
    return type(tree)(new) if type(tree) is not dict else new  # keeps a FrozenDict a FrozenDict


def init_embedding(params, path: PathLike, rows: np.ndarray, found: np.ndarray, match_std: bool = False):
    """Returns ``params`` with the found rows of a pretrained table written into the embedding.

    Pure: ``params`` is not modified. Rows not ``found`` (unknown words, the
    reserved ids) keep the table's current (random) initialisation.

    Args:
      params: a Flax params tree (``variables["params"]``).
      path: keys leading to the table, a tuple or ``"embed/embedding"``
        (:data:`EMBEDDING_PATH` for the IMDB classifiers).
      rows: float ``[V', E]`` pretrained rows, ``V' <= V`` (the model's
        vocabulary may have spare ids the vocabulary never filled).
      found: bool ``[V']``, which rows to write.
      match_std: rescale the pretrained rows so their standard deviation equals
        that of the table's initialisation. Word2vec vectors are ~3x larger
        than Flax's default ``nn.Embed`` init (std ``E^-1/2``); the Transformer
        classifier multiplies its embeddings by ``√E`` and expects that scale.

    Returns:
      A new params tree of the same structure; the table keeps its dtype.
    """
    path = _as_path(path)
    table = _get(params, path)
    rows = np.asarray(rows, np.float32)
    found = np.asarray(found, bool)
    if table.ndim != 2 or rows.ndim != 2 or rows.shape[1] != table.shape[1]:
        raise ValueError(f"pretrained rows {rows.shape} do not fit the embedding {tuple(table.shape)} at "
                         f"{'/'.join(path)}: the vector size must equal the model's embed_dim ({table.shape[-1]}).")
    if rows.shape[0] > table.shape[0] or found.shape != rows.shape[:1]:
        raise ValueError(f"{rows.shape[0]} pretrained rows (found mask {found.shape}) for a {table.shape[0]}-row "
                         f"embedding at {'/'.join(path)}: build the model with vocab_size >= the vocabulary's size.")
    new = np.array(table, np.float32)  # host copy; the input stays untouched
    src = rows[found]
    if match_std and src.size:
        src = src * (float(np.std(new)) / max(float(np.std(src)), 1e-12))
    new[: rows.shape[0]][found] = src
    return _replace(params, path, jax.numpy.asarray(new, dtype=table.dtype))


def path_is(*paths: PathLike) -> Callable[[Tuple[str, ...]], bool]:
    """Predicate for :func:`freeze`: true for the leaves at (or under) any of ``paths``."""
    prefixes = [_as_path(p) for p in paths]
    return lambda leaf_path: any(tuple(leaf_path[: len(p)]) == p for p in prefixes)


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def key_path(keys) -> Tuple[str, ...]:
    """A ``jax.tree_util`` key path as the names :func:`freeze` predicates read, e.g. ``("embed", "embedding")``."""
    return tuple(_key_str(k) for k in keys)


def freeze(tx: optax.GradientTransformation, params,
           frozen: Callable[[Tuple[str, ...]], bool]) -> optax.GradientTransformation:
    """``tx`` for the trainable leaves, exact zero updates for the frozen ones.

    Built on :func:`optax.multi_transform`: ``tx`` (Adam, AdamW, any chain)
    never sees a frozen leaf, so neither its moments nor its weight decay can
    move it, and :func:`optax.set_to_zero` makes the frozen updates exactly
    0.0: frozen parameters stay bit-identical through any number of steps.
    ``tx`` keeps no state for frozen leaves (less memory). The optimiser state's
    structure differs from ``tx``'s alone, so a run must resume with the same
    freeze setting it was started with.

    Args:
      tx: the optimiser of the trainable parameters.
      params: the params tree (only its structure is used).
      frozen: ``leaf_path -> bool`` where ``leaf_path`` is the tuple of keys,
        e.g. ``("embed", "embedding")``; see :func:`path_is`.

    Returns:
      A :class:`optax.GradientTransformation` over the whole tree.
    """
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: "frozen" if frozen(key_path(kp)) else "trainable", params)
    if "frozen" not in jax.tree_util.tree_leaves(labels):
        raise ValueError("freeze(): the predicate matches no parameter; check the path "
                         f"(the IMDB classifiers' embedding is {'/'.join(EMBEDDING_PATH)!r}).")
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
