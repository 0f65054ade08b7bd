"""pytest setup: where the Triton kernels run, the `gpu` marker, and float32 without TF32.

Without a CUDA GPU the kernels run in Triton's interpreter on the CPU. TRITON_INTERPRET must be set
before the first `import triton` in the process, whichever test file imports it first, so it is set
here, before any test module is collected, and only when no GPU is visible: on a CUDA machine the
kernels are compiled, as a user's are. The scripts the tests start in subprocesses get the user's
environment without it."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu: a test whose subject runs on CUDA when a GPU is visible (the Triton kernels compiled, CUDA "
        "graphs, training and benchmarks on the GPU); without one it runs on the CPU (kernels in Triton's "
        "interpreter) or skips. `pytest -m gpu` runs these alone.")


@pytest.fixture
def exact_float32():
    """float32 products without TF32 on CUDA, restored afterwards: PyTorch's matmuls do not use it by
    default but cuDNN's convolutions do, and a comparison at float32 tolerances needs neither.
    Restored by hand: cuBLAS's switch is a computed attribute that pytest's monkeypatch (9.x) cannot
    restore. (The legacy switches, which set every cuDNN op at once: torch >= 2.9 refuses to read
    them after cuDNN's conv and RNN were set apart with the newer fp32_precision.)"""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32, cudnn.allow_tf32 = False, False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where kernels.py runs its kernels, by its own rule: CUDA when torch sees a GPU (compiled),
    else the CPU (Triton's interpreter). Skips where Triton is not installed (it ships for Linux)."""
    kernels = pytest.importorskip("kernels")
    return torch.device("cpu" if kernels.INTERPRET else "cuda")
