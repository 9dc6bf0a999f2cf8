"""Translation: the Multi30k builder, SentencePiece, sacreBLEU, and a real-data run through train.py."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_attention.data import translate as D
from flax_attention.data.synthetic import BOS_ID, EOS_ID, PAD_ID

ROOT = Path(__file__).parents[1]
SHARED = ROOT.parent / "shared"
REAL_DATA = Path(os.environ.get("TFDS_DATA_DIR") or SHARED / "tensorflow_datasets")
RAW = SHARED / "multi30k" / "raw"
HAS_MULTI30K = (REAL_DATA / "multi30k" / "1.0.0").is_dir()
needs_multi30k = pytest.mark.skipif(not HAS_MULTI30K, reason="prepared multi30k not found (set TFDS_DATA_DIR)")
TINY = ["--model", "translate", "--train_examples", "256", "--vocab_size", "500", "--d_model", "16",
        "--num_heads", "2", "--d_ff", "32", "--num_encoder_layers", "1", "--num_decoder_layers", "1",
        "--batch_size", "64", "--warmup_steps", "2", "--num_epochs", "1", "--beam_size", "2",
        "--decode_batch", "500", "--eval_batch_size", "500"]


@pytest.mark.skipif(not RAW.is_dir(), reason="raw Multi30k files not found")
def test_builder_prepares_the_raw_files_without_tensorflow_like_the_shared_copy(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from flax_attention.data import multi30k

    urls = multi30k.raw_urls()
    assert len(urls) == 12 and all(u.startswith("https://github.com/multi30k/dataset/raw/") for u in urls.values())
    # Offline: the download manager hands back the raw files instead of fetching the URLs.
    monkeypatch.setattr(tfds.download.DownloadManager, "download",
                        lambda self, u: {k: RAW / f"{k}.gz" for k in u})
    builder = tfds.builder("multi30k", data_dir=str(tmp_path), file_format="array_record")
    assert isinstance(builder, multi30k.Multi30k) and builder.info.supervised_keys == ("de", "en")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    sizes = {s: builder.info.splits[s].num_examples for s in multi30k.SPLITS}
    assert sizes == {"train": 29000, "validation": 1014, "test": 1000, "test_2017_flickr": 1000,
                     "test_2017_mscoco": 461, "test_2018_flickr": 1071}
    mine = tfds.data_source("multi30k", split="test", data_dir=str(tmp_path))
    pairs = {(r["de"], r["en"]) for r in mine}
    assert len(pairs) == 1000
    first = multi30k.read_pairs(RAW / "test_2016_flickr.de.gz", RAW / "test_2016_flickr.en.gz")
    i, rec = next(iter(first))
    assert i == 0 and (rec["de"].encode(), rec["en"].encode()) in pairs
    if HAS_MULTI30K:  # the same records as the prepared copy in shared/
        shared = tfds.data_source("multi30k", split="test", data_dir=str(REAL_DATA))
        assert pairs == {(r["de"], r["en"]) for r in shared}


def test_misaligned_raw_files_are_refused(tmp_path):
    import gzip

    from flax_attention.data.multi30k import read_pairs

    for name, lines in (("a.de.gz", "eins\nzwei\n"), ("a.en.gz", "one\n")):
        with gzip.open(tmp_path / name, "wt") as f:
            f.write(lines)
    with pytest.raises(ValueError, match="line-aligned"):
        list(read_pairs(tmp_path / "a.de.gz", tmp_path / "a.en.gz"))


def test_sentencepiece_round_trip_and_special_ids(tmp_path):
    words = ["ein", "Hund", "läuft", "über", "die", "Wiese", "Zwei", "Kinder", "spielen", "im", "Park", "."]
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(400)]
    tok = D.Tokenizer.train(corpus, vocab_size=60)
    assert (tok.sp.pad_id(), tok.sp.bos_id(), tok.sp.eos_id(), tok.sp.unk_id()) == (PAD_ID, BOS_ID, EOS_ID, D.UNK_ID)
    text = "Zwei Kinder spielen im Park."
    ids = tok.encode([text])[0]
    assert min(ids) > D.UNK_ID and tok.decode([ids])[0] == text
    # Decoding strips BOS/PAD and stops at the first EOS.
    assert tok.decode([[BOS_ID, *ids, EOS_ID, *ids, PAD_ID]])[0] == text
    tok.save(tmp_path / "spm.model")
    assert D.Tokenizer.load(tmp_path / "spm.model").encode([text])[0] == ids
    # The same corpus gives the same model (vocabularies are reproducible).
    assert D.Tokenizer.train(corpus, vocab_size=60).proto == tok.proto


def test_batches_are_bucketed_resumable_and_cover_every_pair():
    split = D.Split([np.arange(3, 3 + n, dtype=np.int32) for n in (3, 9, 5, 17, 4, 6, 8, 2)],
                    [np.arange(3, 3 + n, dtype=np.int32) for n in (4, 8, 5, 15, 3, 7, 9, 2)])
    epoch = D.epoch_batches(split, 2, seed=0, epoch=1)
    assert sorted(np.concatenate(epoch).tolist()) == list(range(8))
    assert [b.tolist() for b in epoch] == [b.tolist() for b in D.epoch_batches(split, 2, seed=0, epoch=1)]
    resumed = list(D.train_batches(split, 2, 0, 1, start_step=2))
    assert len(resumed) == 2 and np.array_equal(resumed[0]["src"], D.make_batch(split, epoch[2], 2)["src"])
    b = D.make_batch(split, [3], 2)  # one pair + one weight-0 padding row, length rounded up to 8
    assert b["src"].shape == (2, 24) and b["weights"].tolist() == [1.0, 0.0]
    assert b["tgt_in"][0, 0] == BOS_ID and b["tgt_out"][0, 15] == EOS_ID and (b["tgt_out"][1] == PAD_ID).all()
    evals = list(D.eval_batches(split, 3))
    assert sum(int(e["weights"].sum()) for e in evals) == 8


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--source_lang and --target_lang"):
        D.TranslateConfig(source_lang="en", target_lang="en")
    with pytest.raises(ValueError, match="--spm_model_type"):
        D.TranslateConfig(spm_model_type="wordpiece")


def read_scalars(folder: Path):
    """``{tag: [(step, value)]}`` from TensorBoard event files (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.mark.slow
@needs_multi30k
def test_real_data_run_bleu_equals_sacrebleu_on_the_written_files(tmp_path):
    w = tmp_path / "run"
    env = {**os.environ, "TFDS_DATA_DIR": str(REAL_DATA)}
    out = subprocess.run([sys.executable, "train.py", *TINY, "--workdir", str(w)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    import re

    pairs = int(re.search(r"multi30k de->en: (\d+) training pairs", out.stdout).group(1))
    assert 240 <= pairs <= 256 and "test BLEU" in out.stdout  # the first 256, minus those over 64 subwords
    step = pairs // 64
    final, test = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()][-2:]
    assert final["event"] == "eval" and final["step"] == step
    assert test["event"] == "test" and test["step"] == step and test["selected_step"] == step  # one checkpoint
    assert test["test_bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    for prefix, split, n, record in (("", "validation", 1014, final), ("test_", "test", 1000, test)):
        hyp, ref = w / "translations" / f"{split}-step{step}.en", w / "translations" / f"{split}.ref.en"
        assert record[f"{prefix}translations"] == str(hyp)
        assert len(hyp.read_text(encoding="utf-8").splitlines()) == n == len(ref.read_text().splitlines())
        cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-b"],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert float(cli.stdout.strip()) == pytest.approx(record[f"{prefix}bleu"], abs=0.006)
    # References are the test sentences in the official raw files' order (TFDS's hash order undone).
    import tensorflow_datasets as tfds

    from flax_attention.data import multi30k

    targets = [r["en"].decode() for r in tfds.data_source("multi30k", split="test", data_dir=str(REAL_DATA))]
    assert (w / "translations" / "test.ref.en").read_text(encoding="utf-8").splitlines() == \
        multi30k.in_raw_order(targets, "test")
    assert (w / "spm.model").exists()
    scalars = read_scalars(w / "tensorboard")
    assert {"train/loss", "train/learning_rate", "eval/bleu", "eval/test_loss"} <= set(scalars)
    assert scalars["eval/bleu"][-1] == (step, pytest.approx(final["bleu"], abs=1e-4))
    # translate: a sentence from the command line, its translation and cross-attention heatmaps.
    tr = subprocess.run([sys.executable, "train.py", "translate", "--workdir", str(w), "Ein Hund rennt."],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert tr.returncode == 0, tr.stderr[-2000:]
    assert "Ein Hund rennt. ->" in tr.stdout
    assert (w / "heatmaps" / "input_1" / "cross_layer0.png").stat().st_size > 1000
    # The recipe is chosen on validation only: the script writes no translation, and its winner is the
    # best validation score of its second stage (beam x alpha on the parameters chosen greedily).
    written = sorted(p.name for p in (w / "translations").iterdir())
    report = tmp_path / "recipe.md"
    rc = subprocess.run([sys.executable, "benchmarks/translate_recipe.py", "--workdir", str(w), "--average", "0,1",
                         "--beams", "1,2", "--alphas", "0.6,1.0", "--report", str(report)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rc.returncode == 0, rc.stderr[-2000:]
    result = json.loads(report.with_suffix(".json").read_text())
    assert result["split"] == "validation" and sorted(p.name for p in (w / "translations").iterdir()) == written
    greedy, decoded = result["rows"][:2], result["rows"][2:]
    assert [r["params"] for r in greedy] == ["best", "avg1"] and len(decoded) == 4
    assert result["chosen"]["params"] == max(greedy, key=lambda r: r["bleu"])["params"]
    assert result["chosen"]["validation_bleu"] == max(r["bleu"] for r in decoded)
    assert greedy[0]["bleu"] == pytest.approx(final["bleu"], abs=0.006)  # the trainer's own validation score
    # en->de from the same flags; the other direction's workdir name is the default.
    wrong = subprocess.run([sys.executable, "train.py", *TINY, "--source_lang", "fr", "--workdir", str(tmp_path / "x")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "no language 'fr'" in wrong.stderr
