"""Every Triton kernel compiles for a Hopper GPU (sm_90), checked on a machine without one.

The interpreter that runs the other kernel tests executes the kernels as Python, so it accepts code
that Triton's compiler rejects: a loop that changes a variable's shape, a dot of two dtypes, tiles
that overflow shared memory. Here a small forward and backward of every op runs in the interpreter
with the GPU's block sizes and 16-bit inputs; each distinct launch is recorded and then compiled
with the same arguments down to a cubin (Triton ships its own ptxas), as a GPU would compile it.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "0":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton's first import (kernels.py explains)
triton = pytest.importorskip("triton")  # Triton ships for Linux only

import kernels  # noqa: E402
import tiny_hybrid  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every kernel test compiles the kernels")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 232448  # bytes a block may use on an H100 / H200 (227 KB)
LAUNCH_OPTIONS = ("num_warps", "num_stages")
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                 torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1", torch.int8: "*i8",
                 torch.uint8: "*u8"}


def _run_every_op(dtype):
    """A forward and backward of every op (small shapes), in `dtype` where the op takes it."""
    B, T, H, Hkv, D = 1, 70, 4, 2, 64
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    q, k, v = randn(B, T, H, D), randn(B, T, Hkv, D), randn(B, T, Hkv, D)
    keep = torch.rand(B, T, Hkv, generator=g) < 0.2
    if dtype != torch.float32:  # float32 attention is the same code with exact dots, which compile
        for window, kp in ((None, None), (16, None), (16, keep)):  # to FMA loops: 15-45 s each
            kernels.attention(q, k, v, window=window, keep=kp).float().sum().backward()
        kernels.attention_decode(randn(B, H, D, grad=False), k.detach(), v.detach(), keep)

    # Gated DeltaNet at head dim 128: the largest tiles (compiling costs seconds a launch, so one dim).
    # In float32 its kernels are exact-dot code too (FMA loops, 3-45 s each to build), but unlike
    # attention's they have tiles of their own (float32 [128, 128] states): built here as well.
    for dim in (128,):
        qg, kg = (torch.nn.functional.normalize(randn(B, T, H, dim, grad=False).float(), dim=-1).to(dtype)
                  .requires_grad_() for _ in range(2))
        vg = randn(B, T, H, dim)
        gate = (-torch.rand(B, T, H, generator=g)).requires_grad_()
        beta = torch.rand(B, T, H, generator=g).requires_grad_()
        h0 = torch.zeros(B, H, dim, dim, requires_grad=True)
        o, state = kernels.gated_delta_rule(qg, kg, vg, gate, beta, initial_state=h0)
        (o.float().sum() + state.sum()).backward()
        with torch.no_grad():
            kernels.gated_delta_rule_recurrent(qg, kg, vg, gate, beta, initial_state=h0)
            kernels.gated_delta_rule_recurrent_step(qg[:, 0], kg[:, 0], vg[:, 0], gate[:, 0], beta[:, 0],
                                                    h0.detach().clone())

    # NSA: compressed branch (with the lse gradient), block scores, selected blocks
    block = 16
    k_cmp, v_cmp = (tiny_hybrid.nsa_compress(x.detach(), block).requires_grad_() for x in (k, v))
    o, lse = kernels.nsa_compressed_attention(q, k_cmp, v_cmp, block)
    (o.float().sum() + torch.where(lse.isfinite(), lse, 0.0).sum()).backward()
    scores = kernels.nsa_block_scores(q.detach(), k_cmp.detach(), lse.detach(), block)
    block_idx = tiny_hybrid.nsa_select_blocks(scores, block, 2, 1)
    kernels.nsa_selected_attention(q, k, v, block_idx, block).float().sum().backward()

    # LTE's buffer rule (float32 scores whatever the model's dtype)
    kernels.lte_visible_until(torch.randn(B, T, Hkv, generator=g), 16, 2, 8)


def _recorded_launches(monkeypatch) -> list[dict]:
    """Every distinct launch of the ops, as {name, signature, constexprs, options} (what _compile
    takes), sorted by kernel name."""
    launches = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        options = {name: kwargs.pop(name) for name in LAUNCH_OPTIONS if name in kwargs}
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                          if k not in ("grid", "warmup")})
        bound.apply_defaults()
        signature = _signature(self.fn, bound.arguments)
        constexprs = {name: bound.arguments[name] for name, t in signature.items() if t == "constexpr"}
        launch = dict(name=self.fn.__name__, signature=signature, options=options, constexprs=constexprs)
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    # the GPU's tiles, not the interpreter's small ones
    monkeypatch.setattr(kernels, "ATTENTION_INTERPRETER_BLOCKS", kernels.ATTENTION_GPU_BLOCKS)
    monkeypatch.setattr(kernels, "DECODE_INTERPRETER_BLOCKS", kernels.DECODE_GPU_BLOCKS)
    monkeypatch.setattr(kernels, "NSA_INTERPRETER_BLOCKS", kernels.NSA_GPU_BLOCKS)
    monkeypatch.setattr(kernels, "LTE_RULE_INTERPRETER_BLOCKS", kernels.LTE_RULE_GPU_BLOCKS)
    for dtype in (torch.bfloat16, torch.float32):
        _run_every_op(dtype)
    return sorted(launches.values(), key=lambda launch: launch["name"])


def _argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _signature(fn, arguments) -> dict:
    constexprs = {name for name, p in inspect.signature(fn).parameters.items()
                  if p.annotation is not inspect.Parameter.empty and "constexpr" in str(p.annotation)}
    # a None pointer (an unused optional input) is a constexpr, as Triton's JIT specialises it
    return {name: "constexpr" if name in constexprs or value is None else _argument_type(value)
            for name, value in arguments.items()}


@pytest.fixture(scope="module")
def launches():
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _recorded_launches(monkeypatch)


def test_every_kernel_was_launched(launches):
    """The ops above reach every kernel in kernels.py, so that the compile test below covers them
    (in bfloat16 every one; float32 as well except the attention kernels)."""
    defined = {name for name, obj in vars(kernels).items()
               if isinstance(obj, InterpretedFunction) and name.endswith("_kernel")}
    assert defined - {launch["name"] for launch in launches} == set()


def _compile(launches: list[dict]) -> list[str]:
    """Compile each launch {name, signature, constexprs, options} for sm_90; return the failures.
    Runs in a process started with TRITON_INTERPRET=0, where kernels.py (and Triton's own library)
    define compilable functions and take the GPU's code paths."""
    assert not kernels.INTERPRET
    failures = []
    for launch in launches:
        name, options = launch["name"], launch["options"]
        source = ASTSource(fn=getattr(kernels, name), signature=launch["signature"],
                           constexprs=launch["constexprs"])
        try:
            compiled = triton.compile(source, target=HOPPER, options=options)
        except Exception as error:  # noqa: BLE001 - collect every kernel's failure, then report
            failures.append(f"{name} {options}: {type(error).__name__}: {str(error)[-600:]}")
            continue
        if compiled.metadata.shared > SHARED_MEMORY_LIMIT:
            failures.append(f"{name} {options}: {compiled.metadata.shared} bytes of shared memory")
    return failures


def test_every_launch_compiles_for_hopper(launches):
    # compiling takes seconds a kernel: one worker process per core, each with its share of the jobs
    n_workers = max(1, min(4, len(os.sched_getaffinity(0))))
    worker = ("import json, sys, test_kernel_compile as t; "
              "print(json.dumps(t._compile(json.load(sys.stdin))))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent, env=env)
             for _ in range(n_workers)]
    failures = []
    results = [p.communicate(json.dumps(launches[i::n_workers]), timeout=1800) for i, p in enumerate(procs)]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        failures += json.loads(out.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
