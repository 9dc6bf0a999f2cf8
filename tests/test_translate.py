"""--task translate: BLEU by hand, byte vocabulary, a TFDS translation set on mock data."""

import math

import numpy as np
import pytest

from flax_attention.bleu import corpus_bleu, tokenize
from flax_attention.data.tasks import EOS_ID, NUM_SPECIAL, PAD_ID
from flax_attention.data.translate import TranslateConfig, decode_bytes, encode_bytes


def test_bleu_hand_computed():
    assert corpus_bleu(["the cat sat on the mat ."], ["the cat sat on the mat ."]).score == pytest.approx(100.0)
    # p1..p4 = 4/5, 3/4, 2/3, 1/2; same length so BP = 1: BLEU = 0.2 ** 0.25.
    s = corpus_bleu(["a b c d e"], ["a b c d f"])
    assert s.precisions == pytest.approx((0.8, 0.75, 2 / 3, 0.5)) and s.brevity_penalty == 1.0
    assert s.score == pytest.approx(100 * 0.2 ** 0.25)
    # All n-grams match, but 4 hypothesis tokens against 6 reference tokens: BP = exp(1 - 6/4).
    short = corpus_bleu(["a b c d"], ["a b c d e f"])
    assert short.brevity_penalty == pytest.approx(math.exp(-0.5)) and short.score == pytest.approx(100 * math.exp(-0.5))
    # Clipping (Papineni et al. Sec. 2.1): "the" counts at most twice; no bigram matches -> 0.
    clipped = corpus_bleu(["the the the the the the the"], ["the cat is on the mat"])
    assert clipped.precisions[0] == pytest.approx(2 / 7) and clipped.score == 0.0
    # Corpus level: n-gram counts are summed before dividing (not an average of sentence scores).
    pair = corpus_bleu(["a b c d e", "a b c d"], ["a b c d f", "a b c d"])
    assert pair.precisions == pytest.approx((8 / 9, 6 / 7, 4 / 5, 2 / 3))
    assert tokenize("Hello, world!") == ["Hello", ",", "world", "!"]
    with pytest.raises(ValueError, match="one of each"):
        corpus_bleu(["a"], [])


def test_byte_vocabulary_round_trip_and_cut():
    ids = encode_bytes("olá", 16)
    assert ids.tolist() == [b + NUM_SPECIAL for b in "olá".encode()] and len(ids) == 4
    assert decode_bytes([*ids, EOS_ID, 7, 8]) == "olá"
    assert decode_bytes([PAD_ID, *encode_bytes("olá", 3)]) == "ol\ufffd"  # a cut character is replaced
    assert TranslateConfig().vocab_size == 259
    with pytest.raises(ValueError, match="max_bytes"):
        TranslateConfig(max_bytes=0)


@pytest.mark.slow
def test_translate_on_mock_tfds_trains_resumes_and_scores_bleu(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from flax_attention import seq2seq_train as ST
    from flax_attention.heatmaps import heatmaps_from_workdir
    from flax_attention.seq2seq_checkpoint import load_trained

    task = TranslateConfig(dataset="ted_hrlr_translate/pt_to_en", max_bytes=12)
    config = ST.small_config(task, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1)
    train = ST.Seq2SeqTrainConfig(steps=4, batch_size=4, warmup_steps=2, eval_every=2, eval_examples=4,
                                 decode_batch=4)
    with tfds.testing.mock_data(num_examples=6):
        batch = task.train_batch(4, 0)
        assert batch["src"].shape == (4, 12) and batch["tgt_in"].shape == (4, 13)
        np.testing.assert_array_equal(batch["tgt_in"], task.train_batch(4, 0)["tgt_in"])  # step-determined
        assert (batch["tgt_in"][:, 0] == 1).all() and (batch["tgt_out"] == EOS_ID).sum() == 4
        sources, targets = task.references()
        assert len(targets) == 6 and all(isinstance(t, str) for t in sources + targets)
        lines = []
        _, history = ST.train_seq2seq(config, task, train, log=lines.append, workdir=tmp_path)
        assert [h["step"] for h in history] == [2, 4]
        assert 0.0 <= history[-1]["bleu"] <= 100.0 and len(history[-1]["bleu_precisions"]) == 4
        assert any(line.startswith("test BLEU") and "on 6 sentences" in line for line in lines)
        model, _, task2, _, _ = load_trained(tmp_path)
        assert task2 == task and model.config.vocab_size == 259
        paths = heatmaps_from_workdir(tmp_path, num_examples=1)
        assert len(paths) == 3 and all(p.exists() for p in paths)


@pytest.mark.slow
def test_translate_without_data_fails_with_one_actionable_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "empty")}
    out = subprocess.run([sys.executable, "train.py", "--model", "seq2seq", "--task", "translate", "--steps", "2",
                          "--workdir", str(tmp_path / "w")], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ted_hrlr_translate/pt_to_en (split '") and "is not prepared" in line
    assert "TFDS_DATA_DIR" in line and "pip install tensorflow" in line
    assert not (tmp_path / "w").exists()  # nothing written for a run that could not start
