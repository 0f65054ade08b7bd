"""pytest setup: without a GPU, Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before the first `import triton` in the process, whichever test file
imports it first, so it is set here, before any test module is collected."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
