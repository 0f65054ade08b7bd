"""Captured decoding: the decoding step that a CUDA graph replays, and the Decoder around it.

One step implementation serves eager and captured decoding, so the CPU tests below run the very
code a graph captures: it equals the parallel forward for every preset (prompts shorter and longer
than the window, the router's reach and NSA's block, odd lengths, GQA), it does the same work with
the same shapes at every position, reads nothing back to the host, and writes its state in place.
The tests marked "CUDA" capture and replay it on a GPU (skipped without one): captured == eager
for every preset with and without Triton, no host sync during replay, prompts up to max_len.

Tolerances as in test_tiny_hybrid.py: float32 throughout, decoding and the parallel forward differ
by summation order only, so atol = rtol = 1e-5 fails only on a real mistake.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import checks
import tiny_hybrid as th
from decoder import Decoder
from tiny_hybrid import PRESETS, Config, TinyHybrid

ROOT = Path(__file__).resolve().parent
TOL = dict(atol=1e-5, rtol=1e-5)
CUDA = torch.cuda.is_available()


def needs_cuda(test):
    """A test of capture and replay on a GPU: marked `gpu`, skipped without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU; the CPU tests "
                                                                "run the same step eagerly")(test))


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread runs their many small ops fastest, and a second core busy
    with something else cannot slow them down (two threads then wait for each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(preset: str, **overrides) -> Config:
    """Window 8 (9 keys), LTE reach 6 with 2 sinks and 3 buffer slots, NSA blocks of 4 with 3 selected."""
    base = dict(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, window=8,
                lte_sink=2, lte_buffer=3, nsa_block=4, nsa_topn=3, gdn_chunk_size=8)
    base.update(overrides)
    return Config.preset(preset, **base)


TRITON_SIZES = dict(head_dim=16, gdn_chunk_size=16)   # what the kernels take (chunks of 16..64)


def small_model(preset: str, device="cpu", **overrides) -> TinyHybrid:
    torch.manual_seed(0)
    model = TinyHybrid(small_config(preset, **overrides)).to(device).eval()
    for mixer in model.modules():                       # LTE scores of both signs: drops, evictions
        if isinstance(mixer, th.LTERouter):
            mixer.proj.bias.data.fill_(0.0)
    return model


def decode_logits(decoder: Decoder, idx, prompt: int):
    """Logits of idx [B, T]: idx[:, :prompt] prefilled, then one token a step: [B, T, vocab]."""
    parts = [decoder.prefill(idx[:, :prompt])]
    parts += [decoder.step(idx[:, t: t + 1])[:, None] for t in range(prompt, idx.shape[1])]
    return torch.cat(parts, dim=1)


# =============================================================================================
# CPU: the static step, run eagerly, equals the parallel forward
# =============================================================================================

GQA = {"G=2": dict(n_kv_head=2), "G=4": dict(n_kv_head=1), "MHA": dict(n_kv_head=4, key_conv=3)}
T = 29                                                  # odd; window 8, reach 6, NSA block 4
PROMPTS = [1, 3, 7, 9, 13, 28]                          # < reach (6), < w + 1 (9), = w + 1, past it; blocks of 4


@pytest.mark.parametrize("gqa", list(GQA))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_static_step_equals_the_parallel_forward(preset, gqa):
    model = small_model(preset, **GQA[gqa])
    idx = torch.randint(0, 61, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
    for slack in (0, 5):                                # a cache exactly full, and one with room left
        decoder = Decoder(model, 2, T + slack, cuda_graph=False)
        for prompt in PROMPTS:
            torch.testing.assert_close(decode_logits(decoder, idx, prompt), full, **TOL,
                                       msg=lambda m: f"prompt {prompt}, max_len {T + slack}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["gdn+swa", "gdn+lte", "gdn+nsa", "transformer"])
def test_static_step_through_the_triton_kernels_equals_the_parallel_reference(preset, kernel_device, exact_float32):
    """use_triton: attention_decode and GDN's recurrent step are the kernels (in Triton's
    interpreter without a GPU), with the device-side positions and validity masks of the static
    step, run eagerly, where the kernels run."""
    device = kernel_device
    reference = small_model(preset, device, **TRITON_SIZES)
    fast = small_model(preset, device, use_triton=True, **TRITON_SIZES)
    fast.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        full, _ = reference(idx)
    torch.testing.assert_close(decode_logits(Decoder(fast, 2, 21, cuda_graph=False), idx, 5), full,
                               atol=1e-4, rtol=1e-4)


def test_lte_scores_near_the_start_equal_the_routers_over_the_whole_sequence():
    """Token j is scored when token j + reach arrives, from the 2 reach + 1 router inputs around it
    in the router ring; for j < reach some of them lie before position 0, where the router's
    one-token form must pad, in every layer, as the router does over the whole sequence. Every
    score equals the parallel router's."""
    model = small_model("gdn+lte")
    lte = model.blocks[1].mixer
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = model.blocks[1].norm1(model.blocks[0](model.wte(idx))[0])
        _, _, v, k_raw = lte._qkv(x)
        want = lte.router(k_raw, v)                                            # [B, T, Hkv]
        decoder = Decoder(model, 2, 16, cuda_graph=False)
        decoder.prefill(idx[:, :1])
        reach, slots = lte.router.reach, lte.window + 1
        for t in range(1, 16):
            decoder.step(idx[:, t: t + 1])
            j = t - reach
            if j >= 0:
                torch.testing.assert_close(decoder.state[1]["score"][:, j % slots], want[:, j], atol=1e-6, rtol=1e-6)


ROUTER_CONVS = {"paper": ((3, 3, 3), (2, 2, 2)), "mixed": ((3, 5, 1), (1, 2, 3)), "one layer": ((5,), (3,)),
                "kernel 1": ((1,), (1,))}


@pytest.mark.parametrize("product_limit", [1 << 30, 0], ids=["multiply-sum", "matmul"])
@pytest.mark.parametrize("convs", list(ROUTER_CONVS))
def test_router_one_token_form_equals_its_forward(convs, product_limit, monkeypatch):
    """LTERouter.score_one, in either form a decoding step runs (a fused multiply-sum for few
    sequences, a batched matmul for many: LTERouter.PRODUCT_LIMIT), gives forward's score of token j
    from the 2 reach + 1 inputs around it, for every j whose right context exists, the ones near
    the start included: whatever the inputs before position 0 hold, they count as the padding
    (they are filled with noise here). Non-zero biases, so that padding only the router's input
    and not its inner layers would show."""
    monkeypatch.setattr(th.LTERouter, "PRODUCT_LIMIT", product_limit)
    kernel_sizes, dilations = ROUTER_CONVS[convs]
    torch.manual_seed(0)
    router = th.LTERouter(3, 4, kernel_sizes, dilations).eval()
    reach = router.reach
    B, T = 2, 3 * reach + 4
    k, v = torch.randn(B, T, 3, 4), torch.randn(B, T, 3, 4)
    with torch.no_grad():
        want = router(k, v)                                                    # [B, T, Hkv]
        x = torch.cat([torch.randn(B, reach, 3, 8), torch.cat([k, v], dim=-1)], dim=1)   # noise before position 0
        for j in range(T - reach):
            window = x[:, j: j + 2 * reach + 1]                                # positions j - reach .. j + reach
            got = router.score_one(window, j if j % 2 else torch.tensor(j))   # an int or a 0-d tensor
            torch.testing.assert_close(got, want[:, j], atol=1e-6, rtol=1e-6, msg=lambda m: f"j = {j}: {m}")


def test_router_one_token_form_takes_exactly_one_tokens_window():
    router = th.LTERouter(2, 4)                                                # reach 6: 13 inputs
    with pytest.raises(ValueError, match=r"x must be \[B, 2 reach \+ 1, Hkv, 2D\] = \[B, 13, 2, 8\].*\(2, 14, 2, 8\)"):
        router.score_one(torch.randn(2, 14, 2, 8), 20)
    with pytest.raises(ValueError, match="x must have 4 dims"):
        router.score_one(torch.randn(13, 2, 8), 20)


def test_a_decoder_serves_one_sequence_after_another():
    """prefill empties the state in place (the captured step keeps its tensors): a second prompt
    decodes exactly as in a fresh decoder, for every mixer's state."""
    for preset in sorted(PRESETS):
        model = small_model(preset)
        first, second = (torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(s)) for s in (4, 5))
        used = Decoder(model, 2, 20, cuda_graph=False)
        decode_logits(used, first, 11)
        fresh = Decoder(model, 2, 20, cuda_graph=False)
        torch.testing.assert_close(decode_logits(used, second, 3), decode_logits(fresh, second, 3),
                                   rtol=0, atol=0, msg=preset)


def test_eager_forward_and_decoder_steps_can_take_turns():
    """The Decoder counts its length in each layer's state, as forward does, so
    model(token, state=decoder.state) may continue where the decoder stopped, and the other way round."""
    model = small_model("gdn+nsa")
    idx = torch.randint(0, 61, (2, 18), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full, _ = model(idx)
        decoder = Decoder(model, 2, 18, cuda_graph=False)
        parts = [decoder.prefill(idx[:, :5])]
        for t in range(5, 18):
            if t % 2:
                parts.append(decoder.step(idx[:, t: t + 1])[:, None])
            else:
                parts.append(model(idx[:, t: t + 1], state=decoder.state)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)


# =============================================================================================
# CPU: what a CUDA graph needs from the step
# =============================================================================================

HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
              "equal", "is_nonzero"}


class OpLog(TorchDispatchMode):
    """Every ATen op run inside, with the shapes and dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        flat += [a for arg in args if isinstance(arg, (list, tuple)) for a in arg if isinstance(a, torch.Tensor)]
        self.ops.append((func.__name__.split(".")[0], tuple((tuple(a.shape), a.dtype) for a in flat)))
        return func(*args, **(kwargs or {}))


def _tensors(state):
    return {(i, key): (value.data_ptr(), value.shape, value.dtype)
            for i, layer in enumerate(state) for key, value in layer.items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_step_does_the_same_work_in_place_without_reading_the_device(preset, monkeypatch):
    """A CUDA graph replays the ops and shapes it captured, on the tensors it captured. So the step
    must run the same ops on the same shapes at every position (before and after tokens leave the
    window, before and after the router's first score, across NSA's block boundaries), write its
    state in place (no tensor replaced, no host value changed), and never read device data back
    (no .item(), bool(), nonzero: a sync on a GPU). attention_decode's check that a query sees a
    slot reads the device, and skips itself while a graph captures: so it is told that one does."""
    monkeypatch.setattr(checks, "capturing_cuda_graph", lambda t: True)
    model = small_model(preset)
    decoder = Decoder(model, 2, 40, cuda_graph=False)
    with torch.no_grad():
        decoder.prefill(torch.randint(0, 61, (2, 1)))
        token = torch.zeros(2, 1, dtype=torch.long)
        before = _tensors(decoder.state)
        hosts = [{k: v for k, v in layer.items() if not isinstance(v, torch.Tensor)} for layer in decoder.state]
        logs = []
        for t in range(1, 30):
            with OpLog() as log:
                model.decode_step(token, decoder.state)
            logs.append(log.ops)
            assert [int(layer["pos"]) for layer in decoder.state] == [t + 1] * len(decoder.state)
    assert logs[0], "the step ran no op at all?"
    for t, ops in enumerate(logs[1:], start=2):
        assert ops == logs[0], f"the step at position {t} differs from the one at position 1"
    assert not {name for name, _ in logs[0]} & HOST_READS
    assert _tensors(decoder.state) == before
    assert [{k: v for k, v in layer.items() if not isinstance(v, torch.Tensor)} for layer in decoder.state] == hosts


@pytest.mark.parametrize("preset", ["gdn", "gdn+swa", "gdn+lte", "transformer"])
def test_a_decoding_step_runs_one_matmul_per_weight_matrix_and_no_convolution(preset):
    """What a captured step costs is about the sum of its kernels, so each mixer projects its input
    once (GDN: q, k, v, beta, alpha, gate; attention: q, k, v), SwiGLU its gate and up at once, and
    the LTE router and GDN's short convs run without convolution or matmul launches of their own
    (written-out multiply-sums, which torch.compile fuses). Per layer: the input and output
    projections and SwiGLU's two, plus the output head; and two batched products per mixer (GDN's
    read-out and state update, attention's scores and weighted sum)."""
    model = small_model(preset)
    decoder = Decoder(model, 2, 40, cuda_graph=False)
    with torch.no_grad():
        decoder.prefill(torch.randint(0, 61, (2, 3)))
        with OpLog() as log:
            model.decode_step(torch.zeros(2, 1, dtype=torch.long), decoder.state)
    names = [name for name, _ in log.ops]
    layers = model.config.layers
    assert names.count("mm") + names.count("addmm") == 4 * len(layers) + 1
    assert names.count("convolution") == 0
    assert names.count("bmm") == 2 * len(layers)


def test_sampling_draws_what_torch_multinomial_draws():
    """generate samples without torch.multinomial (its input checks wait for the GPU) by the same
    method, so the same generator gives the same tokens."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        got = TinyHybrid.sample(logits, 0.8, 10, torch.Generator().manual_seed(seed))
        scaled = logits / 0.8
        scaled = scaled.masked_fill(scaled < scaled.topk(10, dim=-1).values[:, -1:], float("-inf"))
        want = torch.multinomial(scaled.softmax(dim=-1), 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)


@pytest.mark.parametrize("preset", ["gdn+lte", "gdn+attn"])
def test_generate_through_the_decoder_equals_repeated_full_forward(preset):
    model = small_model(preset)
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(7))
    out = Decoder(model, 2, 25, cuda_graph=False).generate(prompt, 16, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(16):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


# =============================================================================================
# CPU: what does not fit, or is not a token, is refused before any work
# =============================================================================================

def refused(model, call, error, match):
    """call() raises `error` matching `match`, and the embedding never ran."""
    ran = []
    hook = model.wte.register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        with pytest.raises(error, match=match):
            call()
    finally:
        hook.remove()
    assert not ran


@pytest.mark.parametrize("preset", ["gdn", "gdn+attn", "gdn+nsa"])
def test_what_does_not_fit_in_max_len_is_refused_before_any_work(preset):
    model = small_model(preset)
    decoder = Decoder(model, 1, 10, cuda_graph=False)
    refused(model, lambda: decoder.prefill(torch.zeros(1, 11, dtype=torch.long)), ValueError,
            r"prompt \(11 tokens\) plus max_new_tokens \(0\) must fit in the decoder's max_len = 10")
    refused(model, lambda: decoder.generate(torch.zeros(1, 6, dtype=torch.long), 5), ValueError,
            r"prompt \(6 tokens\) plus max_new_tokens \(5\) must fit in the decoder's max_len = 10")
    refused(model, lambda: Decoder(model, 1, 10, cuda_graph=False).step(torch.zeros(1, 1, dtype=torch.long)),
            ValueError, r"call prefill\(idx\) first")
    decoder.prefill(torch.zeros(1, 10, dtype=torch.long))          # a prompt of exactly max_len fits
    refused(model, lambda: decoder.step(torch.zeros(1, 1, dtype=torch.long)), ValueError,
            "max_len = 10 tokens and is full")
    assert decoder.length == 10 and all(int(layer["pos"]) == 10 for layer in decoder.state)


def test_a_preallocated_cache_refuses_overflow_before_any_layer_changes():
    """model(idx, state) with init_state(max_len=...): the check runs before the first layer (GDN,
    whose state has no size limit) writes, so a refused call leaves the state as it was."""
    model = small_model("gdn+attn")
    state = model.init_state(1, max_len=8)
    model(torch.zeros(1, 6, dtype=torch.long), state=state)
    held = [{k: v.clone() for k, v in layer.items() if isinstance(v, torch.Tensor)} for layer in state]
    refused(model, lambda: model(torch.zeros(1, 3, dtype=torch.long), state=state), ValueError,
            r"max_len = 8 tokens \(set by init_state\); it holds 6 and x brings 3 more")
    for layer, kept in zip(state, held):
        assert layer["length"] == 6 and all(torch.equal(layer[k], v) for k, v in kept.items())
    with pytest.raises(ValueError, match="max_len must be None"):
        model.init_state(1, max_len=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch_size=0, max_len=8), ValueError, "batch_size must be a positive int, got 0"),
    (dict(batch_size=1, max_len=0), ValueError, "max_len must be a positive int, got 0"),
    (dict(batch_size=1, max_len=True), ValueError, "max_len must be a positive int, got True"),
    (dict(batch_size=1, max_len=None), ValueError, "max_len must be a positive int, got None"),
    (dict(batch_size=1, max_len=8, cuda_graph="yes"), ValueError, "cuda_graph must be None"),
    (dict(batch_size=1, max_len=8, compile=1), ValueError, "compile must be True or False, got 1"),
])
def test_bad_decoder_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Decoder(small_model("gdn"), **kwargs)


def test_bad_decoder_inputs():
    model = small_model("gdn+swa")
    with pytest.raises(TypeError, match="model must be a tiny_hybrid.TinyHybrid"):
        Decoder(torch.nn.Linear(2, 2), 1, 8)
    with pytest.raises(ValueError, match="training mode"):
        Decoder(small_model("gdn").train(), 1, 8)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device, it is on cpu"):
        Decoder(model, 1, 8, cuda_graph=True)
    decoder = Decoder(model, 2, 8, cuda_graph=False)
    refused(model, lambda: decoder.prefill(torch.zeros(1, 3, dtype=torch.long)), ValueError,
            "idx has batch size 1, the decoder was made for batch_size = 2")
    refused(model, lambda: decoder.prefill(torch.full((2, 3), 61)), ValueError, r"\[0, 61\)")
    decoder.prefill(torch.zeros(2, 3, dtype=torch.long))
    for token, error, match in ((torch.zeros(2, 1), TypeError, "token must hold integer token ids"),
                                (torch.zeros(2, dtype=torch.long), ValueError, r"token must be \[batch_size, 1\]"),
                                (torch.zeros(1, 1, dtype=torch.long), ValueError, r"= \[2, 1\], got shape \(1, 1\)"),
                                (torch.full((2, 1), 61), ValueError, r"\[0, 61\)"),
                                ([[1], [2]], TypeError, "token must be a torch.Tensor")):
        refused(model, lambda: decoder.step(token), error, match)
    assert decoder.length == 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -1)


def test_bench_decode_runs_as_a_user_runs_it(tmp_path):
    """python bench.py decode on a small context: eager times, and "-" for captured on the CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # what a user has
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "decode", "--device", "cpu", "--presets", "gdn+lte",
                           "gdn+attn", "--contexts", "600", "--steps", "1", "--throughput-batch", "2", "--out",
                           str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "bench_cpu_decode.json").read_text())
    rows, throughput = results["decode"], results["decode_throughput"]
    assert [r["preset"] for r in rows] == ["gdn+lte", "gdn+attn"] and all(r["eager_ms_per_token"] > 0 for r in rows)
    assert all(r["captured_ms_per_token"] is None for r in rows)                 # no CUDA graph on the CPU
    assert all(r["batch"] == 2 and r["eager_tokens_per_s"] > 0 for r in throughput)
    assert "captured" in done.stdout and "tokens per second" in done.stdout


# =============================================================================================
# CUDA: capture, replay, no host sync
# =============================================================================================

# exact_float32 (conftest.py): float32 without TF32 (cuDNN's convolutions use it by default), so
# that eager, captured and the parallel forward are compared at float32 precision.

@needs_cuda
@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_captured_equals_eager_and_the_parallel_forward(preset, use_triton, exact_float32):
    if use_triton:
        pytest.importorskip("triton")
    sizes = TRITON_SIZES if use_triton else {}
    model = small_model(preset, device="cuda", use_triton=use_triton, **sizes)
    reference = small_model(preset, device="cuda", **sizes)
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, 61, (2, 41), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    captured = Decoder(model, 2, 41)
    assert captured.graph is not None                   # on CUDA a decoder captures by default
    eager = Decoder(model, 2, 41, cuda_graph=False)
    with torch.no_grad():
        full, _ = reference(idx)                       # the parallel forward of the PyTorch ops
    for prompt in (1, 11):
        got, want = decode_logits(captured, idx, prompt), decode_logits(eager, idx, prompt)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    prompt = idx[:, :11]
    tokens = captured.generate(prompt, 30, temperature=0)
    assert torch.equal(tokens, eager.generate(prompt, 30, temperature=0))
    assert torch.equal(tokens, model.generate(prompt, 30, temperature=0))          # eager, the same step


@needs_cuda
@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_replaying_never_waits_for_the_device(preset, use_triton):
    """Sampling and the replayed step, token after token, under sync debug mode "error": any host
    sync raises."""
    if use_triton:
        pytest.importorskip("triton")
    model = small_model(preset, device="cuda", use_triton=use_triton, **(TRITON_SIZES if use_triton else {}))
    decoder = Decoder(model, 2, 40)
    generator = torch.Generator("cuda").manual_seed(0)
    logits = decoder.prefill(torch.randint(0, 61, (2, 7), device="cuda"))[:, -1]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(30):
            token = TinyHybrid.sample(logits.float(), 1.0 if t % 2 else 0.0, 5, generator)
            logits = decoder.step(token)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert decoder.length == 37 and torch.isfinite(logits).all()


@needs_cuda
@pytest.mark.parametrize("preset", ["gdn+lte", "gdn+nsa", "gdn+attn"])
def test_prompts_up_to_max_len_on_cuda(preset, exact_float32):
    model = small_model(preset, device="cuda")
    idx = torch.randint(0, 61, (1, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    decoder = Decoder(model, 1, 24)
    with torch.no_grad():
        full, _ = model(idx)
    torch.testing.assert_close(decoder.prefill(idx), full, **TOL)                  # exactly max_len
    with pytest.raises(ValueError, match="is full"):
        decoder.step(idx[:, -1:])
    torch.testing.assert_close(decode_logits(decoder, idx, 23), full, atol=1e-4, rtol=1e-4)   # one step left
    refused(model, lambda: decoder.prefill(torch.zeros(1, 25, dtype=torch.long, device="cuda")), ValueError,
            "max_len = 24")
    refused(model, lambda: decoder.generate(idx, 1), ValueError, "max_len = 24")
    refused(model, lambda: decoder.step(torch.zeros(1, 1, dtype=torch.long)), ValueError,
            "token is on cpu, the model on cuda")


@needs_cuda
@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("preset", ["gdn", "gdn+swa", "gdn+lte", "gdn+nsa"])
def test_compiled_and_captured_equals_eager(preset, use_triton, exact_float32):
    """torch.compile fuses the step before capture: the same logits up to float32 reordering
    (fused reductions sum in another order), the same greedy tokens. With use_triton the kernels
    run between the fused pieces, and the eager step runs the same kernels."""
    model = small_model(preset, device="cuda", use_triton=use_triton, **(TRITON_SIZES if use_triton else {}))
    idx = torch.randint(0, 61, (2, 41), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    compiled = Decoder(model, 2, 41, compile=True)
    eager = Decoder(model, 2, 41, cuda_graph=False)
    torch.testing.assert_close(decode_logits(compiled, idx, 11), decode_logits(eager, idx, 11), atol=1e-4, rtol=1e-4)
    prompt = idx[:, :11]
    assert torch.equal(compiled.generate(prompt, 30, temperature=0), eager.generate(prompt, 30, temperature=0))
