"""A language-model loss that never holds ``[tokens, vocabulary]`` (DESIGN: "logits only where labels
are, cross-entropy in chunks").

:func:`lm_cross_entropy` takes the final hidden states ``[N, h]`` of the supervised positions only,
the output head's weight ``[V, h]`` (and bias) and the targets ``[N]``, and returns the token-weighted
mean cross-entropy -- the same number as ``F.cross_entropy(hidden @ weight.T, targets)`` with logits
in float32. On CUDA with Liger installed it uses Liger's fused linear cross-entropy; elsewhere
:class:`ChunkedLinearCrossEntropy`: the logits of ``chunk_size`` rows at a time, whose gradients are
computed in the forward pass and kept (``[N, h]`` and ``[V, h]``, the sizes of the inputs), so that
neither the forward nor the backward ever holds more than ``[chunk_size, V]`` logits.

This file is part of the self-contained model package that export copies into every checkpoint:
it imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``mean_i CE(hidden[i] @ weight.T + bias, targets[i])`` over rows in chunks of ``chunk_size``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, n, chunk_size):
            h = hidden[lo:lo + chunk_size]
            y = targets[lo:lo + chunk_size]
            logits = F.linear(h, weight, bias).float()  # [chunk, V]: the largest tensor held
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, y[:, None])[:, 0]).sum()
            if need_h or need_w or need_b:
                # d(sum of CE)/d logits = softmax - one_hot, computed in place over the logits
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(y), device=g.device), y] -= 1.0
                if need_h:
                    grad_h[lo:lo + chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(g.t(), h.float())
                if need_b:
                    grad_b += g.sum(0)
                del g
            del logits
        scale = 1.0 / n
        ctx.save_for_backward(
            *(t.mul_(scale) if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b))
        )
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        out = []
        for has, tensor, dtype in zip(ctx.has, saved, ctx.dtypes):
            out.append((tensor * grad_out).to(dtype) if has else None)
        return out[0], out[1], out[2], None, None


def _liger():
    """Liger's functional fused linear cross-entropy, or None (not installed)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001 - an optional CUDA kernel; any import failure means "not there"
        return None
    return liger_fused_linear_cross_entropy


def lm_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     bias: torch.Tensor | None = None, chunk_size: int = 4096, use_liger: bool = True) -> torch.Tensor:
    """Mean cross-entropy of ``hidden [N, h]`` through the head ``weight [V, h]`` against ``targets [N]``
    (all supervised: select the labelled positions first). ``N == 0`` gives a zero that is still in
    the graph (every parameter gets a gradient, zero), not the NaN of an empty mean. Without a
    backward to come (grad mode off, or nothing requires grad) only the losses are computed."""
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"lm_cross_entropy: hidden [N, h] and targets [N], got {tuple(hidden.shape)}, {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"lm_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero + bias.sum() * 0.0 if bias is not None else zero
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        # no backward will come (evaluation, no_grad): the losses alone, without the gradients that
        # the autograd function computes in its forward (inside it grad mode is always off)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk_size):
            logits = F.linear(hidden[lo:lo + chunk_size], weight, bias).float()
            total += F.cross_entropy(logits, targets[lo:lo + chunk_size], reduction="sum")
            del logits
        return total / hidden.shape[0]
    if use_liger and hidden.is_cuda:
        fused = _liger()
        if fused is not None:
            return fused(hidden, weight, targets, bias=bias, reduction="mean")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, int(chunk_size))
