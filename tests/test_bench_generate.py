"""benchmarks/bench_generate.py runs end to end at tiny sizes (--quick); its baselines compute the same model.

No timing is checked (figures from a loaded test machine mean nothing): the
report's rows, the uncached baseline's greedy tokens (== ours) and the PyTorch
twin's logits (== ours, when torch is installed) are.
"""

import importlib.util
import json

import pytest

from benchmarks import bench_generate


@pytest.mark.slow
def test_quick_run_writes_the_report(tmp_path):
    out = str(tmp_path / "generate")
    results = bench_generate.main(["--quick", "--batches", "2", "--new_tokens", "6", "--out", out])
    saved = json.load(open(out + ".json"))
    text = open(out + ".md").read()
    assert "| 2 | ours |" in text and "| 2 | uncached |" in text and "Training:" in text
    assert "CPU " in text and saved["machine"]["cpu_cores"] >= 1
    ours, uncached = results["ours"][2]["tokens"], results["uncached"][2]["tokens"]
    assert len(ours) == 2 and len(ours[0]) == 6
    assert uncached == ours  # greedy without the cache recomputes the same model
    assert saved["train_tokens_per_s"] > 0
    if importlib.util.find_spec("torch") is None:
        assert "torch is not installed" in text
    else:
        assert "| 2 | torch |" in text
        assert results["torch_check_max_abs_diff"] < 1e-4  # same weights, same function
        assert len(results["torch"][2]["tokens"][0]) == 6
