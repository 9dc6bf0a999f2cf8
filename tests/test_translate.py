"""Translation: the Multi30k builder, SentencePiece, sacreBLEU, and a real-data run through train.py."""

import gzip
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
# 3 epochs (3 checkpoints to select from and average), lr 0.01 so that they differ.
TINY = ["--model", "translate", "--train_examples", "256", "--vocab_size", "500", "--d_model", "16",
        "--num_heads", "2", "--d_ff", "32", "--num_encoder_layers", "1", "--num_decoder_layers", "1",
        "--batch_size", "64", "--warmup_steps", "2", "--num_epochs", "3", "--beam_size", "2",
        "--decode_batch", "500", "--eval_batch_size", "500", "--learning_rate", "0.01"]


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


VALIDATION_PAIRS = 256  # of 1014: per-epoch and recipe decodes of an untrained model need no more
# Runs a script (train.py, the recipe) with the validation split cut to its first VALIDATION_PAIRS pairs
# (official order): the validation decodes are most of an untrained run's time, and what is checked
# on them (files, sacreBLEU, selection, the recipe) does not need the whole split. The test split stays
# whole, and the checks that it is decoded whole (1000 lines) run on the same evaluate_split.
_CUT_VALIDATION = f"""
import runpy, sys
from flax_attention.data import translate as D
_pairs = D.sentence_pairs
def sentence_pairs(dataset, split, *langs):
    src, tgt = _pairs(dataset, split, *langs)
    return (src[:{VALIDATION_PAIRS}], tgt[:{VALIDATION_PAIRS}]) if split == "validation" else (src, tgt)
D.sentence_pairs = sentence_pairs
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _sacrebleu(ref, hyp):
    """The ``sacrebleu`` command's cased BLEU of ``hyp`` against ``ref`` (no project code in the loop)."""
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-b"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    return float(cli.stdout.strip())


@pytest.mark.slow
@needs_multi30k
def test_real_data_run_selects_averages_and_scores_like_sacrebleu(tmp_path):
    """One real-data run serves every check of a finished translation workdir (one training, not two):
    per-epoch validation decodes, the selected checkpoint's decode of the whole test split, the files
    sacrebleu rescores, TensorBoard, the translate command, the recipe script, averaging on a finished run."""
    import re

    import tensorflow_datasets as tfds

    from flax_attention.data import multi30k

    w = tmp_path / "run"
    env = {**os.environ, "TFDS_DATA_DIR": str(REAL_DATA), "JAX_PLATFORMS": "cpu"}

    def run(*extra):
        out = subprocess.run([sys.executable, "-c", _CUT_VALIDATION, "train.py", *TINY, "--workdir", str(w), *extra],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout, [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]

    stdout, records = run()
    pairs = int(re.search(rf"multi30k de->en: (\d+) training pairs \(<= 64 subwords\), {VALIDATION_PAIRS} validation pairs",
                          stdout).group(1))
    assert 240 <= pairs <= 256  # the first 256, minus those over 64 subwords
    assert "test BLEU" in stdout and "on all 1000 sentences" in stdout  # the test split is never cut
    per_epoch = pairs // 64
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [per_epoch * e for e in (1, 2, 3)]
    assert not any("test_bleu" in r for r in evals)  # epochs never look at the test split
    final, best = evals[-1], max((r["bleu"], r["step"]) for r in evals)[1]
    test = records[-1]
    assert test["event"] == "test" and test["step"] == final["step"] and test["selected_step"] == best
    assert test["test_bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert test["test_bleu_lc_tok_signature"].startswith("lowercase+moses-norm+moses-tok(en)|")
    # Every validation decode (of the cut split) and the test decode (of the whole test split): one line
    # per sentence, and the figure the sacrebleu command computes from the written files.
    translations = w / "translations"
    checked = [(r["translations"], "validation", VALIDATION_PAIRS, r["bleu"]) for r in evals]
    checked.append((test["test_translations"], "test", 1000, test["test_bleu"]))
    for (path, split, n, bleu), name in zip(checked, [f"validation-step{r['step']}.en" for r in evals] +
                                            [f"test-step{best}.en"]):
        hyp, ref = translations / name, translations / f"{split}.ref.en"
        assert path == str(hyp)
        assert len(hyp.read_text(encoding="utf-8").splitlines()) == n == len(ref.read_text().splitlines())
        assert _sacrebleu(ref, hyp) == pytest.approx(bleu, abs=0.006)
    # References are the test sentences in the official raw files' order (TFDS's hash order undone).
    targets = [r["en"].decode() for r in tfds.data_source("multi30k", split="test", data_dir=str(REAL_DATA))]
    references = (translations / "test.ref.en").read_text(encoding="utf-8").splitlines()
    assert references == multi30k.in_raw_order(targets, "test")
    raw = REAL_DATA.parent / "multi30k" / "raw"  # beside the TFDS copy
    if raw.is_dir():  # ... which is the official file itself
        with gzip.open(raw / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
            assert references == [x.strip() for x in f.read().splitlines()]
    assert (w / "spm.model").exists()
    scalars = read_scalars(w / "tensorboard")
    assert {"train/loss", "train/learning_rate", "eval/bleu", "eval/test_loss"} <= set(scalars)
    assert scalars["eval/bleu"][-1] == (final["step"], pytest.approx(final["bleu"], abs=1e-4))

    # translate: sentences from the command line (an empty line gives an empty line, not a refusal),
    # their translations and cross-attention heatmaps.
    tr = subprocess.run([sys.executable, "train.py", "translate", "--workdir", str(w), "Ein Hund rennt.", ""],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert tr.returncode == 0, tr.stderr[-2000:]
    assert "Ein Hund rennt. ->" in tr.stdout and "'' -> ''" in tr.stdout
    assert (w / "heatmaps" / "input_1" / "cross_layer0.png").stat().st_size > 1000

    # The recipe is chosen on validation only: the script writes no translation, and its winner is the
    # best validation score of its second stage (beam x alpha on the parameters chosen greedily).
    written = sorted(p.name for p in translations.iterdir())
    report = tmp_path / "recipe.md"
    rc = subprocess.run([sys.executable, "-c", _CUT_VALIDATION, "benchmarks/translate_recipe.py", "--workdir", str(w),
                         "--average", "0,1",
                         "--beams", "1,2", "--alphas", "0.6,1.0", "--report", str(report)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rc.returncode == 0, rc.stderr[-2000:]
    result = json.loads(report.with_suffix(".json").read_text())
    assert result["split"] == "validation" and sorted(p.name for p in translations.iterdir()) == written
    greedy, decoded = result["rows"][:2], result["rows"][2:]
    assert [r["params"] for r in greedy] == ["best", "avg1"] and len(decoded) == 4
    assert result["chosen"]["params"] == max(greedy, key=lambda r: r["bleu"])["params"]
    assert result["chosen"]["validation_bleu"] == max(r["bleu"] for r in decoded)
    best_eval = next(r for r in evals if r["step"] == best)
    assert greedy[0]["bleu"] == pytest.approx(best_eval["bleu"], abs=0.006)  # the trainer's own validation score
    assert greedy[1]["bleu"] == pytest.approx(final["bleu"], abs=0.006)  # avg1: the newest checkpoint alone

    # Averaging may be switched on for a finished run: nothing is trained, the average is decoded.
    _, records = run("--average_checkpoints", "2")
    test = records[-1]
    assert [r["step"] for r in records if r["event"] == "eval"] == [r["step"] for r in evals]
    assert test["event"] == "test" and test["averaged_steps"] == [r["step"] for r in evals][-2:]
    assert 0 <= test["averaged_bleu"] <= 100 and "test_bleu" in test
    assert Path(test["test_translations"]).name == f"test-avg{evals[-2]['step']}-{evals[-1]['step']}.en"

    # A language the dataset lacks is refused with the flag named.
    wrong = subprocess.run([sys.executable, "train.py", *TINY, "--source_lang", "fr", "--workdir", str(tmp_path / "x")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "no language 'fr'" in wrong.stderr
