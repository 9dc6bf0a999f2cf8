"""Suite-wide setting: a persistent XLA compilation cache for the child processes of each worker.

Many tests start ``train.py`` (or a benchmark) in a fresh process with the same tiny
configurations, and each fresh process would compile the same programs again: most of
such a run's time. The cache hands a later process the executable an earlier one
compiled from the same HLO (same numerics), so tests that compare runs still compare
like with like. Only child processes read it: JAX reads these variables when it is
imported, and this process imported it before the fixture runs.

One folder per pytest-xdist worker: without a size limit JAX writes entries unlocked
(a folder shared by the workers would need ``filelock`` and a limit, and JAX then
rescans the whole folder on every write).
"""

import importlib.util
import os

import pytest

# Compile fast, for this process and every child process (they inherit XLA_FLAGS; tests that
# set their own device count append to it). The suite's shapes are tiny, so its time is mostly
# XLA:CPU compiling, and most of that is LLVM optimising code that then runs for microseconds:
# at --xla_backend_optimization_level=0 the docs examples, the ring-attention cases and the
# GRU benchmark smoke test took 25-35% less CPU (2-core EPYC Zen 3, 2026-12-07). The level only
# changes LLVM's code generation, not XLA's HLO passes or the float semantics (no fast-math
# either way), so the tested numerics are the ones users get. Accelerator runs (a CUDA or TPU
# plugin installed) and an explicit level in XLA_FLAGS are left alone; nothing timed runs here.
SUITE_XLA_FLAG = "--xla_backend_optimization_level=0"
_ACCELERATOR = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))
if not _ACCELERATOR and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAG}".strip()

CACHE_ENV = {}


@pytest.fixture(scope="session", autouse=True)
def _child_compilation_cache(tmp_path_factory):
    CACHE_ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                     JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    saved = {k: os.environ.get(k) for k in CACHE_ENV}
    os.environ.update(CACHE_ENV)
    yield CACHE_ENV
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def in_process_compilation_cache(_child_compilation_cache):
    """The same cache for the test's own process, for tests that call ``train.main`` several times in-process.

    Each in-process run builds new jitted closures, so JAX's in-memory cache never hits and
    every run would compile the same programs again; the persistent cache hands the later runs
    the executables of the first (same HLO -> same executable, so runs still compare like with
    like). Switched on only for the test that asks for it, and off again afterwards.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    options = {"jax_compilation_cache_dir": _child_compilation_cache["JAX_COMPILATION_CACHE_DIR"],
               "jax_persistent_cache_min_compile_time_secs": 0.0,
               "jax_persistent_cache_min_entry_size_bytes": -1}
    saved = {k: getattr(jax.config, k) for k in options}
    for k, v in options.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()  # JAX decided at its first compilation that no cache is used
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
