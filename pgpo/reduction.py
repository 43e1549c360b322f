"""Masks, token weights and chunking shared by :mod:`pgpo.information` and :mod:`pgpo.distill`.

Every per-token quantity ``x[b, t]`` is reduced as ``sum_bt w[b, t] * x[b, t]`` with weights from
:func:`reduction_weights`, so the chunked code only ever accumulates weighted sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

# What a per-token quantity is reduced to: the mean over masked tokens, the mean over sequences
# of each sequence's token mean, or the plain masked sum.
Reduction = Literal["token_mean", "seq_mean", "sum"]
# Tokens per chunk. Each pass over the vocabulary computes its [chunk_size, V] float32 arrays in
# buffers allocated once per call (ChunkBuffers), so chunks may be as large as CPU matmuls want:
# products of 32 rows are thin and slower per token than those of 128 (the head against its
# floor: benchmarks/bench_core.py --head, docs/trainer.md). At 151,936 tokens of vocabulary one
# buffer is 78 MB; the fused head loss holds four (five for the full JSD, and for forward KL
# with entropies). On a GPU, 256-512 amortise kernel launches.
DEFAULT_CHUNK_SIZE = 128


def flatten(
    logits: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Views ``[..., T, V] -> [N, V]`` and the mask ``[..., T] -> [N]`` (bool).

    Returns (logits2d, mask1d, token_shape). A missing mask means every token counts.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape [..., V], got {tuple(logits.shape)}")
    token_shape = tuple(logits.shape[:-1])
    if mask is None:
        mask = torch.ones(token_shape, dtype=torch.bool, device=logits.device)
    if tuple(mask.shape) != token_shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match logits' token shape {token_shape}"
        )
    return logits.reshape(-1, logits.shape[-1]), mask.reshape(-1) != 0, token_shape


def reduction_denominator(
    mask: torch.Tensor, reduction: Reduction, empty_sequences_count: bool
) -> float:
    """What :func:`reduction_weights` divides by: the number of masked tokens (``token_mean``),
    of sequences (``seq_mean``; only non-empty ones unless ``empty_sequences_count``), or 1
    (``sum``). Ranks that each hold a slice of the batch sum their denominators and pass the
    total to :func:`reduction_weights`, so the weights are those of the whole batch."""
    m = mask != 0
    if reduction == "sum":
        return 1.0
    if reduction == "token_mean":
        return float(m.sum())
    if reduction == "seq_mean":
        rows = m.reshape(-1, m.shape[-1]) if m.dim() > 1 else m.unsqueeze(0)
        return float(rows.shape[0] if empty_sequences_count else rows.any(-1).sum())
    raise ValueError(f"reduction must be one of token_mean, seq_mean, sum; got {reduction!r}")


def reduction_weights(
    mask: torch.Tensor,
    reduction: Reduction,
    empty_sequences_count: bool,
    denominator: float | None = None,
) -> torch.Tensor:
    """Float64 weights ``[...]`` (mask's shape) such that ``sum(w * x)`` is the reduction.

    - ``token_mean``: mean over all masked tokens of the batch;
    - ``seq_mean``: token mean within each sequence (last axis), then mean over sequences.
      With ``empty_sequences_count`` a sequence with no tokens adds 0 but counts in the
      denominator (the SDPO reference's loss); otherwise only non-empty sequences count
      (a signal such as ``I_k`` is not diluted by masked-out samples);
    - ``sum``: plain masked sum.

    ``denominator`` replaces this mask's own :func:`reduction_denominator` (for a batch split over
    ranks: the sum over ranks). An all-zero mask gives all-zero weights (never 0/0).
    """
    if denominator is None:
        denominator = reduction_denominator(mask, reduction, empty_sequences_count)
    m = (mask != 0).to(torch.float64)
    if reduction == "sum":
        return m
    if reduction == "token_mean":
        return m / max(denominator, 1.0)
    if reduction == "seq_mean":
        per_seq = m.sum(-1, keepdim=True)
        return m / per_seq.clamp(min=1.0) / max(denominator, 1.0)
    raise ValueError(f"reduction must be one of token_mean, seq_mean, sum; got {reduction!r}")


def chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Yield (start, stop) covering range(n) in steps of chunk_size."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def kept_chunks(keep: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
    """The chunk loop of every chunked pass: for each run of ``chunk_size`` rows of the bool
    mask ``keep`` ``[N]``, the global indices ``[n]`` of its kept rows (chunks with none are
    skipped). Masked rows are never computed."""
    for start, stop in chunks(keep.shape[0], chunk_size):
        rows = keep[start:stop].nonzero().squeeze(-1)
        if rows.numel() > 0:
            yield start + rows


class ChunkBuffers:
    """Float32 ``[chunk_size, V]`` buffers shared by every chunk of one pass, each allocated on
    first use and sliced to the chunk's rows: a chunk's temporaries then cost no allocation,
    so chunks above glibc's 32 MiB mmap ceiling do not fault fresh pages in each time.

    A caller that passes the same instance to every call (``head_divergence(...,
    workspace=...)``) also saves each call's first touch of fresh pages, as a preallocated
    ``out=`` array does; the buffers (at most five) then stay allocated between calls."""

    def __init__(self, rows: int, vocab: int, device: torch.device | str | None = None) -> None:
        """``device`` None: the device of the first call that checks them (:meth:`check`)."""
        self._shape = (rows, vocab)
        self._device = None if device is None else torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}

    def check(self, rows: int, vocab: int, device: torch.device) -> None:
        """A one-line ValueError unless these buffers hold ``rows`` rows of width ``vocab``
        on ``device``."""
        if self._device is None:
            self._device = device
        have_rows, have_vocab = self._shape
        if have_vocab != vocab or have_rows < rows or self._device.type != device.type:
            raise ValueError(
                f"workspace holds [{have_rows}, {have_vocab}] on {self._device}; this call "
                f"needs [{rows}, {vocab}] on {device}"
            )

    def __call__(self, name: str, n: int) -> torch.Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self._shape, dtype=torch.float32, device=self._device)
        return self._buffers[name][:n]


def log_probs_into(
    buffer: torch.Tensor,
    rows: torch.Tensor,
    head: torch.Tensor | None,
    temperature: float,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log_softmax(rows @ head.T / temperature)`` ``[n, V]`` (``rows`` are logits without a
    head), float32, computed in ``buffer`` ``[n, V]``: the matrix product, the scaling and the
    log-softmax all write into it. With ``probs`` ``[n, V]``, the softmax is written there too
    (from the logits: a softmax pass measured faster on CPU than ``exp`` of the log-probs)."""
    if head is None:
        buffer.copy_(rows)
    elif rows.dtype == head.dtype == torch.float32:
        torch.mm(rows, head.T, out=buffer)
    else:
        buffer.copy_(rows @ head.T)
    if temperature != 1.0:
        buffer.div_(temperature)
    if probs is not None:
        torch.softmax(buffer, dim=-1, out=probs)
    return torch.log_softmax(buffer, dim=-1, out=buffer)


def check_temperature(temperature: float) -> None:
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
