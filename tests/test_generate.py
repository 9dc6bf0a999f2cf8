"""Cached generation of the decoder-only LM: == full recompute (ragged prompts), greedy, EOS, keys, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention.linen import generation
from flax_attention.linen.generation import _generate, generate
from flax_attention.models.lm import LanguageModel, LMConfig
from module_helpers import jinit

V, N = 19, 6
PROMPTS = jnp.array([[1, 5, 6, 7, 8], [1, 9, 0, 0, 0], [1, 10, 11, 0, 0]], jnp.int32)
LENGTHS = jnp.array([5, 2, 3], jnp.int32)


@functools.lru_cache(maxsize=None)
def make_lm(window=0):
    config = LMConfig(vocab_size=V, max_length=12, d_model=16, num_heads=4, num_kv_heads=2, num_layers=2,
                      d_ff=32, dropout_rate=0.0, window=window)
    model = LanguageModel(config)
    params = jinit(model, jnp.zeros((1, 4), jnp.int32), seed=3)["params"]
    # A larger embedding makes the random model's distributions peaked: tie-free argmaxes.
    params = {**params, "embedding": {"embedding": 3.0 * params["embedding"]["embedding"]}}
    return model, params


@pytest.fixture(scope="module")
def lm():
    return make_lm()


def full_forward_logits(model, params, out):
    """Uncached reference: each row's prompt + generated tokens in one causal forward; the logits that
    chose new token i are those at position length - 1 + i. [B, N, V]."""
    rows = [np.concatenate([np.asarray(PROMPTS[r, :LENGTHS[r]]), np.asarray(out[r])]) for r in range(len(out))]
    width = max(len(r) for r in rows)
    padded = jnp.asarray(np.stack([np.pad(r, (0, width - len(r))) for r in rows]), jnp.int32)
    full = jax.jit(model.apply)({"params": params}, padded)  # right padding is later: causality ignores it
    idx = np.asarray(LENGTHS)[:, None] - 1 + np.arange(out.shape[1])[None, :]
    return np.take_along_axis(np.asarray(full), idx[:, :, None], axis=1)


@pytest.mark.parametrize("window,phase", [(0, 64), (3, 64), (0, 2)])
def test_cached_logits_equal_full_recompute_with_ragged_prompts(window, phase, monkeypatch):
    # phase 2: the cache grows between phases of 2 decode steps (lengths 7, 9, 10), not once.
    monkeypatch.setattr(generation, "_PHASE", phase)
    assert len(generation._phase_lengths(PROMPTS.shape[1], N)) == (1 if phase >= N else 3)
    model, params = make_lm(window)  # window 3: the cache's position-based window == the full forward's
    out, logits = generate(model, params, PROMPTS, LENGTHS, key=jax.random.key(0), max_new_tokens=N,
                           temperature=1.0, top_k=8, stop_at_eos=False, return_logits=True)
    assert out.shape == (3, N) and out.dtype == jnp.int32 and logits.shape == (3, N, V)
    np.testing.assert_allclose(logits, full_forward_logits(model, params, out), atol=1e-5, rtol=0)
    # Sampled tokens lie in each step's top 8.
    rank = (np.asarray(logits) > np.take_along_axis(np.asarray(logits), np.asarray(out)[..., None], -1)).sum(-1)
    assert np.all(rank < 8)


def test_greedy_equals_top_k_1_equals_temperature_0(lm):
    model, params = lm
    greedy, logits = generate(model, params, PROMPTS, LENGTHS, max_new_tokens=N, temperature=0.0,
                              stop_at_eos=False, return_logits=True)
    np.testing.assert_array_equal(greedy, np.argmax(full_forward_logits(model, params, greedy), axis=-1))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))
    top1 = generate(model, params, PROMPTS, LENGTHS, key=jax.random.key(5), max_new_tokens=N, temperature=1.0,
                    top_k=1, stop_at_eos=False)
    np.testing.assert_array_equal(top1, greedy)


def test_eos_stops_each_row_and_keys_reproduce(lm):
    model, params = lm
    kw = dict(key=jax.random.key(1), max_new_tokens=N, temperature=3.0)
    free = np.asarray(generate(model, params, PROMPTS, LENGTHS, stop_at_eos=False, **kw))
    np.testing.assert_array_equal(generate(model, params, PROMPTS, LENGTHS, stop_at_eos=False, **kw), free)
    other = generate(model, params, PROMPTS, LENGTHS, stop_at_eos=False, **{**kw, "key": jax.random.key(2)})
    assert not np.array_equal(other, free)
    # Call a token some row first draws mid-way "EOS": each row stops at its first EOS (kept, PAD after)
    # and is unchanged before it, since step i's key does not depend on which rows are done.
    r, j = next((r, j) for r in range(3) for j in range(1, N - 1) if free[r, j] not in free[r, :j])
    eos = int(free[r, j])
    compiled = _generate._cache_size()
    stopped = np.asarray(generate(model, params, PROMPTS, LENGTHS, eos_id=eos, pad_id=V - 1, **kw))
    assert _generate._cache_size() == compiled  # keys, EOS and PAD ids are traced: no recompile
    assert stopped[r, j] == eos and np.all(stopped[r, j + 1:] == V - 1)
    for row in range(3):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if hits.size else N
        np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
        assert np.all(stopped[row, end:] == V - 1)


def test_zero_new_tokens_and_bad_arguments(lm):
    model, params = lm
    assert generate(model, params, PROMPTS, LENGTHS, max_new_tokens=0, temperature=0.0).shape == (3, 0)
    # Checked before any work: params=None would fail at the first model call.
    cases = [
        (dict(temperature=-1.0), r"temperature=-1.0 must be a number >= 0"),
        (dict(top_k=0), r"top_k=0 must be an int >= 1"),
        (dict(top_p=1.2), r"top_p=1.2 must be in \(0, 1\]"),
        (dict(max_new_tokens=-2), r"max_new_tokens=-2 must be an int >= 0"),
        (dict(max_new_tokens=8), r"T=5 \+ max_new_tokens=8 exceeds the model's max_length=12; lower "
                                 r"max_new_tokens to 7"),
        (dict(prompts=jnp.ones((1, 13), jnp.int32), lengths=None), r"T=13 exceeds the model's max_length=12"),
        (dict(prompts=PROMPTS.at[1, 1].set(V)), rf"prompt id {V} is outside the vocabulary \[0, {V}\)"),
        (dict(lengths=jnp.array([5, 0, 3])), r"lengths must be in \[1, T=5\]"),
        (dict(key=None), r"pass key=jax.random.key"),
    ]
    for kw, match in cases:
        args = {"prompts": PROMPTS, "lengths": LENGTHS, "key": jax.random.key(0), "max_new_tokens": N, **kw}
        with pytest.raises(ValueError, match=match):
            generate(model, None, args.pop("prompts"), args.pop("lengths"), **args)
