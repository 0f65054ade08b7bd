"""bench.py as a user runs it: the subcommands on tiny settings, its bad-input errors, and the
token-by-token baseline it times against the parallel LTE rule."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import tiny_hybrid

ROOT = Path(__file__).resolve().parent


def run_bench(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # what a user has
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("scores", ["random", "tied"])
def test_token_by_token_baseline_equals_the_parallel_rule(scores):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 400, 2, generator=g) if scores == "random" else torch.randint(-2, 5, (2, 400, 2), generator=g) / 8
    until, buf_score, buf_pos = bench.stream_visible_until(s, 20, 3, 16)
    want_until = tiny_hybrid.lte_visible_until(s, 20, 3, 16)
    want_score, want_pos = tiny_hybrid.lte_final_buffer(s, want_until, 20, 3, 16)
    assert torch.equal(until, want_until)
    for b in range(2):
        for h in range(2):   # the same buffer; slots may be in another order
            assert sorted(zip(buf_pos[b, h].tolist(), buf_score[b, h].tolist())) == \
                sorted(zip(want_pos[b, h].tolist(), want_score[b, h].tolist()))


@pytest.mark.gpu
def test_lte_rule_and_prefill_subcommands_run(tmp_path):
    """On the device a user gets by default: CUDA when torch sees a GPU (the LTE rule's kernel
    included), else the CPU; the file is named after it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for args in (["lte-rule", "--contexts", "700", "--steps", "1"],
                 ["prefill", "--presets", "gdn+lte", "gdn+swa", "--contexts", "600", "--steps", "1"]):
        done = run_bench(*args, "--out", str(tmp_path), cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        results = json.loads((tmp_path / f"bench_{device}_{args[0]}.json").read_text())
        rows = next(iter(results.values()))
        assert rows and all(r["ms"] > 0 for r in rows)


@pytest.mark.parametrize("args, message", [
    (["decode", "--batch", "0"], "--batch must be >= 1"),
    (["decode", "--contexts", "0"], "--contexts must all be >= 1"),
    (["train", "--train-len", "-3"], "--train-len must be >= 1"),
    (["decode", "--device", "tpu"], "--device must be cpu or cuda"),
    (["decode", "--presets", "gdn+xyz"], "invalid choice"),
    (["decode", "--compile", "--device", "cpu"], "--compile applies to decode on a CUDA GPU only"),
    (["train", "--compile"], "--compile applies to decode on a CUDA GPU only"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, args, message):
    done = run_bench(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
