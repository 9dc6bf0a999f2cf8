"""Greedy and beam-search decoding against uncached and exhaustive references."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention.data.synthetic import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID
from flax_attention.linen.decoding import beam_search, greedy_decode
from flax_attention.linen.layers import TransformerConfig
from flax_attention.linen.transformer import Transformer


def tiny_model(vocab_size, seed=0, max_len=16):
    config = TransformerConfig(
        vocab_size=vocab_size, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
        num_decoder_layers=1, dropout_rate=0.0, max_len=max_len)
    model = Transformer(config)
    src = jnp.full((1, 3), NUM_SPECIAL, jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), src, src)["params"]
    # Scale the (tied) embedding up so the random model has peaked, tie-free distributions.
    params = jax.tree_util.tree_map(lambda x: x * 3.0, params)
    return model, params


def random_src(rng, batch, length, vocab):
    src = rng.integers(NUM_SPECIAL, vocab, size=(batch, length)).astype(np.int32)
    src[0, length - 2:] = PAD_ID  # one padded row
    return jnp.asarray(src)


def teacher_forced_log_probs(model, params, src, seqs):
    """Uncached full forward: log p ``[M, n, V]`` at each position of ``seqs [M, n]``.

    ``src`` is ``[M, S]``; the decoder input is ``BOS + seqs[:, :-1]``. PAD
    after an EOS is masked as a key but, being later, never affects earlier positions.
    """
    tgt_in = jnp.concatenate([jnp.full((seqs.shape[0], 1), BOS_ID, jnp.int32), seqs[:, :-1]], axis=1)
    logits = jax.jit(model.apply)({"params": params}, src, tgt_in)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)


def test_greedy_matches_uncached_argmax():
    # Induction: if every greedy token is the uncached argmax given the greedy
    # prefix before it, the cached loop reproduced uncached greedy decoding.
    vocab, max_len = 9, 7
    model, params = tiny_model(vocab)
    src = random_src(np.random.default_rng(0), 3, 5, vocab)
    out = np.asarray(greedy_decode(model, params, src, max_len=max_len))
    assert out.shape == (3, max_len)
    lp = teacher_forced_log_probs(model, params, src, jnp.asarray(out))
    lp[..., [PAD_ID, BOS_ID]] = -np.inf
    for b in range(3):
        row = list(out[b])
        n = row.index(EOS_ID) + 1 if EOS_ID in row else max_len
        np.testing.assert_array_equal(out[b, :n], np.argmax(lp[b, :n], axis=-1))
        assert np.all(out[b, n:] == PAD_ID)


@pytest.mark.parametrize("seed", [0, 1])
def test_beam_width_one_equals_greedy(seed):
    model, params = tiny_model(8, seed=seed)
    src = random_src(np.random.default_rng(seed), 3, 5, 8)
    greedy = np.asarray(greedy_decode(model, params, src, max_len=6))
    tokens, scores = beam_search(model, params, src, beam_size=1, max_len=6, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(tokens)[:, 0], greedy)


class BigramModel(nn.Module):
    """A stand-in decoder whose next-token logits depend on the last token only (a fixed table)."""

    config: TransformerConfig
    table: tuple  # [V][V] logits, a tuple so the (static) model stays hashable

    def encode(self, src, *, deterministic=True):
        return jnp.zeros(src.shape + (1,), jnp.float32)

    @nn.compact
    def decode(self, tgt_in, encoded, src, *, deterministic=True, decode=False, lengths=None):
        if decode:
            self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        return jnp.asarray(self.table, jnp.float32)[tgt_in]

    def __call__(self, src, tgt_in, *, deterministic=True, decode=False):
        return self.decode(tgt_in, self.encode(src), src, decode=decode)


def test_beam_width_one_equals_greedy_with_a_length_penalty():
    # After BOS, EOS (p = .50) narrowly beats token 3 (p = .47), and 3 is followed by
    # EOS (p = .99). Greedy says [EOS]; a width-1 beam that kept 3 alive after finishing
    # [EOS] preferred [3, EOS] at alpha = 0.6 (-0.76 / lp(2) > -0.70 / lp(1)).
    v = 5
    table = np.full((v, v), np.log(1e-3))
    table[BOS_ID, [EOS_ID, 3, 4]] = np.log([0.497, 0.472, 0.029])
    table[3, EOS_ID], table[4, EOS_ID], table[EOS_ID, EOS_ID] = 0.0, 0.0, 0.0
    model = BigramModel(TransformerConfig(vocab_size=v, max_len=6), tuple(map(tuple, table.tolist())))
    src = jnp.full((2, 3), 3, jnp.int32)
    greedy = np.asarray(greedy_decode(model, {}, src, max_len=6))
    assert greedy[0].tolist() == [EOS_ID] + [PAD_ID] * 5
    for alpha in (0.0, 0.6, 2.0):
        tokens, scores = beam_search(model, {}, src, beam_size=1, max_len=6, alpha=alpha)
        np.testing.assert_array_equal(np.asarray(tokens)[:, 0], greedy, err_msg=f"alpha={alpha}")
        np.testing.assert_allclose(scores[:, 0], np.log(0.497), rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_finds_exhaustive_best(alpha):
    # Vocabulary: PAD, BOS, EOS + 3 symbols; hypotheses of up to L = 4 tokens:
    # 1 + 3 + 9 + 27 = 40 finished sequences. At most 27 live prefixes x 4
    # allowed tokens = 108 candidates per step, so W = 108 never prunes one and
    # beam search must return the exhaustive optimum and its exact score.
    vocab, max_len, width = 6, 4, 108
    model, params = tiny_model(vocab, seed=3)
    src = random_src(np.random.default_rng(2), 2, 4, vocab)
    tokens, scores = beam_search(model, params, src, beam_size=width, max_len=max_len, alpha=alpha)
    symbols = range(NUM_SPECIAL, vocab)
    cands = [list(p) + [EOS_ID] for n in range(1, max_len + 1)
             for p in itertools.product(symbols, repeat=n - 1)]
    lengths = np.array([len(c) for c in cands])
    padded = jnp.asarray([c + [PAD_ID] * (max_len - len(c)) for c in cands], jnp.int32)
    for b in range(2):
        lp = teacher_forced_log_probs(model, params, jnp.repeat(src[b:b + 1], len(cands), 0), padded)
        token_lp = np.take_along_axis(lp, np.asarray(padded)[:, :, None], axis=-1)[..., 0]
        seq_lp = np.where(np.arange(max_len) < lengths[:, None], token_lp, 0.0).sum(-1)
        score = seq_lp / ((5.0 + lengths) / 6.0) ** alpha
        best, best_seq = score.max(), cands[int(np.argmax(score))]
        got = list(np.asarray(tokens[b, 0]))
        assert got[: len(best_seq)] == best_seq
        assert all(t == PAD_ID for t in got[len(best_seq):])
        np.testing.assert_allclose(float(scores[b, 0]), best, rtol=1e-4, atol=1e-4)
        # Finished hypotheses first, sorted best first: W = 108 keeps all 40 of them;
        # the remaining slots hold unfinished (EOS-free) live ones, sorted too.
        has_eos = [EOS_ID in row for row in np.asarray(tokens[b]).tolist()]
        assert has_eos == [True] * len(cands) + [False] * (width - len(cands))
        fin, unfin = np.asarray(scores[b, :len(cands)]), np.asarray(scores[b, len(cands):])
        assert np.all(np.diff(fin) <= 1e-6) and np.all(np.diff(unfin) <= 1e-6)
        np.testing.assert_allclose(np.sort(fin)[::-1], np.sort(score)[::-1], rtol=1e-4, atol=1e-4)


def test_beam_search_shapes_and_bad_args():
    model, params = tiny_model(7)
    src = random_src(np.random.default_rng(4), 2, 3, 7)
    tokens, scores = beam_search(model, params, src, beam_size=3, max_len=5)
    assert tokens.shape == (2, 3, 5) and scores.shape == (2, 3)
    with pytest.raises(ValueError, match="alpha"):
        beam_search(model, params, src, beam_size=2, max_len=5, alpha=-0.5)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, params, src, max_len=0)


def test_beam_search_returns_real_hypotheses_when_few_finish():
    # L = 2 tokens: few hypotheses reach EOS, so the finished set is short and
    # the rest must be real live hypotheses (no EOS), never all-PAD placeholders,
    # scored log p / lp(n) like the finished ones.
    vocab, max_len, width, alpha = 9, 2, 4, 0.6
    model, params = tiny_model(vocab, seed=1)
    src = random_src(np.random.default_rng(5), 3, 5, vocab)
    tokens, scores = beam_search(model, params, src, beam_size=width, max_len=max_len, alpha=alpha)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    assert np.all(scores > -1e29) and np.all(tokens[..., 0] != PAD_ID)
    partial = 0
    for b in range(3):
        has_eos = [EOS_ID in row for row in tokens[b].tolist()]
        n_fin = sum(has_eos)
        partial += 0 < n_fin < width
        assert has_eos == [True] * n_fin + [False] * (width - n_fin)  # finished first
        assert len({tuple(r) for r in tokens[b].tolist()}) == width  # distinct hypotheses
        lp = teacher_forced_log_probs(model, params, jnp.repeat(src[b:b + 1], width, 0),
                                      jnp.asarray(tokens[b]))
        token_lp = np.take_along_axis(lp, tokens[b][:, :, None], axis=-1)[..., 0]
        n = np.array([row.index(EOS_ID) + 1 if EOS_ID in row else max_len for row in tokens[b].tolist()])
        want = np.where(np.arange(max_len) < n[:, None], token_lp, 0.0).sum(-1) / ((5.0 + n) / 6.0) ** alpha
        np.testing.assert_allclose(scores[b], want, rtol=1e-4, atol=1e-4)
    assert partial, "the fixture should leave some element with fewer than W finished hypotheses"


def test_greedy_and_beam_run_in_64_bit_mode():
    model, params = tiny_model(8, seed=2)
    src = random_src(np.random.default_rng(6), 2, 4, 8)
    greedy = np.asarray(greedy_decode(model, params, src, max_len=5))
    beams = beam_search(model, params, src, beam_size=2, max_len=5)
    with jax.enable_x64(True):
        np.testing.assert_array_equal(greedy_decode(model, params, src, max_len=5), greedy)
        beams64 = beam_search(model, params, src, beam_size=2, max_len=5)
    np.testing.assert_array_equal(beams64[0], beams[0])
    np.testing.assert_allclose(beams64[1], beams[1], rtol=1e-5)
