"""train_shakespeare.py --long: the needle task, its evaluation grid, and data parallel training
under torchrun, run the way a user runs them (in a subprocess, on the CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import long_context

ROOT = Path(__file__).resolve().parent
SCRIPT = ROOT / "train_shakespeare.py"
KEYS, VALUES = 2048 + np.arange(32), 2176 + np.arange(32)
TEXT = np.arange(10_000) % 2000  # stands in for a tokenized split


def test_needles_sit_at_their_depth_and_are_queried_at_the_end():
    n, length = 3, 200
    for depth in (0.0, 0.5, 1.0):
        starts = long_context.starts_at_depth(n, length + 1 - 2 * n, depth)
        seq = long_context.needle_sequence(TEXT, length, starts, np.random.default_rng(0), KEYS, VALUES)
        idx, targets = seq["idx"], seq["targets"]
        assert list(seq["answer_pos"]) == [length + 1 - 2 * n + 2 * i for i in range(n)]  # the last blocks
        for pos, distance in zip(seq["answer_pos"], seq["answer_distance"]):
            value_pos = pos - distance
            assert idx[value_pos - 1] == idx[pos]              # the needle's key, then its value
            assert targets[pos] == idx[value_pos]               # the answer is the needle's value
        assert np.isin(idx[starts], KEYS).all()
        assert abs(starts[0] / (length + 1 - 4 * n) - depth) < 0.01
        assert (targets[seq["answer_mask"]] >= 2176).all() and seq["answer_mask"].sum() == n


def test_random_needles_never_overlap():
    rng = np.random.default_rng(1)
    for _ in range(200):
        starts = long_context.random_starts(8, 40, rng)
        assert (np.diff(starts) >= 2).all() and starts[0] >= 0 and starts[-1] <= 38


def test_grid_of_a_model_that_copies_the_answer_is_perfect():
    """evaluate_grid reads the right positions: a 'model' whose logits put the target first scores 1."""

    class Oracle(torch.nn.Module):
        def forward(self, idx):
            logits = torch.zeros(*idx.shape, 2208)
            key_at = {}                                      # key token -> the value that followed it
            for b in range(idx.shape[0]):
                row = idx[b].tolist()
                for t in range(len(row)):
                    if 2048 <= row[t] < 2176 and row[t] not in key_at:
                        key_at[row[t]] = row[t + 1]
                    elif row[t] in key_at:
                        logits[b, t, key_at[row[t]]] = 1.0
                key_at.clear()
            return logits, None

    grid = long_context.evaluate_grid(Oracle(), TEXT, 64, 16, (1, 4), 2, KEYS, VALUES, "cpu")
    cells = [acc for by_len in grid["recall"].values() for by_depth in by_len.values() for acc in by_depth.values()]
    assert grid["lengths"] == [64, 128, 256, 512] and min(cells) == 1.0


def run_script(*args: str, processes: int = 0, timeout: int = 120) -> subprocess.CompletedProcess:
    """The script as a user runs it: python, or torchrun with `processes` processes; the user's
    environment (without the TRITON_INTERPRET that conftest.py sets for this process)."""
    if processes:
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes)]
        if not Path(launcher[0]).exists():
            pytest.skip("torchrun is not installed beside this python")
    else:
        launcher = [sys.executable]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([*launcher, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_long_on_a_cpu_says_what_it_costs_and_stops(tmp_path):
    done = run_script("--long", "--device", "cpu", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    line = done.stderr.strip()
    assert "\n" not in line and "--long on a CPU" in line and "GPU" in line and "--long --quick" in line


# Tiny settings shared by the two runs below: gdn and gdn+swa (no dropout, so that both runs draw
# nothing at random besides the batches), 6 steps covering every kind of batch, a global batch of 4.
TINY = ["--long", "--quick", "--device", "cpu", "--models", "gdn,gdn+swa", "--steps", "6", "--batch-size", "4",
        "--log-every", "1", "--eval-every", "3", "--eval-batch", "1", "--checkpoint-every", "3", "--drill-frac", "0.3"]


def losses(out: Path) -> dict[str, list[float]]:
    runs = json.loads((out / "long.json").read_text())["runs"]
    return {name: [row["loss"] for row in run["history"]] for name, run in runs.items()}


def test_torchrun_two_processes_train_like_one(tmp_path):
    """2 processes with 2 rows each give the loss curve of 1 process with the 4 rows, and rank 0
    alone writes; then --resume reads the finished runs back."""
    one, two = tmp_path / "one", tmp_path / "two"
    first = run_script(*TINY, "--out", str(one))
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_script(*TINY, "--out", str(two), processes=2)
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() == {"gdn seed 0", "gdn+swa seed 0"}
    # Tolerance: the two jobs compute the same function of the same global batch, in another order
    # (sums over 2 shards then an all-reduce, matmuls of 2 rows instead of 4, 1 thread instead of 2),
    # so they differ by float32 rounding, which 6 AdamW steps carry forward (measured: at most
    # 1.3e-7 relative, a few ulps of losses near 7.7). A wrong reduction, the mean of the shards'
    # means, is off by 2e-5 and 1.1e-4 relative at two of these steps already at the first weights
    # (the shards hold 60 vs 58 and 212 vs 240 weighted targets): rtol 1e-5 sits 75x above the
    # rounding and catches that.
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5)
    written = sorted(p.name for p in two.iterdir())
    assert written == sorted(p.name for p in one.iterdir())
    assert "long_heatmap.png" in written and "gdn_seed0.pt" in written
    again = run_script(*TINY, "--out", str(two), "--resume", processes=2)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished earlier") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path: needs a GPU")
def test_long_on_a_gpu_times_the_kernels_and_trains_over_nccl(tmp_path):
    """--use-triton --long --quick on the GPU: the kernels' speed-up over the reference ops is
    measured and recorded, and torchrun (NCCL, one process per GPU, at most 2) trains like one
    process. The exact comparison is the CPU test's; here the GPU's reductions (cuBLAS, atomics)
    may change the order of float32 sums from run to run, so 1e-3 relative only says the two jobs
    trained the same model on the same batches."""
    tiny = [a for a in TINY if a not in ("--device", "cpu")] + ["--use-triton"]
    one = run_script(*tiny, "--out", str(tmp_path / "one"), timeout=900)
    assert one.returncode == 0, one.stderr[-2000:]
    timing = json.loads((tmp_path / "one" / "long.json").read_text())["kernel_speedup"]
    assert timing["kernels_ms"] > 0 and timing["reference_ms"] > 0 and timing["speedup"] > 0
    assert "the kernels are" in one.stdout
    two = run_script(*tiny, "--out", str(tmp_path / "two"), processes=min(2, torch.cuda.device_count()), timeout=900)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-3)
