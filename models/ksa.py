"""KSA: Kwai Summary Attention over a user's whole behaviour history (OneRec team, arXiv 2604.24432).

The mechanism follows the official code as ../shared/PAPERS.md §1.3 describes it; the mapping to
behaviour sequences (§1.8) is ours.

Layout. After every chunk of C events, S learnable summary tokens are inserted (k = C/S)::

    [e_0 .. e_{C-1}, s_0 .. s_{S-1}, e_C .. e_{2C-1}, s_0 .., ..]      block size B = C + S

The same S embeddings (``summary_embedding``) are inserted at every chunk. A trailing partial
chunk gets no summary, as at the official code's HF prefill. (Its training path gives the partial
chunk summaries too, but no token can see them: a chunk is inside every later token's raw window
until it fills. Outputs are identical either way.) Events and summaries are kept as two jagged
tensors; the interleaved order exists only in the reference kernel.

Mask ("sliding chunk attention", §1.3(c)). With c(.) the chunk of a token, for query i, key j:

    summary i:  c(j) == c(i) and j <= i              own chunk's events and earlier own summaries
    event i:    j <= i and (  (event j   and c(i) - c(j) <= W)    raw events: own chunk + W before
                           or (summary j and c(i) - c(j) >  W) )  summaries of all older chunks

Every past chunk is seen exactly once, raw or summarised: no double counting, no gap.

Layer (pre-norm, as Qwen3 in the release)::

    h = RMSNorm(x);  q, k, v = W_qkv h  at events,  W_qkv^summary h  at summaries
    q, k = RoPE(QKNorm(q), pos), RoPE(QKNorm(k), pos)      QK-norm shared by both token kinds
    x = x + W_o attn(q, k, v; mask);   x = x + MLP(RMSNorm(x))   W_o and MLP shared

Positions are "origin": event i has position i; summary s (1..S) of chunk j has j*C + floor(s*C/S) - 1
(with S = 1, the chunk's last event). Event tokens are W_in [item | category | behaviour] plus an
embedding of the log2 bucket of the time since the previous event, so an encoded history depends
on its events only, never on when it is read: that is what lets serving cache it.

Layer kinds: ``summary`` layers use the window W; ``wide`` layers use ``wide_window`` chunks (the
release's "full" layers are summary layers with a 8x wider window; the recipe is 3 summary : 1 wide).

Read-out (target attention). A request that has seen n events reads the top layer like the event
n would: raw events of chunks c - W .. c (c = n // C, up to event n - 1) plus the summaries of all
chunks before c - W. (The issue's "raw window + all summaries" is taken under the mask's own rule:
summaries of chunks still in the raw window are left out, so no chunk is counted twice.) Its keys
add an embedding of the log2 time gap between the request and the event (or the summary's origin
event); its query is W_q [candidate item | candidate category] at position n. Candidates never see
each other.

Kernels, one interface (``kernel=``):

* ``reference``: interleaves the sequence, builds the dense [L, L] mask from the rule above
  (:func:`allowed`), calls scaled-dot-product attention. The spec; O(n^2) memory.
* ``chunked``: query blocks of P chunks attend to [their users' older summaries | raw events of
  chunks c0 - W .. c1) with a small block mask; blocks are grouped by key length into SDPA calls
  under a score budget. O(n (W C + n/k)) time, O(P C (n/k + W C)) extra memory per call; the n x n
  mask never exists. Every score pays for the mask, and no tile is skipped.
* ``blocksparse`` (:func:`attend_blocksparse`): per query block, the summaries that every query of
  the block sees (the n^2/k part) run as mask-free tiles on summary prefixes that consecutive
  blocks share (views, no gather); only the near keys (the staircase of newer summaries, the raw
  window and the causal own chunk, at most tile + (P - 1) S + (W + P) C a query) take a mask.
  Pieces return output and logsumexp and merge exactly (out = sum_p exp(lse_p - lse) out_p); the
  backward runs each piece with the merged totals. On CPU the pieces run the flash kernel under
  scaled-dot-product attention (it returns the logsumexp too); elsewhere, explicit matmuls: one
  plan and one merge on every device. (FlexAttention would need ``torch.compile``, minutes per
  shape and a C++ toolchain on CPU; the flash kernel gives the mask-free tiles without it.)
* ``full``: every event attends to every earlier event and no summary: the distillation teacher
  and the full-attention baseline of the benchmark.
* ``auto`` (the default): ``blocksparse`` on CPU, ``chunked`` on other devices (:func:`resolve_kernel`).

Serving: :class:`KSAState` keeps, per layer, the K/V of the raw window and current chunk and all
summary K/V; ``append`` costs O(layers (W C + n/k)) per event; ``score`` equals a full encode.

Notation: B histories with n_b events, N = sum n_b (jagged ``[N, d]`` + offsets ``[B+1]``);
m_b = n_b // C full chunks, summaries jagged ``[M, d]`` with M = S sum m_b; H heads of size dh.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.jagged import lengths_to_offsets, positions
from recsys.errors import RecsysError
from recsys.model_schemas import KSAConfig

Kernel = Literal["auto", "reference", "chunked", "blocksparse", "full"]
KERNELS: tuple[str, ...] = ("auto", "reference", "chunked", "blocksparse", "full")


def resolve_kernel(kernel: Kernel, x: torch.Tensor) -> Kernel:
    """``auto``: ``blocksparse`` for tokens ``x`` on CPU, where its mask-free tiles run PyTorch's
    flash kernel and it was measured faster than ``chunked`` at every length (docs/BENCHMARKS.md,
    "KSA"); ``chunked`` elsewhere (there the block-sparse pieces fall back to explicit matmuls) and
    under ``torch.func`` transforms (AGE's vmap over dropout masks), which its custom autograd
    Function does not support. Any other name as is."""
    if kernel != "auto":
        return kernel
    if x.device.type != "cpu" or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return "chunked"
    return "blocksparse"


# --------------------------------------------------------------------------------------------
# Layout and the mask rule


def allowed(i: torch.Tensor, j: torch.Tensor, *, chunk: int, summaries: int, window: int) -> torch.Tensor:
    """The sliding-chunk rule on interleaved indices (broadcasting): may query i attend to key j?"""
    block = chunk + summaries
    ci, cj = i // block, j // block
    si, sj = (i % block) >= chunk, (j % block) >= chunk
    as_summary = (cj == ci) & (j <= i)
    as_event = (j <= i) & ((~sj & (ci - cj <= window)) | (sj & (ci - cj > window)))
    return torch.where(si, as_summary, as_event)


def summary_origin(j: torch.Tensor, *, chunk: int, summaries: int) -> torch.Tensor:
    """Origin position of summary j (0-based over a history): chunk j // S, s = j % S + 1, at
    (j // S) C + floor(s C / S) - 1 (with S = 1, the chunk's last event)."""
    return (j // summaries) * chunk + ((j % summaries + 1) * chunk) // summaries - 1


def summary_positions(num_chunks: torch.Tensor, *, chunk: int, summaries: int) -> torch.Tensor:
    """[sum m_b * S] origin position of every summary of histories with ``num_chunks [B]`` full chunks."""
    return summary_origin(positions(num_chunks * summaries), chunk=chunk, summaries=summaries)


def summary_mask(chunk: int, summaries: int, device: torch.device | None = None) -> torch.Tensor:
    """[S, C+S] what a chunk's summaries see of [its C events | its S summaries]: all events, and
    the summaries up to themselves."""
    s = torch.arange(summaries, device=device)
    return torch.cat([torch.ones(summaries, chunk, dtype=torch.bool, device=device), s[None, :] <= s[:, None]], 1)


# --------------------------------------------------------------------------------------------
# Rotary positions and the layer


Rotation = tuple[torch.Tensor, torch.Tensor]  # cos, sin [T, 1, dh/2]


def rotation(pos: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.float32, base: float = 10000.0) -> Rotation:
    """RoPE tables for positions ``pos [T]``: angles ``pos * base^(-2i/dh)``, computed once per
    forward and shared by every layer and by q and k.

    Angles are computed in float64: positions reach 10^5 and float32 would lose 10^-2 rad.
    """
    half = head_dim // 2
    inv = base ** (-torch.arange(half, device=pos.device, dtype=torch.float64) / half)  # [dh/2]
    ang = pos.to(torch.float64)[:, None] * inv[None, :]  # [T, dh/2]
    return ang.cos().to(dtype)[:, None, :], ang.sin().to(dtype)[:, None, :]


def rope(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """Rotate pairs (rotate-half form) of ``x [T, H, dh]`` by the angles of ``rot``."""
    cos, sin = rot
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class KSALayer(nn.Module):
    """One summary-attention layer: separate Q/K/V for summaries, shared QK-norm, W_o and MLP."""

    def __init__(self, *, d_model: int, heads: int, window: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim, self.window = heads, d_model // heads, window
        self.norm = nn.RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.qkv_summary = nn.Linear(d_model, 3 * d_model, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model))

    def project(self, x: torch.Tensor, rot: Rotation, *, summary: bool) -> tuple[torch.Tensor, ...]:
        """``x [T, d]`` rotated by ``rot`` (its positions) -> q, k, v ``[T, H, dh]`` (RoPE on q, k)."""
        proj = self.qkv_summary if summary else self.qkv
        q, k, v = proj(self.norm(x)).view(len(x), 3, self.heads, self.head_dim).unbind(1)  # 3 x [T, H, dh]
        return rope(self.q_norm(q), rot), rope(self.k_norm(k), rot), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual, W_o and MLP: ``x [T, d]``, ``attn [T, H, dh]`` -> ``[T, d]``."""
        x = x + self.out(attn.reshape(len(x), x.shape[-1]))
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------------------------
# Attention kernels: (q, k, v of events [N, H, dh]; of summaries [M, H, dh]) -> outputs


@dataclass(frozen=True)
class Geometry:
    """Per-history lengths of a jagged batch (host copies: kernels plan their blocks from them)."""

    lengths: np.ndarray  # [B] events
    chunk: int
    summaries: int

    @property
    def num_chunks(self) -> np.ndarray:  # [B] full chunks m_b
        return self.lengths // self.chunk

    @property
    def ev_offsets(self) -> np.ndarray:  # [B+1]
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    @property
    def sum_offsets(self) -> np.ndarray:  # [B+1]
        return np.concatenate([[0], np.cumsum(self.num_chunks * self.summaries)]).astype(np.int64)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[G, Q, H, dh] x [G, K, H, dh] -> [G, Q, H, dh]; mask [G, Q, K] bool (True = may attend)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=None if mask is None else mask[:, None])
    return out.transpose(1, 2)


def attend_reference(q_e, k_e, v_e, q_s, k_s, v_s, geo: Geometry, window: int):
    """The spec: interleave, build the dense mask with :func:`allowed`, one SDPA over padded histories."""
    C, S = geo.chunk, geo.summaries
    blk = C + S
    b = len(geo.lengths)
    lengths = torch.as_tensor(geo.lengths, dtype=torch.int64, device=q_e.device)
    m = lengths // C
    # interleaved index of every event and summary of its history
    e_local = positions(lengths)  # [N]
    e_idx = e_local + (e_local // C) * S
    s_local = positions(m * S)  # [M]
    s_idx = (s_local // S) * blk + C + s_local % S
    total = lengths + m * S  # [B] interleaved length
    L = max(int(total.max()) if b else 0, 1)
    e_row = torch.repeat_interleave(torch.arange(b, device=q_e.device), lengths)
    s_row = torch.repeat_interleave(torch.arange(b, device=q_e.device), m * S)
    shape = (b, L) + tuple(q_e.shape[1:])
    dense = []
    for ev, sm in ((q_e, q_s), (k_e, k_s), (v_e, v_s)):
        x = ev.new_zeros(shape)  # [B, L, H, dh]
        x = x.index_put((e_row, e_idx), ev).index_put((s_row, s_idx), sm)
        dense.append(x)
    pos = torch.arange(L, device=q_e.device)
    mask = allowed(pos[:, None], pos[None, :], chunk=C, summaries=S, window=window)[None]  # [1, L, L]
    real = pos[None, :] < total[:, None]  # [B, L]
    mask = (mask & real[:, None, :]) | ~real[:, :, None]  # padded queries see everything (dropped)
    out = _sdpa(*dense, mask)  # [B, L, H, dh]
    return out[e_row, e_idx], out[s_row, s_idx]


def attend_full(q_e, k_e, v_e, geo: Geometry):
    """Causal attention over events only (no summaries): the teacher and the benchmark's baseline.

    One causal SDPA per history (the kernel builds no mask): O(n^2) time, the baseline's cost.
    """
    # 4-D inputs: with 3-D ones this CPU build falls back to the math path and its [H, n, n] scores
    parts = [F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in qkv), is_causal=True)[0].transpose(0, 1)
             for qkv in zip(*(t.split(geo.lengths.tolist()) for t in (q_e, k_e, v_e)), strict=True)]
    return torch.cat(parts) if parts else q_e


def attend_summaries(q_s, k_e, v_e, k_s, v_s, geo: Geometry):
    """Summary queries: own chunk's C events and own summaries up to themselves. [M, H, dh]."""
    C, S = geo.chunk, geo.summaries
    m = torch.as_tensor(geo.num_chunks, dtype=torch.int64, device=q_s.device)
    g = int(m.sum())
    if g == 0:
        return q_s
    starts = torch.as_tensor(geo.ev_offsets[:-1], device=q_s.device)  # [B]
    chunk_start = torch.repeat_interleave(starts, m) + positions(m) * C  # [G] first event of each chunk
    ev = chunk_start[:, None] + torch.arange(C, device=q_s.device)  # [G, C]
    hd = q_s.shape[1:]
    keys = torch.cat([k_e[ev], k_s.view(g, S, *hd)], 1)  # [G, C+S, H, dh]
    vals = torch.cat([v_e[ev], v_s.view(g, S, *hd)], 1)
    mask = summary_mask(C, S, q_s.device)  # [S, C+S]
    return _sdpa(q_s.view(g, S, *hd), keys, vals, mask[None].expand(g, S, C + S)).reshape(g * S, *hd)


def attend_chunked(q_e, k_e, v_e, k_s, v_s, geo: Geometry, window: int, *,
                   block_chunks: int = 16, score_budget: int = 1 << 24):
    """Event queries by blocks of ``block_chunks`` chunks; never an [n, n] mask. Returns [N, H, dh]."""
    C, S, W = geo.chunk, geo.summaries, window
    dev = q_e.device
    n_total = q_e.shape[0]
    if n_total == 0:
        return q_e
    # --- plan (host): one row per block (history b, chunks c0..c1)
    lengths = geo.lengths.astype(np.int64)
    n_chunks = -(-lengths // C)  # [B] chunks incl. a partial one
    blocks_per = -(-n_chunks // block_chunks)
    hist = np.repeat(np.arange(len(lengths)), blocks_per)
    first = np.concatenate([[0], np.cumsum(blocks_per)])[:-1]
    c0 = (np.arange(len(hist)) - np.repeat(first, blocks_per)) * block_chunks
    c1 = np.minimum(c0 + block_chunks, n_chunks[hist])
    q0, q1 = c0 * C, np.minimum(c1 * C, lengths[hist])  # query events [q0, q1)
    r0 = np.maximum(c0 - W, 0) * C  # raw keys [r0, q1)
    ns = np.clip((c1 - 1 - W) * S, 0, None)  # summaries 0..ns-1 (chunks < c1-1-W)
    klen = ns + (q1 - r0)
    ev_off, sum_off = geo.ev_offsets, geo.sum_offsets
    # pool = [k_e ; k_s ; one zero row]: summaries sit after the N events
    k_pool = torch.cat([k_e, k_s, k_e.new_zeros((1,) + k_e.shape[1:])])
    v_pool = torch.cat([v_e, v_s, v_e.new_zeros((1,) + v_e.shape[1:])])
    q_pool = torch.cat([q_e, q_e.new_zeros((1,) + q_e.shape[1:])])
    pad_k, pad_q = k_pool.shape[0] - 1, n_total
    qmax = block_chunks * C
    order = np.argsort(klen, kind="stable")
    outs, rows = [], []
    start = 0
    heads = q_e.shape[1]
    while start < len(order):  # group blocks of similar key length under the score budget
        end = start + 1
        while end < len(order) and (end - start + 1) * qmax * int(klen[order[end]]) * heads <= score_budget:
            end += 1
        sel = order[start:end]
        start = end
        lmax = int(klen[sel].max())
        hb, tq0, tq1, tr0, tns = (torch.as_tensor(a[sel], dtype=torch.int64, device=dev)[:, None]  # [G, 1]
                                  for a in (hist, q0, q1, r0, ns))
        # queries [G, Qmax]: local event index i, global row
        qi = tq0 + torch.arange(qmax, device=dev)[None]  # [G, Qmax]
        q_real = qi < tq1
        q_row = torch.where(q_real, torch.as_tensor(ev_off, device=dev)[hb] + qi, pad_q)
        # keys [G, Lmax]: first ns summaries, then raw events r0..q1-1
        kk = torch.arange(lmax, device=dev)[None]  # [G, Lmax]
        is_sum = kk < tns
        raw_i = tr0 + kk - tns  # local event index of a raw key
        k_row = torch.where(is_sum, n_total + torch.as_tensor(sum_off, device=dev)[hb] + kk,
                            torch.as_tensor(ev_off, device=dev)[hb] + raw_i)
        k_row = torch.where(is_sum | (raw_i < tq1), k_row, pad_k)
        # query i of chunk c sees key slots [0, a) (summaries of chunks < c - W) and [b, e] (raw
        # events (c - W) C .. i); padded queries see every slot (their rows are dropped)
        qc = qi // C
        a = torch.clamp((qc - W) * S, min=0).minimum(tns)
        b = tns + torch.clamp((qc - W) * C, min=0) - tr0
        e = tns + qi - tr0
        a = torch.where(q_real, a, lmax)[:, :, None]  # [G, Qmax, 1]
        kk3 = kk[:, None, :]  # [1, 1, Lmax]
        mask = (kk3 < a) | ((kk3 >= b[:, :, None]) & (kk3 <= e[:, :, None]))  # [G, Qmax, Lmax]
        out = _sdpa(q_pool[q_row], k_pool[k_row], v_pool[k_row], mask)  # [G, Qmax, H, dh]
        outs.append(out[q_real])
        rows.append(q_row[q_real])
    rows_all = torch.cat(rows)
    inverse = torch.empty_like(rows_all)
    inverse[rows_all] = torch.arange(len(rows_all), device=dev)
    return torch.cat(outs)[inverse]


# Block-sparse kernel. Queries are laid out by blocks of P chunks, P C rows each (a history's
# partial last block padded with zero rows), plus one zero row; keys are the pool [k_e ; k_s ; 0].
# A piece is one batched attention call: queries and keys as ``Rows`` of these, with no mask or
# with a small additive one. Pieces return (out, logsumexp) and merge exactly:
# lse = logsumexp_p lse_p, out = sum_p exp(lse_p - lse) out_p.

Rows = torch.Tensor | tuple[int, int, int]  # [G, X] rows (a gather), or (start, G, X): start + g X + x (a view)


@dataclass(frozen=True)
class _Piece:
    q_rows: Rows
    k_rows: Rows
    bias: torch.Tensor | None = None  # [G, 1, Q, L] 0 / -inf (None: every key visible)


@dataclass(frozen=True)
class BlockSparsePlan:
    """The query layout and the pieces of :func:`attend_blocksparse` for one geometry and window."""

    q_index: torch.Tensor  # [R] rows of [q_e ; 0] in the block layout, R = G P C + 1
    ev_pos: torch.Tensor  # [N] block-layout row of every event
    pieces: tuple[_Piece, ...]


def _take(pool: torch.Tensor, rows: Rows) -> torch.Tensor:
    """[G, X, ...] rows of a contiguous ``pool``; a (start, G, X) range is a view."""
    if isinstance(rows, tuple):
        start, g, x = rows
        return pool.narrow(0, start, g * x).unflatten(0, (g, x))
    return pool[rows]


def _add_into(pool: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    """pool[rows] += values ([G, X, ...]); repeated rows accumulate."""
    if isinstance(rows, tuple):
        _take(pool, rows).add_(values)
    else:
        pool.index_add_(0, rows.reshape(-1), values.reshape(-1, *values.shape[2:]))


def _probs(qt, kt, piece: _Piece, lse):
    """Math path: softmax probabilities [G, H, Q, L] of the piece, and the lse used (0 for a row with no key)."""
    s = torch.matmul(qt, kt.transpose(-1, -2)) * qt.shape[-1] ** -0.5
    if piece.bias is not None:
        s = s + piece.bias
    if lse is None:
        lse = s.logsumexp(-1)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (s - lse[..., None]).exp(), lse


def _piece_forward(q, k, v, piece: _Piece, flash: bool):
    """[G, Q, H, dh] x [G, L, H, dh] -> out [G, Q, H, dh], lse [G, Q, H].

    A query that sees no key of the piece (only padding can: a real query sees itself in the near
    piece) gets out 0 and lse 0 from either path, and no gradient reaches it.
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [G, H, X, dh] views
    if flash:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, attn_mask=piece.bias)
    else:
        p, lse = _probs(qt, kt, piece, None)
        out = torch.matmul(p, vt)
    return out.transpose(1, 2), lse.transpose(1, 2)  # [G, Q, H, dh], [G, Q, H]


def _piece_backward(g, q, k, v, out, lse, piece: _Piece, flash: bool):
    """Gradients of the piece's share of a softmax whose totals (``out``, ``lse``) span every piece:
    with them, the piece's probabilities are those of the whole softmax."""
    args = [t.transpose(1, 2) for t in (g, q, k, v, out)]  # [G, H, X, dh]
    lse_t = lse.transpose(1, 2).contiguous()  # [G, H, Q]
    if flash:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *args, lse_t, 0.0, False, attn_mask=piece.bias)
    else:
        gt, qt, kt, vt, ot = args
        p, _ = _probs(qt, kt, piece, lse_t)
        ds = p * (torch.matmul(gt, vt.transpose(-1, -2)) - (gt * ot).sum(-1, keepdim=True))
        scale = qt.shape[-1] ** -0.5
        grads = (torch.matmul(ds, kt) * scale, torch.matmul(ds.transpose(-1, -2), qt) * scale,
                 torch.matmul(p.transpose(-1, -2), gt))
    return [t.transpose(1, 2) for t in grads]  # [G, X, H, dh]


class _BlockSparseAttention(torch.autograd.Function):
    """Event queries over the union of their pieces' keys, merged by logsumexp; exact backward."""

    @staticmethod
    def forward(ctx, q_e, k_e, v_e, k_s, v_s, plan: BlockSparsePlan, flash: bool):
        zero = q_e.new_zeros((1,) + q_e.shape[1:])
        q = torch.cat([q_e, zero])[plan.q_index]  # [R, H, dh] block layout
        k, v = torch.cat([k_e, k_s, zero]), torch.cat([v_e, v_s, zero])  # key pool
        lse = q.new_full(q.shape[:2], float("-inf"))  # [R, H]
        parts = []
        for piece in plan.pieces:
            o, l_ = _piece_forward(_take(q, piece.q_rows), _take(k, piece.k_rows), _take(v, piece.k_rows), piece, flash)
            parts.append((o, l_))
            merged = torch.logaddexp(_take(lse, piece.q_rows), l_)
            if isinstance(piece.q_rows, tuple):
                _take(lse, piece.q_rows).copy_(merged)
            else:
                lse[piece.q_rows] = merged  # rows repeat only at the zero row
        lse = lse.masked_fill(torch.isinf(lse), 0.0)  # the zero row, if no piece covers it: finite for backward
        out = torch.zeros_like(q)
        for piece, (o, l_) in zip(plan.pieces, parts, strict=True):
            _add_into(out, piece.q_rows, (l_ - _take(lse, piece.q_rows)).exp()[..., None] * o)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.flash, ctx.n = plan, flash, q_e.shape[0]
        return out[plan.ev_pos]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        plan, n = ctx.plan, ctx.n
        g = torch.zeros_like(q)
        g[plan.ev_pos] = grad  # padded query rows get no gradient, so they add nothing below
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for piece in plan.pieces:
            gq, gk, gv = _piece_backward(_take(g, piece.q_rows), _take(q, piece.q_rows), _take(k, piece.k_rows),
                                         _take(v, piece.k_rows), _take(out, piece.q_rows), _take(lse, piece.q_rows),
                                         piece, ctx.flash)
            _add_into(dq, piece.q_rows, gq)
            _add_into(dk, piece.k_rows, gk)
            _add_into(dv, piece.k_rows, gv)
        return dq[plan.ev_pos], dk[:n], dv[:n], dk[n:-1], dv[n:-1], None, None


def plan_blocksparse(geo: Geometry, window: int, *, block_chunks: int = 8, tile: int = 128,
                     dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                     gather_rows: int = 1 << 16) -> BlockSparsePlan:
    """The query layout and pieces of :func:`attend_blocksparse`: a host plan on the lengths, then
    index tensors and the near piece's mask (in ``dtype``) on ``device``. Histories with as many
    summary tiles share one call on gathered prefixes while that gathers at most ``gather_rows``
    rows; past that, one call each on views."""
    C, S, W, P = geo.chunk, geo.summaries, window, block_chunks
    PC = P * C
    lengths = geo.lengths.astype(np.int64)
    n_ev, n_sum = int(lengths.sum()), int(geo.num_chunks.sum()) * S
    n_chunks = -(-lengths // C)  # incl. a partial one
    blocks_per = -(-n_chunks // P)
    hist = np.repeat(np.arange(len(lengths)), blocks_per)
    first = np.concatenate([[0], np.cumsum(blocks_per)])[:-1]  # first block of each history
    G = len(hist)
    c0 = (np.arange(G) - first[hist]) * P  # first chunk of each block
    nq = np.minimum(PC, lengths[hist] - c0 * C)  # real queries of each block
    x = np.arange(PC)[None]
    real = x < nq[:, None]  # [G, PC]
    ev_id = geo.ev_offsets[hist][:, None] + c0[:, None] * C + x  # [G, PC] event row of each query slot
    q_index = np.append(np.where(real, ev_id, n_ev), n_ev)  # [R]; padding reads the zero row
    ev_pos = np.empty(n_ev, dtype=np.int64)
    ev_pos[ev_id[real]] = (np.arange(G)[:, None] * PC + x)[real]
    blk0 = np.arange(G) * PC  # block-layout row of each block's first query
    sum0 = n_ev + geo.sum_offsets[hist]  # pool row of the history's summary 0
    tiles = np.maximum(c0 - W, 0) * S // tile  # whole tiles of the summaries every query of the block sees
    T = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    pieces: list[_Piece] = []
    # far: consecutive blocks of one history with as many whole tiles share one summary prefix
    if G and tiles.max() > 0:
        starts = np.flatnonzero(np.diff(hist * (int(tiles.max()) + 1) + tiles, prepend=-1))
        ends = np.append(starts[1:], G)
        q_len = blk0[ends - 1] + PC - blk0[starts]
        for t in np.unique(tiles[starts][tiles[starts] > 0]):
            pick = tiles[starts] == t
            sel, lens, width = starts[pick], q_len[pick], int(t) * tile
            if len(sel) == 1 or len(sel) * width > gather_rows:  # views of the queries and of the summary prefix
                pieces.extend(_Piece((int(blk0[j]), 1, int(q)), (int(sum0[j]), 1, width)) for j, q in zip(sel, lens, strict=True))
            else:  # histories with as many tiles, in one call on gathered prefixes
                qx = np.arange(lens.max())[None]
                q_rows = np.where(qx < lens[:, None], blk0[sel][:, None] + qx, G * PC)
                pieces.append(_Piece(T(q_rows), T(sum0[sel][:, None] + np.arange(width)[None])))
    # near: the summaries past the whole tiles, up to those of chunk c0 + P - 2 - W, then the raw
    # events of chunks c0 - W .. the block's own, with a mask
    s_lo = tiles * tile
    n_s = np.maximum(np.minimum(np.maximum(c0 + P - 1 - W, 0), geo.num_chunks[hist]) * S - s_lo, 0)
    r_st = np.maximum(c0 - W, 0) * C  # first raw event
    n_r = c0 * C + nq - r_st
    width = int((n_s + n_r).max()) if G else 0
    if width:
        kk = torch.arange(width, device=device)[None]  # [1, L] key slots: n_s summaries, then n_r raw events
        ns_, nr_, r_st_ = (T(a)[:, None] for a in (n_s, n_r, r_st))
        k_rows = torch.where(kk < ns_, T(sum0 + s_lo)[:, None] + kk, T(geo.ev_offsets[hist] + r_st)[:, None] + kk - ns_)
        k_rows = torch.where(kk < ns_ + nr_, k_rows, n_ev + n_sum)
        i = T(c0 * C)[:, None] + torch.arange(PC, device=device)[None]  # [G, Q] query event index in its history
        cw = i // C - W  # its chunk - W
        # visible slots: [0, a) summaries below (c - W) S, [b, e) raw events (c - W) C .. i
        a = (cw * S - T(s_lo)[:, None]).clamp(min=0).minimum(ns_)
        b = ns_ + (cw * C - r_st_).clamp(min=0)
        e = torch.where(T(real), ns_ + i - r_st_ + 1, b)
        below = torch.arange(width + 1, device=device)[:, None] > kk  # [L+1, L] row r: slots < r (rows copy fast)
        mask = below[a.clamp(max=width)] | (below[e.clamp(max=width)] & ~below[b.clamp(max=width)])  # [G, Q, L]
        zero, off = (torch.tensor(v, dtype=dtype, device=device) for v in (0.0, float("-inf")))
        bias = torch.where(mask, zero, off)[:, None]  # [G, 1, Q, L]
        pieces.append(_Piece((0, G, PC), k_rows, bias=bias))
    return BlockSparsePlan(q_index=T(q_index), ev_pos=T(ev_pos), pieces=tuple(pieces))


def attend_blocksparse(q_e, k_e, v_e, k_s, v_s, geo: Geometry, window: int, *, block_chunks: int = 8,
                       tile: int = 128, flash: bool | None = None, plan: BlockSparsePlan | None = None):
    """Event queries, block-sparse: the summaries a whole block sees run as mask-free tiles, the
    masked remainder is small, and fully masked tiles are never computed. Returns [N, H, dh].

    Queries go by blocks of P = ``block_chunks`` chunks. The keys of a block [c0, c0 + P) split in two:

    * far: the summaries of chunks < c0 - W, which every query of the block sees, rounded down to
      whole tiles of ``tile`` summaries. Consecutive blocks with as many tiles share one call on
      one summary prefix (views, when one history has that many tiles): no mask, no gather. This
      is the part that grows as n^2 / k, at the per-score cost of mask-free flash attention.
    * near, with a mask: the summaries past the last whole tile up to those of chunk
      c0 + P - 2 - W (the staircase), and the raw events of chunks c0 - W to the block's own
      (window and causal triangle). At most ``tile`` + (P - 1) S + (W + P) C keys a query.

    Defaults, measured on the benchmark's model (C 8, S 1, W 16) on 2 CPU cores: P = 8 and a
    tile of 128 summaries. Tiles of 32 to 128 and P of 4 to 16 timed alike at n = 4k and 16k; with
    128, a history of under 1,152 events has no whole tile and runs as one masked call, which
    was the fastest at n = 1k.

    Splitting the near keys further (the raw chunks every query of the block sees and the own
    block's causal square as mask-free pieces) was measured and did not pay on CPU: those tiles are
    64 x 64 to 64 x 120, where the flash kernel's cost per score is set by the tile's size
    (3-5x a long tile's), with or without a mask, and two more calls and merges cost more than
    the mask saves.

    Each piece returns its output and logsumexp; they merge exactly, and each piece's backward runs
    with the merged totals. On CPU the pieces run PyTorch's flash kernel
    (``_scaled_dot_product_flash_attention_for_cpu`` and its backward, what
    ``scaled_dot_product_attention`` runs, which also return the logsumexp); elsewhere, or with
    ``flash=False``, the same pieces run as explicit matmuls and softmax (exact, more memory).
    ``plan``: :func:`plan_blocksparse` of this geometry and window (layers with one window share it).

    Memory: the near piece is built whole: gathered keys and values of L d / (P C) floats per event
    each and a mask of L floats per event (L its key width: 326 at the benchmark's model, about
    4 KB per event in all), where ``chunked`` bounds each call by a score budget.
    """
    if q_e.shape[0] == 0:
        return q_e
    flash = q_e.device.type == "cpu" if flash is None else flash
    if plan is None:
        plan = plan_blocksparse(geo, window, block_chunks=block_chunks, tile=tile, dtype=q_e.dtype, device=q_e.device)
    return _BlockSparseAttention.apply(q_e, k_e, v_e, k_s, v_s, plan, flash)

# --------------------------------------------------------------------------------------------
# The encoder and the read-out


@dataclass
class Encoded:
    """Top-layer states of B histories: events ``[N, d]`` and summaries ``[M, d]`` (jagged)."""

    events: torch.Tensor
    summaries: torch.Tensor
    geometry: Geometry
    attention: list[torch.Tensor]  # per layer, attention outputs at events [N, H, dh] (distillation)


class KSAEncoder(nn.Module):
    """The layer stack over jagged event tokens; ``forward(x [N, d], lengths) -> Encoded``."""

    def __init__(self, *, cfg: KSAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.summary_embedding = nn.Parameter(torch.randn(cfg.summaries, cfg.d_model) * 0.02)  # [S, d]
        windows = [cfg.window if kind == "summary" else cfg.wide_window for kind in cfg.layers]
        self.layers = nn.ModuleList(KSALayer(d_model=cfg.d_model, heads=cfg.heads, window=w, mlp_ratio=cfg.mlp_ratio)
                                    for w in windows)
        self.final_norm = nn.RMSNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, lengths: np.ndarray, *, kernel: Kernel = "auto") -> Encoded:
        C, S = self.cfg.chunk, self.cfg.summaries
        kernel = resolve_kernel(kernel, x)
        geo = Geometry(lengths=np.asarray(lengths, dtype=np.int64), chunk=C, summaries=S)
        dev = x.device
        lens = torch.as_tensor(geo.lengths, device=dev)
        m = lens // C
        pos_e = positions(lens)  # [N]
        pos_s = summary_positions(m, chunk=C, summaries=S)  # [M]
        s = self.summary_embedding.repeat(int(m.sum()), 1) if kernel != "full" else x.new_zeros(0, x.shape[1])  # [M, d]
        dh = self.cfg.d_model // self.cfg.heads
        rot_e, rot_s = rotation(pos_e, dh, x.dtype), rotation(pos_s, dh, x.dtype)
        attention = []
        plans: dict[int, BlockSparsePlan] = {}
        for layer in self.layers:
            q_e, k_e, v_e = layer.project(x, rot_e, summary=False)
            if kernel == "full":
                a_e = attend_full(q_e, k_e, v_e, geo)
                attention.append(a_e)
                x = layer.finish(x, a_e)
                continue
            q_s, k_s, v_s = layer.project(s, rot_s, summary=True)
            if kernel == "reference":
                a_e, a_s = attend_reference(q_e, k_e, v_e, q_s, k_s, v_s, geo, layer.window)
            elif kernel == "chunked":
                a_e = attend_chunked(q_e, k_e, v_e, k_s, v_s, geo, layer.window)
                a_s = attend_summaries(q_s, k_e, v_e, k_s, v_s, geo)
            elif kernel == "blocksparse":
                if layer.window not in plans:  # the plan depends on the lengths and the window only
                    plans[layer.window] = plan_blocksparse(geo, layer.window, dtype=x.dtype, device=dev)
                a_e = attend_blocksparse(q_e, k_e, v_e, k_s, v_s, geo, layer.window, plan=plans[layer.window])
                a_s = attend_summaries(q_s, k_e, v_e, k_s, v_s, geo)
            else:
                raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
            attention.append(a_e)
            x, s = layer.finish(x, a_e), layer.finish(s, a_s)
        return Encoded(events=self.final_norm(x), summaries=self.final_norm(s), geometry=geo, attention=attention)


def readout_keys(n: torch.Tensor, *, chunk: int, summaries: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For histories read after n events [R]: (visible summaries [R], first visible raw event [R])."""
    c = n // chunk
    older = (c - window).clamp(min=0)
    return older * summaries, older * chunk


class KSAReadout(nn.Module):
    """Multi-head target attention of candidates over [older summaries | raw window] of the top layer."""

    def __init__(self, *, query_dim: int, cfg: KSAConfig, gap_buckets: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg, self.heads, self.head_dim = cfg, cfg.heads, d // cfg.heads
        self.query = nn.Linear(query_dim, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.gap = nn.Embedding(gap_buckets, d)  # request time - event time, added to the keys
        nn.init.normal_(self.gap.weight, std=0.02)
        self.out = nn.Linear(d, d)
        # a key every candidate can attend to, with value 0: the weight left for the history then
        # grows with how many keys match, which a plain softmax average cannot express
        self.sink = nn.Parameter(torch.zeros(cfg.heads, d // cfg.heads)) if cfg.readout_sink else None

    def forward(self, *, query: torch.Tensor, cand_request: torch.Tensor, n: torch.Tensor,
                key_states: torch.Tensor, key_pos: torch.Tensor, key_gap: torch.Tensor,
                key_offsets: torch.Tensor) -> torch.Tensor:
        """Candidates ``query [Cq, qd]`` of requests ``cand_request [Cq]`` read their request's keys.

        Args:
            n: [R] events each request has seen (the query's position).
            key_states: [K_total, d] visible top-layer states of every request, jagged by ``key_offsets [R+1]``.
            key_pos, key_gap: [K_total] origin position and time-gap bucket of each key.
        Returns:
            [Cq, d]; zeros for a request with no history.
        """
        r = len(n)
        h, dh = self.heads, self.head_dim
        klen = key_offsets[1:] - key_offsets[:-1]  # [R]
        kmax = max(int(klen.max()) if r else 0, 1)
        # key(state) + key(gap) as one projection of the sum (the key map has no bias)
        k = rope(self.key(key_states + self.gap(key_gap)).view(-1, h, dh), rotation(key_pos, dh, key_states.dtype))  # [K_total, H, dh]
        v = self.value(key_states).view(-1, h, dh)
        q = rope(self.query(query).view(-1, h, dh), rotation(n[cand_request], dh, query.dtype))  # [Cq, H, dh]
        if r == 1 and kmax == len(k) and len(k):  # one request with a history (serving): no padding, no mask
            kd, vd = k[None], v[None]
            if self.sink is not None:
                kd, vd = torch.cat([self.sink[None, None], kd], 1), torch.cat([vd.new_zeros(1, 1, h, dh), vd], 1)
            out = _sdpa(q[None], kd, vd, None)[0]  # [Cq, H, dh]
            return self.out(out.reshape(len(query), h * dh))
        # pad keys per request [R, Kmax]; candidates per request [R, Mmax]
        row = torch.repeat_interleave(torch.arange(r, device=n.device), klen)
        col = positions(klen)
        kd = k.new_zeros(r, kmax, h, dh).index_put((row, col), k)
        vd = v.new_zeros(r, kmax, h, dh).index_put((row, col), v)
        kmask = torch.arange(kmax, device=n.device)[None] < klen[:, None]  # [R, Kmax]
        kmask = kmask | (klen == 0)[:, None]  # an empty history sees one zero key (output zeroed below)
        if self.sink is not None:  # slot 0: the sink (no position), value 0
            kd = torch.cat([self.sink.expand(r, 1, h, dh), kd], 1)
            vd = torch.cat([vd.new_zeros(r, 1, h, dh), vd], 1)
            kmask = torch.cat([kmask.new_ones(r, 1), kmask], 1)
            kmax += 1
        per = torch.bincount(cand_request, minlength=r)
        mmax = max(int(per.max()) if r else 0, 1)
        ccol = positions(per)
        qd = q.new_zeros(r, mmax, h, dh).index_put((cand_request, ccol), q)
        out = _sdpa(qd, kd, vd, kmask[:, None, :].expand(r, mmax, kmax))[cand_request, ccol]  # [Cq, H, dh]
        out = self.out(out.reshape(len(query), h * dh))
        return torch.where((klen == 0)[cand_request][:, None], torch.zeros_like(out), out)


# --------------------------------------------------------------------------------------------
# The block in the composed model


class KSABlock(nn.Module):
    """Encode each request's whole history with KSA; candidates read it out. Output ``[Cq, d_model]``.

    Requests of one user in one batch share one encode: their histories are prefixes of the
    longest (``history_source``), and KSA is causal, so reading the longest at position n gives
    what encoding the first n events would.
    """

    def __init__(self, *, dim: int, cfg: KSAConfig, interval_buckets: int, gap_buckets: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_len = None  # reads the whole history
        self.kernel: Kernel = cfg.kernel
        self.token = nn.Linear(3 * dim, cfg.d_model)  # [item | category | behaviour] -> d_model
        self.interval = nn.Embedding(interval_buckets + 1, cfg.d_model)  # + "no previous event"
        nn.init.normal_(self.interval.weight, std=0.02)
        self.encoder = KSAEncoder(cfg=cfg)
        self.readout = KSAReadout(query_dim=2 * dim, cfg=cfg, gap_buckets=gap_buckets)
        self.out_dim = cfg.d_model
        self.record = False  # keep the latest encode in ``last`` (distillation reads its attention)
        self.last: Encoded | None = None

    def tokens(self, item: torch.Tensor, category: torch.Tensor, behavior: torch.Tensor,
               interval: torch.Tensor) -> torch.Tensor:
        """Event tokens ``[T, d_model]`` from torchrec embeddings ``[T, D]`` and interval buckets ``[T]``."""
        return self.token(torch.cat([item, category, behavior], -1)) + self.interval(interval)

    def forward(self, emb, request: torch.Tensor) -> torch.Tensor:
        h = emb.history
        hoff = emb.hist_offsets  # [B+1] of the copies: a sharing request's may be a tail, its source's is whole
        goff = emb.gap_offsets if emb.gap_offsets is not None else hoff  # [B+1] of the whole histories
        lengths = goff[1:] - goff[:-1]  # [B]
        src = emb.history_source if emb.history_source is not None else torch.arange(len(lengths), device=hoff.device)
        reps = torch.unique(src)  # [U] requests whose histories get encoded
        rep_len = lengths[reps]
        rows = torch.repeat_interleave(hoff[:-1][reps], rep_len) + positions(rep_len)  # [N]
        x = self.tokens(*(t.index_select(0, rows) for t in (h["item"], h["category"], h["behavior"], emb.hist_interval)))
        enc = self.encoder(x, rep_len.cpu().numpy(), kernel=self.kernel)  # host copy: kernels plan blocks on it
        self.last = enc if self.record else None
        # keys of request r: summaries [0, ns) and raw events [r0, n) of its source's encode
        slot = torch.empty(len(lengths), dtype=torch.int64, device=hoff.device)
        slot[reps] = torch.arange(len(reps), device=hoff.device)
        u = slot[src]  # [B] index of each request's encoded history
        ev_off = torch.as_tensor(enc.geometry.ev_offsets, device=hoff.device)
        sum_off = torch.as_tensor(enc.geometry.sum_offsets, device=hoff.device)
        C, S, W = self.cfg.chunk, self.cfg.summaries, self.cfg.window
        ns, r0 = readout_keys(lengths, chunk=C, summaries=S, window=W)
        if self.kernel == "full":  # the teacher reads every event, no summaries
            ns, r0 = torch.zeros_like(ns), torch.zeros_like(r0)
        nraw = lengths - r0
        klen = ns + nraw
        koff = lengths_to_offsets(klen)
        kk = positions(klen)  # [K] index within each request's keys
        kr = torch.repeat_interleave(torch.arange(len(lengths), device=hoff.device), klen)
        is_sum = kk < ns[kr]
        j = kk  # summary index
        e = r0[kr] + kk - ns[kr]  # raw event index
        pool = torch.cat([enc.events, enc.summaries])
        n_ev = enc.events.shape[0]
        key_row = torch.where(is_sum, n_ev + sum_off[u[kr]] + j, ev_off[u[kr]] + e)
        key_pos = torch.where(is_sum, summary_origin(j, chunk=C, summaries=S), e)
        # time gap to the request, read from the request's own hist_gap ids (its history is a prefix)
        key_gap = emb.hist_gap[goff[:-1][kr] + key_pos]
        return self.readout(query=torch.cat([emb.candidate["item"], emb.candidate["category"]], -1),
                            cand_request=request, n=lengths, key_states=pool[key_row], key_pos=key_pos,
                            key_gap=key_gap, key_offsets=koff)


# --------------------------------------------------------------------------------------------
# Incremental state for serving


STATE_MAGIC = b"KSAS"
STATE_VERSION = 1


class _Grow:
    """An append-only buffer along ``axis`` that doubles its capacity (amortised O(1) per row).

    Summary K/V are kept head-major, ``[H, T, dh]`` (axis 1), so that one query's scores against
    them are a batched matrix-vector product over contiguous memory, with no copy per event.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, data: torch.Tensor | None = None, *, axis: int = 0) -> None:
        self.axis = axis
        n = 0 if data is None else data.shape[axis]
        full = list(shape)
        full.insert(axis, max(16, n))
        self.buf = torch.zeros(full, dtype=dtype)
        self.n = 0
        if data is not None:
            self.buf.narrow(axis, 0, n).copy_(data)
            self.n = n

    def append(self, rows: torch.Tensor) -> None:
        k = rows.shape[self.axis]
        if self.n + k > self.buf.shape[self.axis]:
            shape = list(self.buf.shape)
            shape[self.axis] = 2 * (self.n + k)
            bigger = torch.zeros(shape, dtype=self.buf.dtype)
            bigger.narrow(self.axis, 0, self.n).copy_(self.view())
            self.buf = bigger
        self.buf.narrow(self.axis, self.n, k).copy_(rows)
        self.n += k

    def view(self, n: int | None = None) -> torch.Tensor:
        return self.buf.narrow(self.axis, 0, self.n if n is None else n)


def _attend_parts(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax attention of ``q [H, T, dh]`` over the union of key/value parts ``[H, K_i, dh]``,
    without concatenating them: one score row per part, one softmax, one weighted sum per part."""
    parts = [(k, v) for k, v in parts if k.shape[1]]
    scores = torch.cat([torch.matmul(q, k.transpose(1, 2)) for k, _ in parts], -1) * q.shape[-1] ** -0.5  # [H, T, K]
    probs = scores.softmax(-1)
    out, at = None, 0
    for k, v in parts:
        part = torch.matmul(probs[..., at: at + k.shape[1]], v)  # [H, T, dh]
        out = part if out is None else out + part
        at += k.shape[1]
    return out


def _keep_from(n: int, rows: int, first: int) -> int:
    """Rows to drop from a buffer holding events [n - rows, n) so that it starts at event ``first``."""
    return max(first - (n - rows), 0)


@dataclass(frozen=True)
class ReadoutKeys:
    """The top-layer keys one request's candidates read (:meth:`KSAState.keys_at`): K = the
    summaries of the chunks before the raw window, then the window's raw events."""

    states: torch.Tensor  # [K, d] top-layer states
    pos: torch.Tensor  # [K] origin positions
    gap: torch.Tensor  # [K] time-gap buckets to the request time
    n: int  # events the request has seen (the query's position)

    def read(self, block: KSABlock, query: torch.Tensor) -> torch.Tensor:
        """[M, d] the read-out of candidates ``query [M, 2D]``; differentiable in ``query`` (and in the
        read-out's parameters) when autograd is on: AGE moves the query (models/age.py)."""
        return block.readout(query=query, cand_request=torch.zeros(len(query), dtype=torch.int64),
                             n=torch.tensor([self.n]), key_states=self.states, key_pos=self.pos, key_gap=self.gap,
                             key_offsets=torch.tensor([0, len(self.states)]))


class KSAState:
    """One user's KSA cache: everything needed to append events and score candidates.

    Per layer l with window W_l: K/V of the raw events of chunks c - W_l .. c (the window and the
    current partial chunk, at most (W_l + 1) C rows) and the K/V of every summary. For the read-out:
    top-layer key/value inputs of the last (W + 1) C events and of every summary, with their
    origin timestamps. Its size is O(layers (W C + n/k)), against O(layers n) for full attention.

    Example:
        >>> cfg = KSAConfig(enabled=True, chunk=2, window=1, d_model=8, heads=2)
        >>> block = KSABlock(dim=4, cfg=cfg, interval_buckets=8, gap_buckets=8).eval()
        >>> state = KSAState.empty(block)
        >>> tok = block.tokens(*torch.randn(3, 5, 4).unbind(0), torch.zeros(5, dtype=torch.long))
        >>> state.append(block, tok, np.arange(5) * 60)
        >>> state.n, state.num_summaries
        (5, 2)
        >>> KSAState.from_bytes(state.to_bytes(), block).n
        5
    """

    def __init__(self, *, cfg: KSAConfig, windows: list[int]) -> None:
        self.cfg, self.windows = cfg, windows
        self.n = 0
        self.last_time: int | None = None
        h, dh = cfg.heads, cfg.d_model // cfg.heads
        self.win_k = [torch.zeros(0, h, dh) for _ in windows]  # per layer [<=(W_l+1)C, H, dh]
        self.win_v = [torch.zeros(0, h, dh) for _ in windows]
        self.sum_k = [_Grow((h, dh), torch.float32, axis=1) for _ in windows]  # per layer [H, M, dh]
        self.sum_v = [_Grow((h, dh), torch.float32, axis=1) for _ in windows]
        self.top = torch.zeros(0, cfg.d_model)  # [<=(W+1)C, d] top-layer states of the read-out window
        self.top_time = np.zeros(0, dtype=np.int64)
        self.top_sum = _Grow((cfg.d_model,), torch.float32)  # [M, d] top-layer summary states
        self.sum_time = np.zeros(0, dtype=np.int64)  # [M] origin event time of each summary

    @classmethod
    def empty(cls, block: KSABlock) -> KSAState:
        enc = block.encoder
        return cls(cfg=block.cfg, windows=[layer.window for layer in enc.layers])

    @property
    def num_summaries(self) -> int:
        return self.top_sum.n

    # --- appending

    @torch.no_grad()
    def append(self, block: KSABlock, tokens: torch.Tensor, timestamps: np.ndarray) -> None:
        """Append events (tokens ``[T, d]`` from :meth:`KSABlock.tokens`, unix seconds ``[T]``), oldest first."""
        for t in range(len(tokens)):
            self._append_one(block, tokens[t: t + 1], int(timestamps[t]))

    def _append_one(self, block: KSABlock, x: torch.Tensor, time: int) -> None:
        """One event through every layer. When it fills its chunk, the chunk's S summary tokens go
        through the same layer pass (as the official cache feeds [last token, summaries] together):
        at each layer the summaries read the chunk's C events, this one included."""
        cfg, enc = self.cfg, block.encoder
        C, S = cfg.chunk, cfg.summaries
        dh = cfg.d_model // cfg.heads
        i = self.n
        c = i // C
        fills = (i + 1) % C == 0
        rot = rotation(torch.tensor([i]), dh)  # shared by every layer
        if fills:
            s = enc.summary_embedding  # [S, d]
            spos = summary_origin(torch.arange(S), chunk=C, summaries=S) + c * C  # [S]
            srot = rotation(spos, dh)
            smask = summary_mask(C, S)[None]  # [1, S, C+S]
        for l_, layer in enumerate(enc.layers):
            w = layer.window
            keep = _keep_from(i, len(self.win_k[l_]), max(c - w, 0) * C)  # chunks c - w .. c stay raw
            q, k, v = layer.project(x, rot, summary=False)  # [1, H, dh]
            self.win_k[l_] = torch.cat([self.win_k[l_][keep:], k])
            self.win_v[l_] = torch.cat([self.win_v[l_][keep:], v])
            ns = max(c - w, 0) * S  # summaries of chunks older than the window
            att = _attend_parts(q.transpose(0, 1), [(self.sum_k[l_].view(ns), self.sum_v[l_].view(ns)),
                                                    (self.win_k[l_].transpose(0, 1), self.win_v[l_].transpose(0, 1))])
            if not fills:
                x = layer.finish(x, att.transpose(0, 1))
                continue
            qs, ks, vs = layer.project(s, srot, summary=True)  # [S, H, dh]
            own_k, own_v = self.win_k[l_][-C:], self.win_v[l_][-C:]  # the chunk's C events, this one last
            att_s = _sdpa(qs[None], torch.cat([own_k, ks])[None], torch.cat([own_v, vs])[None], smask)[0]
            self.sum_k[l_].append(ks.transpose(0, 1))
            self.sum_v[l_].append(vs.transpose(0, 1))
            both = layer.finish(torch.cat([x, s]), torch.cat([att.transpose(0, 1), att_s]))  # [1+S, d]
            x, s = both[:1], both[1:]
        top = enc.final_norm(torch.cat([x, s]) if fills else x)
        keep = _keep_from(i, len(self.top), max(c - cfg.window, 0) * C)
        self.top = torch.cat([self.top[keep:], top[:1]])
        self.top_time = np.append(self.top_time[keep:], time)
        self.n += 1
        self.last_time = time
        if fills:
            self.top_sum.append(top[1:])
            origin = (spos - c * C).numpy()  # offsets of the summaries' origin events in the chunk
            self.sum_time = np.append(self.sum_time, self.top_time[-C:][origin])

    # --- scoring

    @torch.no_grad()
    def read(self, block: KSABlock, query: torch.Tensor, request_time: int,
             gap_bucket) -> torch.Tensor:
        """Read-out of candidates ``query [M, 2D]`` at ``request_time``; ``gap_bucket(seconds) -> ids``."""
        return self.keys_at(request_time, gap_bucket).read(block, query)

    @torch.no_grad()
    def keys_at(self, request_time: int, gap_bucket) -> ReadoutKeys:
        """What a read-out at ``request_time`` attends to, copied out of the state: later appends to
        the state do not change it, and reading it is differentiable in the query."""
        cfg = self.cfg
        n = self.n
        ns, r0 = readout_keys(torch.tensor([n]), chunk=cfg.chunk, summaries=cfg.summaries, window=cfg.window)
        ns, r0 = int(ns), int(r0)
        raw_from = r0 - (n - len(self.top))
        states = torch.cat([self.top_sum.view(ns), self.top[raw_from:]])  # [K, d], a copy
        times = np.concatenate([self.sum_time[:ns], self.top_time[raw_from:]])
        j = torch.arange(ns)
        key_pos = torch.cat([summary_origin(j, chunk=cfg.chunk, summaries=cfg.summaries), torch.arange(r0, n)])
        key_gap = torch.as_tensor(gap_bucket(request_time - times), dtype=torch.int64)
        return ReadoutKeys(states=states, pos=key_pos, gap=key_gap, n=n)

    # --- size and bytes

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"top": self.top, "top_sum": self.top_sum.view()}
        for l_ in range(len(self.windows)):
            out[f"win_k.{l_}"], out[f"win_v.{l_}"] = self.win_k[l_], self.win_v[l_]
            out[f"sum_k.{l_}"], out[f"sum_v.{l_}"] = self.sum_k[l_].view(), self.sum_v[l_].view()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of cached tensors and timestamps (what a store keeps per user)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values()) + 8 * (len(self.top_time) + len(self.sum_time))

    def _meta(self) -> dict:
        c = self.cfg
        return {"chunk": c.chunk, "summaries": c.summaries, "window": c.window, "windows": self.windows,
                "d_model": c.d_model, "heads": c.heads}

    def to_bytes(self) -> bytes:
        """``KSAS`` | version u32 | header length u32 | JSON header | raw little-endian arrays | sha256."""
        arrays = {k: t.contiguous().numpy().astype("<f4") for k, t in self._tensors().items()}
        arrays["top_time"] = self.top_time.astype("<i8")
        arrays["sum_time"] = self.sum_time.astype("<i8")
        header = {"meta": self._meta(), "n": self.n, "last_time": self.last_time,
                  "arrays": [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]}
        head = json.dumps(header, sort_keys=True).encode()
        body = STATE_MAGIC + struct.pack("<II", STATE_VERSION, len(head)) + head + b"".join(a.tobytes() for a in arrays.values())
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes, block: KSABlock) -> KSAState:
        """Refuses another version, a corrupt payload, or a state of a differently shaped model."""
        if len(data) < 44 or data[:4] != STATE_MAGIC:
            raise RecsysError("not a KSA state (bad magic bytes)")
        body, digest = data[:-32], data[-32:]
        version, hlen = struct.unpack("<II", body[4:12])
        if version != STATE_VERSION:
            raise RecsysError(f"KSA state version {version} is not supported (this build reads version {STATE_VERSION})")
        if hashlib.sha256(body).digest() != digest:
            raise RecsysError("KSA state is corrupt (checksum mismatch)")
        try:
            header = json.loads(body[12: 12 + hlen])
        except ValueError as exc:
            raise RecsysError("KSA state is corrupt (unreadable header)") from exc
        state = cls.empty(block)
        if header["meta"] != state._meta():
            raise RecsysError(f"KSA state was built for {header['meta']}, this model is {state._meta()}")
        at = 12 + hlen
        arrays = {}
        for name, dtype, shape in header["arrays"]:
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            arrays[name] = np.frombuffer(body[at: at + size], dtype=dtype).reshape(shape)
            at += size
        if at != len(body):
            raise RecsysError("KSA state is corrupt (payload length does not match its header)")
        t = lambda k: torch.from_numpy(arrays[k].astype(np.float32))  # noqa: E731
        state.n, state.last_time = int(header["n"]), header["last_time"]
        state.top, state.top_time, state.sum_time = t("top"), arrays["top_time"].astype(np.int64), arrays["sum_time"].astype(np.int64)
        state.top_sum = _Grow((state.cfg.d_model,), torch.float32, t("top_sum"))
        h, dh = state.cfg.heads, state.cfg.d_model // state.cfg.heads
        for l_ in range(len(state.windows)):
            state.win_k[l_], state.win_v[l_] = t(f"win_k.{l_}"), t(f"win_v.{l_}")
            state.sum_k[l_] = _Grow((h, dh), torch.float32, t(f"sum_k.{l_}"), axis=1)
            state.sum_v[l_] = _Grow((h, dh), torch.float32, t(f"sum_v.{l_}"), axis=1)
        return state


def full_kv_bytes(n: int, cfg: KSAConfig) -> int:
    """Bytes a full-attention cache of n events would hold, like for like with :class:`KSAState`
    (fp32): K and V of every event in every layer, plus the read-out's top-layer state and time of
    every event (its keys depend on the request time, so neither cache can hold them)."""
    return n * (len(cfg.layers) * 2 * cfg.d_model * 4 + cfg.d_model * 4 + 8)
