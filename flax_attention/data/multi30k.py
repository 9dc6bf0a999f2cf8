"""TFDS builder for Multi30k task 1, German-English (raw, untokenised, cased).

Elliott et al., "Multi30K: Multilingual English-German Image Descriptions"
(2016). TFDS has no Multi30k builder, so this one is written to the spec of the
prepared copy in ``../shared/tensorflow_datasets/multi30k/1.0.0``: name
``multi30k``, version 1.0.0, ``Translation(languages=("de", "en"))``,
supervised keys ``("de", "en")``, splits train 29,000 / validation 1,014 /
test 1,000 (``test_2016_flickr``, the usual "test2016") / test_2017_flickr
1,000 / test_2017_mscoco 461 / test_2018_flickr 1,071.

Importing this module registers the builder, so ``tfds.data_source("multi30k")``
reads a prepared copy under ``TFDS_DATA_DIR`` and, where none exists and a
network is available, downloads the gzipped raw files from the public
multi30k/dataset repository (pinned commit) and prepares them. Prepare with
``file_format="array_record"`` (what :func:`~flax_attention.data.tfds_source.read_records`
asks for) and no TensorFlow is needed.

Record order: TFDS stores a split's records sorted by a hash of their keys
(here the raw file's line numbers), a fixed reshuffle of the official order.
:func:`raw_line_numbers` recomputes that permutation with TFDS's own hasher,
so evaluation splits can be read back in the order of the official files
(what ``sacrebleu -t multi30k/2016`` and published scores use).
"""

from __future__ import annotations

import gzip
from typing import Dict, Iterator, List, Sequence, Tuple, TypeVar

import tensorflow_datasets as tfds

COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
RAW_URL = f"https://github.com/multi30k/dataset/raw/{COMMIT}/data/task1/raw/{{name}}.{{lang}}.gz"
LANGUAGES = ("de", "en")
# TFDS split name -> raw file stem.
SPLITS: Dict[str, str] = {
    "train": "train",
    "validation": "val",
    "test": "test_2016_flickr",
    "test_2017_flickr": "test_2017_flickr",
    "test_2017_mscoco": "test_2017_mscoco",
    "test_2018_flickr": "test_2018_flickr",
}


def raw_urls() -> Dict[str, str]:
    """``"<stem>.<lang>" -> URL`` of every raw file."""
    return {f"{stem}.{lang}": RAW_URL.format(name=stem, lang=lang) for stem in SPLITS.values() for lang in LANGUAGES}


def read_pairs(de_path, en_path) -> Iterator[Tuple[int, Dict[str, str]]]:
    """``(line number, {"de": ..., "en": ...})`` of two aligned gzipped files, stripped.

    Raises:
      ValueError: the files have different line counts (they would misalign).
    """
    with gzip.open(de_path, "rt", encoding="utf-8") as de, gzip.open(en_path, "rt", encoding="utf-8") as en:
        de_lines, en_lines = de.read().splitlines(), en.read().splitlines()
    if len(de_lines) != len(en_lines):
        raise ValueError(f"{de_path} has {len(de_lines)} lines but {en_path} has {len(en_lines)}: "
                         "the files must be line-aligned translations; re-download them.")
    for i, (d, e) in enumerate(zip(de_lines, en_lines)):
        yield i, {"de": d.strip(), "en": e.strip()}


def raw_line_numbers(split: str, num_records: int) -> List[int]:
    """Raw-file line number of each record of a prepared split, in TFDS record order.

    TFDS's writer orders records by ``Hasher(salt=split).hash_key(key)``; this
    builder's keys are the line numbers ``0..n-1``, so sorting them by the same
    hash gives the stored order. Checked against the raw files by the tests.
    """
    from tensorflow_datasets.core import hashing

    hasher = hashing.Hasher(salt=split)
    return sorted(range(num_records), key=hasher.hash_key)


T = TypeVar("T")


def in_raw_order(records: Sequence[T], split: str) -> List[T]:
    """A split's records re-ordered from TFDS record order to the raw files' line order."""
    out: List[T] = [None] * len(records)  # type: ignore[list-item]
    for record, line in zip(records, raw_line_numbers(split, len(records))):
        out[line] = record
    return out


class Multi30k(tfds.core.GeneratorBasedBuilder):
    """Multi30k task 1 German-English image descriptions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw (cased, untokenised) task-1 text of multi30k/dataset at commit " + COMMIT[:7]}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Multi30k task 1, German-English (raw, untokenised, cased).",
            features=tfds.features.Translation(languages=LANGUAGES),
            supervised_keys=LANGUAGES,
            homepage="https://github.com/multi30k/dataset",
            citation="@inproceedings{elliott-etal-2016-multi30k, title={Multi30K: Multilingual English-German "
                     "Image Descriptions}, author={Elliott, Desmond and Frank, Stella and Sima'an, Khalil and "
                     "Specia, Lucia}, booktitle={Proceedings of the 5th Workshop on Vision and Language}, year={2016}}",
        )

    def _split_generators(self, dl_manager):
        paths = dl_manager.download(raw_urls())
        return {split: self._generate_examples(paths[f"{stem}.de"], paths[f"{stem}.en"])
                for split, stem in SPLITS.items()}

    def _generate_examples(self, de_path, en_path):
        yield from read_pairs(de_path, en_path)
