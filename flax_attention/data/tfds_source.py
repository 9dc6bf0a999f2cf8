"""Reading a whole TFDS split with :func:`tensorflow_datasets.data_source`, or a clear error.

ArrayRecord files are read without TensorFlow. A dataset that is not prepared
under ``TFDS_DATA_DIR`` is downloaded and prepared by TFDS itself, which needs
TensorFlow for that one step (except for this project's own builders, which
write ArrayRecord directly); without TensorFlow (or without a network) the
error says where the data was looked for and both ways to fix it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, List


class DataUnavailableError(RuntimeError):
    """The dataset is neither prepared locally nor downloadable here."""


def missing_message(dataset: str, split: str, cause: BaseException) -> str:
    where = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets (TFDS default; TFDS_DATA_DIR is unset)"
    detail = str(cause).splitlines()[0] if str(cause) else ""
    return (
        f"{dataset} (split {split!r}) is not prepared under {where} and could not be "
        f"downloaded/prepared ({type(cause).__name__}: {detail}). "
        f"Fix: point TFDS_DATA_DIR at a directory holding a prepared {dataset.split('/')[0]} "
        "(e.g. export TFDS_DATA_DIR=../shared/tensorflow_datasets), or, with network access, "
        + ("run the same command once: this project's builder downloads and prepares it (no TensorFlow needed)."
           if dataset.split("/")[0] in NO_TENSORFLOW_NEEDED else
           "`pip install tensorflow` once so TFDS can download and prepare it.")
    )


# Builders of this project prepare ArrayRecord files without TensorFlow.
NO_TENSORFLOW_NEEDED = ("multi30k",)
# ... and the host their raw files come from: probed first, so an offline
# machine fails in seconds instead of after minutes of download retries.
DOWNLOAD_HOSTS = {"multi30k": "github.com"}


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_records(dataset: str, split: str) -> List[Dict[str, Any]]:
    """All records of ``dataset``'s ``split`` as dicts (downloads and prepares if it can)."""
    import tensorflow_datasets as tfds  # lazy: importing TFDS costs ~1 s

    try:
        source = tfds.data_source(dataset, split=split, download=False)
    except Exception as missing:  # not prepared here: let TFDS download + prepare
        own_builder = dataset.split("/")[0] in NO_TENSORFLOW_NEEDED
        if not own_builder and importlib.util.find_spec("tensorflow") is None:
            # Preparing needs TensorFlow anyway; without it, fail now instead of
            # after minutes of download retries on a machine without network.
            no_tf = ModuleNotFoundError("TensorFlow, which TFDS needs to prepare it, is not installed")
            raise DataUnavailableError(missing_message(dataset, split, no_tf)) from missing
        host = DOWNLOAD_HOSTS.get(dataset.split("/")[0])
        if host is not None and not host_reachable(host):
            offline = ConnectionError(f"{host}:443, where its raw files come from, is unreachable")
            raise DataUnavailableError(missing_message(dataset, split, offline)) from missing
        try:
            source = tfds.data_source(dataset, split=split, download=True,
                                      builder_kwargs={"file_format": "array_record"} if own_builder else None)
        except (Exception, SystemExit) as e:  # ImportError (no TF), network errors, ...
            raise DataUnavailableError(missing_message(dataset, split, e)) from e
    n = len(source)
    try:  # batched read: ~1 s for 25k reviews
        return list(source.__getitems__(list(range(n))))
    except (AttributeError, TypeError):  # tfds.testing.mock_data's source lacks a working __getitems__
        return [source[i] for i in range(n)]
