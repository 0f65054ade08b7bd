"""Bad input is refused before any work, with an error that names the argument, the value and what
is allowed: every Config field, every mixer's x, the model's idx and targets, and decoding caches
in which a query would see no key at all (softmax over nothing is NaN)."""

import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import checks
import tiny_hybrid as th
from tiny_hybrid import Config, TinyHybrid


def small_config(preset: str, **overrides) -> Config:
    base = dict(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8, window=8,
                lte_sink=2, lte_buffer=3, nsa_block=4, nsa_topn=3, gdn_chunk_size=8)
    base.update(overrides)
    return Config.preset(preset, **base)


# =============================================================================================
# Config: one bad value per field at least (type, range, NaN / inf, relations)
# =============================================================================================

NAN, INF = float("nan"), float("inf")
BAD_CONFIG = [
    ("vocab_size", 0), ("vocab_size", 2048.0),
    ("n_layer", 0),
    ("d_model", -1), ("d_model", True),
    ("n_head", 0), ("n_head", "4"),
    ("n_kv_head", 0),
    ("head_dim", 0), ("head_dim", 7),                    # RoPE rotates pairs
    ("mlp_hidden", -4),                                  # once failed deep in torch ("negative dimension")
    ("layers", "gdn"), ("layers", ("gdn", 3)), ("layers", 2),
    ("rope_base", 0), ("rope_base", -2.0), ("rope_base", 1.0), ("rope_base", NAN), ("rope_base", INF),
    ("key_conv", -1),
    ("gdn_heads", -1), ("gdn_head_dim", 1.5), ("gdn_value_dim", -4),
    ("gdn_conv_size", 0), ("gdn_chunk_size", 0),
    ("window", -1), ("window", True), ("window", None), ("window", 4),   # 4: shorter than the router's reach
    ("lte_sink", -1), ("lte_buffer", -1), ("lte_buffer", 3.0),
    ("lte_kernel_sizes", (2, 3, 3)), ("lte_kernel_sizes", ()), ("lte_kernel_sizes", (3.0,)),
    ("lte_dilations", (0, 2, 2)), ("lte_dilations", (2, 2)),           # (2, 2): one dilation short
    ("lte_dropout", 1.0), ("lte_dropout", -0.1), ("lte_dropout", NAN), ("lte_dropout", "0.1"),
    ("lte_train_cap", "yes"), ("lte_train_cap", 1),
    ("lte_router_lr_scale", -0.1), ("lte_router_lr_scale", NAN), ("lte_router_lr_scale", "0.1"),
    ("lte_lambda_init", -5.0), ("lte_lambda_init", NAN), ("lte_lambda_init", INF),
    ("lte_lambda_init", 2.0, dict(lte_lambda_every=32)),   # above lte_lambda_max while the controller runs
    ("lte_lambda_every", -1), ("lte_lambda_every", 1.5),
    ("lte_lambda_up", 0.5), ("lte_lambda_up", INF), ("lte_lambda_down", 0.5), ("lte_lambda_down", False),
    ("lte_lambda_min", 0.0), ("lte_lambda_min", -1.0),
    ("lte_lambda_max", 1e-12), ("lte_lambda_max", INF),  # 1e-12: below lte_lambda_min
    ("nsa_block", 0), ("nsa_topn", 2), ("nsa_recent", -1), ("nsa_window", -3), ("nsa_window", 2.0),
    ("use_triton", "yes"), ("use_triton", None),
]


def test_every_config_field_has_a_bad_value_below():
    """A new Config field without a check (and a case here) fails this test."""
    assert {f.name for f in dataclasses.fields(Config)} == {case[0] for case in BAD_CONFIG}


@pytest.mark.parametrize("case", BAD_CONFIG, ids=[f"{c[0]}={c[1]!r}" for c in BAD_CONFIG])
def test_bad_config_value_is_named(case):
    """One bad value (with, as a third item, the other settings that make it bad) is named."""
    name, value, *context = case
    base = dict(n_layer=2, layers=("gdn", "lte"), **(context[0] if context else {}))
    base[name] = value
    with pytest.raises(ValueError) as err:
        Config(**base)
    message = str(err.value)
    assert name in message and repr(value) in message


@pytest.mark.parametrize("preset,overrides", [
    ("gdn+swa", dict(window=0, key_conv=1, gdn_conv_size=1)),
    ("gdn+lte", dict(lte_dropout=0.0, lte_lambda_init=0.0, lte_lambda_every=0, lte_lambda_up=1.0,
                     lte_lambda_down=1, lte_lambda_min=1.0, lte_lambda_max=1.0, lte_sink=0, lte_buffer=0,
                     window=6, rope_base=500000, lte_router_lr_scale=0.0)),
    ("gdn+lte", dict(lte_lambda_init=1.0, lte_kernel_sizes=[1], lte_dilations=[1], window=0)),
    ("gdn+nsa", dict(nsa_recent=0, nsa_topn=1, nsa_window=0, use_triton=False)),
])
def test_edge_values_that_are_allowed(preset, overrides):
    """The checks do not refuse what works: boundaries of every range, a list for a tuple."""
    config = small_config(preset, **overrides)
    model = TinyHybrid(config)
    logits, penalty = model(torch.randint(0, 61, (1, 10)))
    assert torch.isfinite(logits).all() and torch.isfinite(penalty)
    assert dataclasses.replace(config) == config         # a Config rebuilt from its own fields passes
    assert isinstance(config.lte_kernel_sizes, tuple)


def test_defaults_are_filled_in_after_the_checks():
    config = Config(d_model=64, head_dim=16)
    assert (config.mlp_hidden, config.gdn_heads, config.gdn_head_dim, config.gdn_value_dim) == (192, 4, 16, 16)
    assert config.layers == ("gdn",) * 4


# =============================================================================================
# Mixers: x must be a floating [B, T, C] tensor with B, T >= 1 and C = d_model
# =============================================================================================

MIXER_KINDS = ["gdn", "swa", "attn", "nsa", "lte"]
BAD_X = {
    "2-D": (lambda: torch.randn(5, 32), ValueError),
    "wrong C": (lambda: torch.randn(1, 5, 16), ValueError),
    "B = 0": (lambda: torch.randn(0, 5, 32), ValueError),
    "T = 0": (lambda: torch.randn(1, 0, 32), ValueError),
    "4-D": (lambda: torch.randn(1, 5, 2, 16), ValueError),
    "integer": (lambda: torch.ones(1, 5, 32, dtype=torch.long), TypeError),
    "list": (lambda: [[0.0] * 32] * 5, TypeError),
}


@pytest.mark.parametrize("decoding", [False, True])
@pytest.mark.parametrize("bad", list(BAD_X))
@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_mixer_refuses_bad_x(kind, bad, decoding):
    mixer = th.MIXERS[kind](small_config("gdn+lte"))
    make_x, error = BAD_X[bad]
    x = make_x()
    state = mixer.init_state(1) if decoding else None
    with pytest.raises(error) as err:
        mixer(x, state)
    message = str(err.value)
    assert message.startswith("x must be")
    if error is ValueError:
        assert str(tuple(x.shape)) in message and "d_model = 32" in message
    if state is not None:
        assert state["pos"] == 0                         # refused before any work


# =============================================================================================
# attention_decode: a query that sees no slot is an error, not a NaN
# =============================================================================================

def decode_inputs(B=2, H=4, Hkv=2, S=6, D=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g)
    k, v = (torch.randn(B, S, Hkv, D, generator=g) for _ in range(2))
    return q, k, v, torch.ones(B, S, Hkv, dtype=torch.bool)


def test_decode_with_no_valid_slot_names_valid():
    q, k, v, valid = decode_inputs()
    valid[1, :, 0] = False                               # batch row 1, KV head 0 sees nothing
    with pytest.raises(ValueError, match=r"valid has no True slot for batch row 1, KV head 0"):
        th.attention_decode(q, k, v, valid)
    valid[1, 4, 0] = True                                # one slot is enough: finite, = that slot's value
    o = th.attention_decode(q, k, v, valid)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o[1, :2], v[1, 4, 0].expand(2, -1))   # query heads 0, 1 read KV head 0
    with pytest.raises(ValueError, match="no slots"):
        th.attention_decode(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="valid"):
        th.attention_decode(q, k[:, :0], v[:, :0], valid[:, :0])
    empty = th.attention_decode(q[:0], k[:0], v[:0], valid[:0])      # no query at all: nothing to refuse
    assert empty.shape == (0, 4, 8)


def test_triton_decode_shares_the_check():
    kernels = pytest.importorskip("kernels")
    q, k, v, valid = decode_inputs()
    valid[0, :, 1] = False
    with pytest.raises(ValueError) as want:
        th.attention_decode(q, k, v, valid)
    with pytest.raises(ValueError) as got:
        kernels.attention_decode(q, k, v, valid)
    assert str(got.value) == str(want.value)


def test_decode_check_is_skipped_only_while_a_cuda_graph_captures(monkeypatch):
    """Capturing forbids reading device data: the data-dependent part steps aside, shape checks stay."""
    q, k, v, valid = decode_inputs()
    valid[0, :, 1] = False
    assert not checks.capturing_cuda_graph(valid)        # a CPU tensor: never capturing (no CUDA needed)
    monkeypatch.setattr(checks, "capturing_cuda_graph", lambda t: True)
    o = th.attention_decode(q, k, v, valid)
    assert torch.isnan(o[0, 2:]).all()                   # what the check prevents outside a capture
    with pytest.raises(ValueError, match="valid must be bool"):
        th.attention_decode(q, k, v, valid[:, :3])


@pytest.mark.parametrize("preset,overrides", [
    ("gdn+swa", dict(window=0)),
    ("gdn+attn", {}),
    ("gdn+nsa", dict(nsa_recent=0, nsa_topn=1)),         # only block 0 is forced
    ("gdn+lte", dict(lte_sink=0, lte_buffer=0, window=6)),
    ("gdn+lte", {}),
])
def test_mixers_own_decoding_always_sees_a_slot(preset, overrides, monkeypatch):
    """Each decoding step holds the current token, so the check never fires, and the steps still
    agree with the parallel forward."""
    calls = []
    checked = th.attention_decode
    monkeypatch.setattr(th, "attention_decode", lambda *a, **kw: calls.append(1) or checked(*a, **kw))
    torch.manual_seed(0)
    model = TinyHybrid(small_config(preset, **overrides)).eval()
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        full, _ = model(idx)
        state = model.init_state(2)
        parts = [model(idx[:, :3], state=state)[0]] + [model(idx[:, t: t + 1], state=state)[0] for t in range(3, 24)]
    assert calls                                          # the steps went through the checked op
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


# =============================================================================================
# The model's idx, and the targets of a caller's loss (checks.check_targets)
# =============================================================================================

@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyHybrid(small_config("gdn+swa"))


def refuses_before_any_work(model, call, error, match):
    """call(model) raises `error` matching `match`, and the embedding never ran."""
    ran = []
    hook = model.wte.register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        with pytest.raises(error, match=match):
            call(model)
    finally:
        hook.remove()
    assert not ran


def test_targets_all_ignored_is_refused():
    idx = torch.randint(0, 61, (2, 6))
    with pytest.raises(ValueError, match="nothing to learn"):
        checks.check_targets(torch.full_like(idx, -100), idx, 61)


@pytest.mark.parametrize("make_targets,error,match", [
    (lambda idx: torch.full_like(idx, 61), ValueError, r"targets must be in \[0, 61\) or -100.*61"),
    (lambda idx: torch.full_like(idx, -1), ValueError, r"targets must be in \[0, 61\) or -100.*-1"),
    (lambda idx: idx.float(), TypeError, "targets must hold integer"),
    (lambda idx: idx.bool(), TypeError, "targets must hold integer"),
    (lambda idx: idx[:, :-1], ValueError, r"targets must be shaped like idx \(2, 6\), got \(2, 5\)"),
    (lambda idx: idx.tolist(), TypeError, "targets must be a torch.Tensor"),
])
def test_bad_targets_are_refused(make_targets, error, match):
    idx = torch.randint(0, 61, (2, 6))
    with pytest.raises(error, match=match):
        checks.check_targets(make_targets(idx), idx, 61)


def test_partly_ignored_targets_are_allowed():
    idx = torch.randint(0, 61, (2, 6))
    targets = torch.randint(0, 61, (2, 6))
    targets[0] = -100
    targets[1, :2] = -100
    checks.check_targets(targets, idx, 61)               # some targets remain: a finite mean


def test_empty_batch_and_bad_generate_arguments(model):
    refuses_before_any_work(model, lambda m: m(torch.zeros(0, 4, dtype=torch.long)), ValueError, r"B >= 1")
    prompt = torch.tensor([[1, 2]])
    for kwargs, name in ((dict(max_new_tokens=True), "max_new_tokens"), (dict(max_new_tokens=-1), "max_new_tokens"),
                         (dict(max_new_tokens=2, temperature=math.nan), "temperature"),
                         (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
                         (dict(max_new_tokens=2, top_k=True), "top_k")):
        with pytest.raises(ValueError, match=name):
            model.generate(prompt, **kwargs)


# =============================================================================================
# On a GPU: value checks without host syncs
# =============================================================================================

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("preset", ["gdn+swa", "gdn+attn", "gdn+nsa", "gdn+lte"])
@pytest.mark.parametrize("use_triton", [False, True])
def test_a_training_step_on_the_gpu_never_waits_for_the_device(preset, use_triton):
    """The value checks of idx and targets become device-side asserts on CUDA: a training forward and
    backward queue their work without a single host sync (a sync would stall a launch-bound step)."""
    torch.manual_seed(0)
    model = TinyHybrid(small_config(preset, use_triton=use_triton, gdn_chunk_size=16)).cuda()   # 16: the kernel's least
    idx = torch.randint(0, 61, (2, 24), device="cuda")

    def loss_of(idx):
        checks.check_targets(idx, idx, 61)
        logits, penalty = model(idx)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()) + penalty
    loss_of(idx).backward()                                # warm-up: first-call set-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_of(idx)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.detach()).item()


@needs_cuda
@pytest.mark.parametrize("bad,message", [
    ("idx[0, 0] = 61", r"token ids must be in \[0, 61\)"),
    ("targets[0, 1] = 70", r"targets must be in \[0, 61\) or -100"),
    ("targets[:] = -100", "targets must not be all -100"),
])
def test_bad_values_on_the_gpu_stop_with_the_message(bad, message):
    """A device-side assert ends the CUDA context, so the model runs in a fresh process."""
    script = f"""
import torch
from checks import check_targets
from test_validation import small_config
from tiny_hybrid import TinyHybrid
model = TinyHybrid(small_config("gdn+swa")).cuda()
idx = torch.randint(0, 61, (2, 6), device="cuda")
targets = idx.clone()
{bad}
check_targets(targets, idx, 61)
model(idx)
torch.cuda.synchronize()
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert run.returncode != 0
    assert re.search(message, run.stderr), run.stderr[-2000:]
