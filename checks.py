"""Input checks: every public entry point of tiny_hybrid.py, kernels.py and decoder.py names the
argument, the value and what is allowed, before any work (ValueError, or TypeError for a wrong
type). One place for them, so that the reference ops and their Triton twins reject alike and the
model files read as the paper. Imports only torch.
"""

from __future__ import annotations

import math
import numbers

import torch


# --- single values ----------------------------------------------------------------------------

def check_tensor(name: str, x, ndim: int, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, low: int, note: str = "") -> None:
    """A size or count: an int (not a bool) >= low."""
    if not is_int(value) or value < low:
        allowed = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {allowed}{note}, got {value!r}")


def check_real(name: str, value, ok, allowed: str) -> None:
    """A rate or scale: a finite real number (not a bool) for which ok(value) holds."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


# --- the ops (kernels.py runs the same checks on its twins) ------------------------------------

def check_gdn(q, k, v, g, beta, initial_state) -> None:
    """Argument checks of the Gated DeltaNet ops."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
    check_tensor("g", g, 3)
    check_tensor("beta", beta, 3)
    B, T, H, K = k.shape
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got {tuple(x.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4)
        if initial_state.shape != (B, H, K, v.shape[3]):
            raise ValueError(f"initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[3]}], "
                             f"got {tuple(initial_state.shape)}")


def check_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, T, H, D], k/v [B, T, Hkv, D] with H % Hkv == 0."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, T and D")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def check_window(window) -> None:
    if window is not None and (not is_int(window) or window < 0):
        raise ValueError(f"window must be None or an int >= 0, got {window!r}")


def check_attention(q, k, v, window, keep) -> None:
    """Argument checks of `attention`, shared with its Triton twin so both reject alike."""
    check_gqa(q, k, v)
    check_window(window)
    if keep is not None and window is None:
        raise ValueError("keep only makes sense with a window (full attention already sees every key)")
    if keep is not None:
        check_keep(keep, q.shape[0], q.shape[1], k.shape[2])


def check_keep(keep, B: int, T: int, Hkv: int) -> None:
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep must be None or a tensor, got {type(keep).__name__}")
    if keep.shape != (B, T, Hkv):
        raise ValueError(f"keep must be [B, T, Hkv] = [{B}, {T}, {Hkv}], got {tuple(keep.shape)}")
    if keep.dtype != torch.bool and (keep.is_floating_point() or keep.is_complex()):
        raise TypeError(f"keep must be bool (kept forever) or integer (visible until), got {keep.dtype}")


def check_decode(q, k_cache, v_cache, valid) -> None:
    """Argument checks of `attention_decode`, shared with its Triton twin."""
    check_tensor("q", q, 3)
    check_tensor("k_cache", k_cache, 4)
    check_tensor("v_cache", v_cache, 4)
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != (B, S, Hkv, D) or v_cache.shape != k_cache.shape or Hkv == 0 or H % Hkv:
        raise ValueError(f"k_cache and v_cache must be [B, S, Hkv, D] with H % Hkv == 0; got q "
                         f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.shape != (B, S, Hkv)
                              or valid.dtype != torch.bool):
        got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be bool [B, S, Hkv] = [{B}, {S}, {Hkv}], got {got}")
    check_decode_sees_a_slot(valid, B, S, H)


def check_decode_sees_a_slot(valid, B: int, S: int, H: int) -> None:
    """Every query must see at least one slot: softmax over no key at all is 0 / 0 = NaN.

    Reading `valid` is data-dependent: on CUDA it becomes a device-side assert (no host wait), and
    it is skipped while a CUDA graph is being captured; the mixers' own decoding always holds the
    current token, so they never trip it."""
    if B * H == 0:                                     # no query at all: nothing to attend to
        return
    if valid is None:
        if S == 0:
            raise ValueError("k_cache has no slots (S = 0): the query would attend to nothing")
        return
    if capturing_cuda_graph(valid):
        return
    sees = valid.any(dim=1)                                                     # [B, Hkv]
    if assert_on_device(sees.all(), "valid has a batch row and KV head with no True slot: "
                                     "softmax over no key is NaN"):
        return
    if not bool(sees.all()):
        b, h = (int(i) for i in (~sees).nonzero()[0])
        raise ValueError(f"valid has no True slot for batch row {b}, KV head {h}: its queries would "
                         f"attend to nothing (softmax over no key is NaN); each needs at least one valid slot")


def assert_on_device(ok: torch.Tensor, message: str) -> bool:
    """A check of tensor VALUES, without making the host wait for the device.

    On the CPU this returns False and the caller raises its ValueError with the details. On a GPU,
    reading a value back would stall the host until the device has finished all queued work, in
    every training step; there the check is queued as a device-side assert instead (returns True):
    a violation stops the process at a later CUDA call with `message`, as PyTorch's own embedding
    does for an out-of-range id."""
    if not ok.is_cuda:
        return False
    torch._assert_async(ok, message)
    return True


def capturing_cuda_graph(t: torch.Tensor) -> bool:
    """True while a CUDA graph captures work on t's device (then no host may read device data)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_nsa_selection(top_n, n_recent) -> None:
    if top_n < n_recent + 1:
        raise ValueError(f"top_n ({top_n}) must be at least n_recent + 1 = {n_recent + 1}: "
                         f"the first and the recent blocks are always selected")


def check_lte_rule(scores, window, sink, buffer) -> None:
    """Argument checks of `lte_visible_until`, shared with its Triton twin so both reject alike."""
    check_tensor("scores", scores, 3)
    if scores.shape[0] < 1 or scores.shape[1] < 1 or scores.shape[2] < 1:
        raise ValueError(f"scores must be [B, T, Hkv] with every size >= 1, got {tuple(scores.shape)}")
    for name, value in (("window", window), ("sink", sink), ("buffer", buffer)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def check_router_convs(kernel_sizes, dilations) -> None:
    """The router's convolutions: one dilation per kernel; odd kernels, so that 'same' padding
    centres each score on its token."""
    if len(kernel_sizes) != len(dilations) or not kernel_sizes:
        raise ValueError(f"lte_kernel_sizes {kernel_sizes} and lte_dilations {dilations} must be "
                         f"non-empty and of the same length")
    if any(k < 1 or k % 2 == 0 for k in kernel_sizes) or any(d < 1 for d in dilations):
        raise ValueError(f"lte_kernel_sizes must be odd and >= 1 ('same' padding), dilations >= 1; "
                         f"got {kernel_sizes}, {dilations}")


def check_router_window(x, reach: int, n_kv_head: int, channels: int) -> None:
    """LTERouter.score_one's input: [B, 2 reach + 1, Hkv, 2D], a token and its reach neighbours
    on each side (a longer window would score another token without a word)."""
    check_tensor("x", x, 4)
    if tuple(x.shape[1:]) != (2 * reach + 1, n_kv_head, channels):
        raise ValueError(f"x must be [B, 2 reach + 1, Hkv, 2D] = [B, {2 * reach + 1}, {n_kv_head}, {channels}] "
                         f"(token j and its {reach} neighbours on each side), got shape {tuple(x.shape)}")


# --- mixers, model, sampling ---------------------------------------------------------------------

def check_mixer_input(x, d_model: int) -> None:
    """What every mixer takes: a floating tensor x [B, T, C] with B >= 1, T >= 1 and C = d_model."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, T, C], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] != d_model:
        raise ValueError(f"x must be [B, T, C] with B >= 1, T >= 1 and C = d_model = {d_model}, "
                         f"got shape {tuple(x.shape)}")


def check_idx(idx, vocab_size: int, check_range: bool = True) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if idx.ndim != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"idx must be [B, T] with B >= 1 and T >= 1, got shape {tuple(idx.shape)}")
    if not check_range:
        return
    in_range = (idx >= 0) & (idx < vocab_size)
    if assert_on_device(in_range.all(), f"token ids must be in [0, {vocab_size})"):
        return
    if not bool(in_range.all()):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")


def check_targets(targets, idx, vocab_size: int) -> None:
    """targets: integer ids shaped like idx, each in [0, vocab) or -100 (no loss there), and at
    least one that is not -100 (a mean over no target is 0 / 0 = NaN)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must hold integer token ids (or -100), got dtype {targets.dtype}")
    if targets.shape != idx.shape:
        raise ValueError(f"targets must be shaped like idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
    ignored = targets == -100
    out_of_range = ~ignored & ((targets < 0) | (targets >= vocab_size))
    in_range_msg = f"targets must be in [0, {vocab_size}) or -100 (ignored)"
    some_msg = "targets must not be all -100 (ignored): the loss would be NaN"
    if (assert_on_device(~out_of_range.any(), in_range_msg) and
            assert_on_device((~ignored).any(), some_msg)):
        return
    n_bad, n_real = torch.stack([out_of_range.sum(), (~ignored).sum()]).tolist()
    if n_bad:
        bad = int(targets[out_of_range][0])
        raise ValueError(f"targets must be in [0, {vocab_size}) or -100 (ignored), got {n_bad} "
                         f"value(s) outside, e.g. {bad}")
    if n_real == 0:
        raise ValueError("targets are all -100 (ignored): there is nothing to learn from, the loss would be NaN")


def check_state(state, n_layers: int, batch_size: int) -> None:
    """A decoding state from TinyHybrid.init_state, for this model and batch size."""
    if len(state) != n_layers:
        raise ValueError(f"state must come from init_state ({n_layers} layers), got {len(state)}")
    held = next((t.shape[0] for t in state[0].values() if isinstance(t, torch.Tensor)), batch_size)
    if held != batch_size:
        raise ValueError(f"state was made for batch size {held}, idx has batch size {batch_size}")


def check_sampling(max_new_tokens, temperature, top_k) -> None:
    check_int("max_new_tokens", max_new_tokens, low=0)
    check_real("temperature", temperature, lambda x: x >= 0, ">= 0 (0: greedy)")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def check_max_len(max_len) -> None:
    """init_state's max_len: None (a cache that grows) or the most tokens a state will take."""
    if max_len is not None and (not is_int(max_len) or max_len < 1):
        raise ValueError(f"max_len must be None (a cache that grows) or an int >= 1, got {max_len!r}")


def check_room(state: dict, T: int) -> None:
    """A cache preallocated to max_len (full attention, NSA) refuses what would not fit."""
    max_len = state.get("max_len")
    if max_len is not None and state["length"] + T > max_len:
        raise ValueError(f"the decoding state holds at most max_len = {max_len} tokens (set by init_state); "
                         f"it holds {state['length']} and x brings {T} more")


def check_eviction(policy, policies, sink, window, buffer) -> None:
    """Arguments of `EvictingAttention` and `with_eviction`; policies: the names allowed."""
    if policy not in policies:
        raise ValueError(f"policy must be one of {policies}, got {policy!r}")
    for name, value in (("sink", sink), ("window", window), ("buffer", buffer)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if policy == "streaming" and buffer != 0:
        raise ValueError(f"policy 'streaming' keeps no buffer: buffer must be 0, got {buffer!r} "
                         f"(at equal memory, give its slots to the window: window = w + b)")


# --- Config -----------------------------------------------------------------------------------

def check_preset(name, overrides, presets) -> None:
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(presets)}")
    if "layers" in overrides:
        raise ValueError("a preset sets layers itself; build Config(layers=...) directly instead")


def check_config(config, mixer_names) -> None:
    """Every field of a Config as given (before its 0-means-default sizes are filled in, so that a
    negative one is reported as itself), then the rules between fields. mixer_names: the names
    `layers` may hold. Errors name the field, the value and what is allowed."""
    check_config_fields(config)
    check_config_tuples(config, mixer_names)
    check_config_relations(config, mixer_names)


def check_config_fields(c) -> None:
    """Every number and switch on its own: type, range, finite."""
    for name in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "gdn_conv_size",
                 "gdn_chunk_size", "nsa_block", "nsa_topn"):
        check_int(name, getattr(c, name), low=1)
    for name in ("mlp_hidden", "gdn_heads", "gdn_head_dim", "gdn_value_dim"):
        check_int(name, getattr(c, name), low=0, note=" (0: the default)")
    for name in ("window", "lte_sink", "lte_buffer", "lte_lambda_every", "nsa_recent", "key_conv"):
        check_int(name, getattr(c, name), low=0)
    if c.nsa_window is not None and (not is_int(c.nsa_window) or c.nsa_window < 0):
        raise ValueError(f"nsa_window must be None or an int >= 0, got {c.nsa_window!r}")
    for name in ("lte_train_cap", "use_triton"):
        check_bool(name, getattr(c, name))
    # base <= 1 has no slow frequencies (base -> 0 even overflows the angles to inf: NaN losses)
    check_real("rope_base", c.rope_base, lambda x: x > 1, "> 1")
    check_real("lte_dropout", c.lte_dropout, lambda x: 0 <= x < 1, "in [0, 1)")
    check_real("lte_router_lr_scale", c.lte_router_lr_scale, lambda x: x >= 0, ">= 0 (0 freezes the router)")
    check_real("lte_lambda_init", c.lte_lambda_init, lambda x: x >= 0,
               ">= 0 (a negative penalty would reward keeping)")
    check_real("lte_lambda_min", c.lte_lambda_min, lambda x: x > 0,
               "> 0 (from 0 the controller could never grow lambda again)")
    check_real("lte_lambda_max", c.lte_lambda_max, lambda x: x > 0, "> 0")
    # update_lambda multiplies by up when a head keeps too many tokens and divides by down when
    # it keeps too few: a factor below 1 would push lambda the wrong way
    check_real("lte_lambda_up", c.lte_lambda_up, lambda x: x >= 1,
               ">= 1 (lambda *= up when a head keeps more than lte_buffer tokens)")
    check_real("lte_lambda_down", c.lte_lambda_down, lambda x: x >= 1,
               ">= 1 (lambda /= down when a head keeps fewer than 0.95 lte_buffer)")


def check_config_tuples(c, mixer_names) -> None:
    """layers: mixer names; the router's kernel sizes (odd, for 'same' padding) and dilations."""
    if not isinstance(c.layers, (tuple, list)) or not all(isinstance(m, str) for m in c.layers):
        raise ValueError(f"layers must be a tuple of mixer names (from {sorted(mixer_names)}) or () for all "
                         f"'gdn', got {c.layers!r}")
    for name in ("lte_kernel_sizes", "lte_dilations"):
        value = getattr(c, name)
        if not isinstance(value, (tuple, list)) or not value or not all(is_int(v) and v >= 1 for v in value):
            raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value!r}")
    if any(k % 2 == 0 for k in c.lte_kernel_sizes):
        raise ValueError(f"lte_kernel_sizes must be odd ('same' padding centres the router on its token), "
                         f"got {c.lte_kernel_sizes!r}")
    if len(c.lte_kernel_sizes) != len(c.lte_dilations):
        raise ValueError(f"lte_kernel_sizes {c.lte_kernel_sizes!r} and lte_dilations {c.lte_dilations!r} "
                         f"must have the same length (one dilation per conv layer)")


def check_config_relations(c, mixer_names) -> None:
    """Rules between fields."""
    low, high = c.lte_lambda_min, c.lte_lambda_max
    if low > high:
        raise ValueError(f"need lte_lambda_min <= lte_lambda_max, got lte_lambda_min={low!r}, "
                         f"lte_lambda_max={high!r}")
    if c.lte_lambda_every and not low <= c.lte_lambda_init <= high:
        raise ValueError(f"lte_lambda_init must lie in [lte_lambda_min, lte_lambda_max] = [{low!r}, {high!r}] "
                         f"while the controller runs (lte_lambda_every > 0: it clamps lambda there), got "
                         f"{c.lte_lambda_init!r}; for a fixed lambda (0: no penalty) set lte_lambda_every=0")
    if c.n_head % c.n_kv_head:
        raise ValueError(f"n_head ({c.n_head}) must be a multiple of n_kv_head ({c.n_kv_head})")
    if c.head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {c.head_dim}")
    layers = tuple(c.layers) or ("gdn",) * c.n_layer                  # () means all "gdn"
    if len(layers) != c.n_layer:
        raise ValueError(f"layers has {len(layers)} entries but n_layer is {c.n_layer}")
    unknown = [m for m in layers if m not in mixer_names]
    if unknown:
        raise ValueError(f"unknown mixer name(s) {unknown} in layers; allowed: {sorted(mixer_names)}")
    if c.nsa_topn < c.nsa_recent + 1:
        raise ValueError(f"nsa_topn ({c.nsa_topn}) must be >= nsa_recent + 1 = {c.nsa_recent + 1}")
    # the router's reach, as tiny_hybrid.LTERouter counts it: sum of d (k - 1) / 2 over its convolutions
    reach = sum(d * (k - 1) // 2 for k, d in zip(c.lte_kernel_sizes, c.lte_dilations))
    if "lte" in layers and reach > c.window:
        raise ValueError(f"window ({c.window}) must be >= the LTE router's reach ({reach} tokens each side): "
                         f"a token's score must be known before it leaves the window, or the mask would "
                         f"depend on the future")


# --- decoding with a Decoder (decoder.py) ------------------------------------------------------

def check_decoder(model, model_class, batch_size, max_len, cuda_graph, compile) -> None:
    """Decoder(model, batch_size, max_len, cuda_graph, compile): a model_class (TinyHybrid) in eval
    mode, sizes >= 1, a CUDA graph only on a CUDA device."""
    if not isinstance(model, model_class):
        raise TypeError(f"model must be a tiny_hybrid.TinyHybrid, got {type(model).__name__}")
    check_int("batch_size", batch_size, low=1)
    check_int("max_len", max_len, low=1)
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be None (on CUDA devices), True or False, got {cuda_graph!r}")
    check_bool("compile", compile)
    device = model.wte.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if model.training:
        raise ValueError("the model is in training mode: call model.eval() before decoding "
                         "(a captured step would keep the training behaviour, dropout included)")


def check_prompt(decoder, idx, max_new_tokens: int) -> None:
    """A prompt [batch_size, T] on the model's device, with room for it and max_new_tokens more."""
    check_idx(idx, decoder.model.config.vocab_size)
    B, T = idx.shape
    if B != decoder.batch_size:
        raise ValueError(f"idx has batch size {B}, the decoder was made for batch_size = {decoder.batch_size}")
    if idx.device != decoder.device:
        raise ValueError(f"idx is on {idx.device}, the model on {decoder.device}")
    if T + max_new_tokens > decoder.max_len:
        raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) must fit in the "
                         f"decoder's max_len = {decoder.max_len}")
    if decoder.model.training:
        raise ValueError("the model is in training mode: call model.eval() before decoding")


def check_step_token(decoder, token) -> None:
    """One token id per sequence, [batch_size, 1], on the model's device, after a prefill, with
    room for it. Its range is checked on the CPU only: on a GPU that would wait for the device."""
    if not isinstance(token, torch.Tensor):
        raise TypeError(f"token must be a torch.Tensor of token ids, got {type(token).__name__}")
    if token.is_floating_point() or token.dtype == torch.bool or token.is_complex():
        raise TypeError(f"token must hold integer token ids, got dtype {token.dtype}")
    if token.shape != (decoder.batch_size, 1):
        raise ValueError(f"token must be [batch_size, 1] = [{decoder.batch_size}, 1], got shape {tuple(token.shape)}")
    if token.device != decoder.device:
        raise ValueError(f"token is on {token.device}, the model on {decoder.device}")
    if decoder.length == 0:
        raise ValueError("step needs a sequence to continue: call prefill(idx) first")
    if decoder.length + 1 > decoder.max_len:
        raise ValueError(f"the decoder holds max_len = {decoder.max_len} tokens and is full")
    if not token.is_cuda:
        check_idx(token, decoder.model.config.vocab_size)
