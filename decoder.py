"""Decoding at the speed of the hardware: `Decoder`, a static decoding state and one captured
CUDA graph per decoded token, for a trained `tiny_hybrid.TinyHybrid`.

tiny_hybrid.py decodes eagerly (`TinyHybrid.generate`); this file runs the very same step
(`TinyHybrid.decode_step`) captured, and optionally fused by torch.compile first.
"""

from __future__ import annotations

import torch

from checks import check_decoder, check_prompt, check_sampling, check_step_token
from tiny_hybrid import TinyHybrid


class Decoder:
    """Decoding at the speed of the hardware: a static state and one captured step per model.

        model.eval()
        decoder = Decoder(model, batch_size=1, max_len=4096)
        logits = decoder.prefill(prompt)                   # [B, T, vocab], one parallel pass
        token = logits[:, -1:].argmax(dim=-1)              # [B, 1], stays on the device
        logits = decoder.step(token)                       # [B, vocab], one replay of the graph
        out = decoder.generate(prompt, max_new_tokens=99)  # or all of it, sampled: [B, T + 99]

    A decoded token of a small model is microseconds of GPU work but milliseconds of Python and
    kernel launches. So, the pattern of gpt-fast: the state is allocated once (`init_state` with
    max_len: full attention's and NSA's caches preallocated, positions as tensors on the device);
    one decoding step (`TinyHybrid.decode_step`, every layer's `step`: it writes the state in
    place and its shapes never depend on the position) is captured into a CUDA graph after a
    warm-up; each token is copied into a static input and the graph replayed, with no host sync.
    Without CUDA, or with cuda_graph=False, the very same step runs eagerly.
    A graph still launches every small kernel of the step (a hundred or more); compile=True first
    fuses the step with torch.compile (tens of seconds, once per Decoder; with use_triton the
    kernels run as they are between the fused pieces, see kernels._launched_as_is): on an H200 the bench
    model's compiled and captured step costs 0.21 / 0.20 / 0.29 ms per token for gdn / gdn+swa /
    gdn+lte (float32, batch 1, the PyTorch ops; EXPERIMENTS.md section 7).
    max_len bounds the prompt plus the decoded tokens: past it, a ValueError before any work.
    """

    def __init__(self, model: TinyHybrid, batch_size: int, max_len: int, cuda_graph: bool | None = None,
                 compile: bool = False):
        check_decoder(model, TinyHybrid, batch_size, max_len, cuda_graph, compile)
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        # the step that runs (captured or eager): the model's own, or torch.compile's fusion of it
        self._step_fn = torch.compile(model.decode_step, dynamic=False) if compile else model.decode_step
        self.device = model.wte.weight.device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.state = model.init_state(batch_size, max_len=max_len)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)   # the static input
        self.graph = self.logits = None                    # the captured step and its output buffer
        if self.cuda_graph:
            self._capture()

    @property
    def length(self) -> int:
        """Tokens in the state, counted on the host (each layer's state keeps the count)."""
        return self.state[0]["length"]

    @torch.no_grad()
    def _capture(self, warmup: int = 3):
        """Warm up on a side stream (kernels compile, cuBLAS and the allocator settle), as PyTorch's
        CUDA-graph notes advise, then record one step. The warm-up steps write into the state, so it
        is emptied again; the graph keeps reading and writing these same tensors."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step_fn(self.token, self.state)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.model.reset_state(self.state)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step_fn(self.token, self.state)

    @torch.no_grad()
    def prefill(self, idx):
        """Start a new sequence per row: empty the state, then prefill idx [batch_size, T]
        (T <= max_len) in one parallel pass. Returns logits [B, T, vocab]."""
        check_prompt(self, idx, 0)
        self.model.reset_state(self.state)
        logits, _ = self.model(idx, state=self.state)
        return logits

    @torch.no_grad()
    def step(self, token):
        """Decode one token per sequence: token [batch_size, 1] integer ids on the model's device
        (keep sampled ids there: copying them in needs no host sync). Returns logits [B, vocab], a
        copy: the next replay overwrites the graph's own output."""
        check_step_token(self, token)
        self.token.copy_(token)
        if self.graph is None:
            logits = self._step_fn(self.token, self.state)
        else:
            self.graph.replay()
            logits = self.logits.clone()
        for layer in self.state:                           # the host count, as forward keeps it
            layer["length"] += 1
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """prefill(idx), then max_new_tokens sampled tokens (temperature 0: greedy), each fed back
        with step; T + max_new_tokens must fit in max_len. Returns [B, T + max_new_tokens]."""
        check_sampling(max_new_tokens, temperature, top_k)
        check_prompt(self, idx, max_new_tokens)
        logits = self.prefill(idx)[:, -1].float()
        out = [idx]
        for i in range(max_new_tokens):
            token = TinyHybrid.sample(logits, temperature, top_k, generator)   # [B, 1]
            out.append(token)
            if i + 1 < max_new_tokens:
                logits = self.step(token).float()
        return torch.cat(out, dim=1)

