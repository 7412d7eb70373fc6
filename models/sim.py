"""SIM: Search-based Interest Model (Pi, Qi, Zhu et al., "Search-based User Interest Modeling with
Lifelong Sequential Behavior Data for Click-Through Rate Prediction", CIKM 2020, arXiv 2006.05639).

Two stages per candidate a over a request's whole history B = [b_1 .. b_T] (PAPERS.md §2):

* General Search Unit (GSU) picks the top-K behaviours B* (Eq. 1), in one of three modes:

  - ``hard``: r_i = [C_i = C_a], the K most recent behaviours of the candidate's category. The
    search runs on the data side through the per-user category index (features/category_index.py,
    :func:`models.batch.hard_search`), once per (request, category), so the batch carries only the
    K behaviours, never the whole history. Non-parametric: alpha = 0.
  - ``soft``: r_i = (W_b e_i) . (W_a e_a) over the whole history, top-K per candidate. Trained by
    the auxiliary CTR task of Eq. 2: U_r = sum_i r_i e_i (no softmax, as written), then
    MLP([U_r | e_a]) -> L_GSU; the embeddings e are the ESU's (shared tables).
  - ``ksa`` (ours, not in the paper): score the n/k KSA summaries of the request's history first,
    g_j = (W_s h_j) . (W_a e_a) for chunk j's top-layer summary h_j (the max over its S summaries),
    keep the ``guide_chunks`` best chunks, then compute the soft r_i only on their events and the
    trailing partial chunk (which has no summary yet): O(n/k + chunks C) per candidate instead of
    O(n). W_s learns to rank chunks as their events' soft scores do: KL(softmax_j(t_j) || softmax_j(g_j))
    with t_j = logsumexp of r_i over chunk j (teacher detached), weighted by ``guide_weight``.
    When the KSA block runs its ``full`` kernel (KSA self-distillation's teacher, models/ksa.py),
    it encodes no summaries, so nothing guides the search: it is then the ``soft`` search, exact
    over the whole history, which the guided search approximates (and no guide loss).

* Exact Search Unit (ESU), Eqs. 3-4: z_j = [e_item | e_category | e_behaviour | e_t] for each selected
  behaviour, e_t the embedding of the time interval between the request and the behaviour;
  att^i = softmax_j((W_b^i z_j) . (W_a^i e_a) / sqrt(d_h)); head_i = sum_j att^i_j z_j;
  output [head_1 | ... | head_q]. Fewer than K selected: the rest are masked; none: the output is 0.

Loss (Eq. 5): alpha L_GSU + beta L_ESU, with beta = 1 (L_ESU is the model's BCE) and alpha =
``aux_weight`` for soft and ksa, 0 for hard (CTRModel.aux_loss adds alpha L_GSU + the guide loss).

Time intervals use the library's log2-minute buckets (models.batch.time_gap_bucket, 20 by default):
bucket b holds [2^b - 1, 2^(b+1) - 1) minutes, so 0: under a minute, 10: 17-34 hours, 13: 5.7-11
days, 15: 23-45 days, 18: 182-364 days, 19: a year and more. The embedding is the model's
``time_gap`` table, the same one DIN's keys use (SIM's paper does not state its bucketing).

Departures from the paper: the soft search is exact top-K, not ALSH (MIPS) retrieval; the ESU
keys include the behaviour type (our events carry one); the paper's Amazon and Taobao sequences
have none.

Notation: B requests, C candidates (jagged over requests), L_total history events, K selected,
D embedding dim, Dz = 4D ESU key dim, d' = ``search_dim``.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.jagged import positions
from models.mlp import MLP
from recsys.model_schemas import SIMConfig


def esu_keys(events: dict[str, torch.Tensor]) -> torch.Tensor:
    """ESU keys z_j = [item | category | behaviour | gap] ``[L, 4D]`` of embedded behaviours
    (``Embedded.history`` or ``Embedded.search``: name -> ``[L, D]``)."""
    return torch.cat([events["item"], events["category"], events["behavior"], events["gap"]], -1)


class ESU(nn.Module):
    """Multi-head target attention over K selected behaviours (SIM Eqs. 3-4).

    Example:
        >>> esu = ESU(key_dim=8, query_dim=4, heads=2, head_dim=3)
        >>> z, mask = torch.randn(3, 5, 8), torch.tensor([[True] * 5, [True, False, False, False, False], [False] * 5])
        >>> out = esu(z, mask, torch.randn(3, 4))
        >>> out.shape, out[2].abs().sum().item()   # candidate 2 selected nothing
        (torch.Size([3, 16]), 0.0)
    """

    def __init__(self, *, key_dim: int, query_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.w_b = nn.Linear(key_dim, heads * head_dim, bias=False)
        self.w_a = nn.Linear(query_dim, heads * head_dim, bias=False)
        self.out_dim = heads * key_dim

    def forward(self, z: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """z [C, K, Dz], mask [C, K] (True = selected), query [C, Dq] -> [C, q * Dz]."""
        c, k, _ = z.shape
        h, dh = self.heads, self.head_dim
        kb = self.w_b(z).view(c, k, h, dh)  # [C, K, H, dh]
        qa = self.w_a(query).view(c, h, dh)  # [C, H, dh]
        scores = torch.einsum("ckhd,chd->chk", kb, qa) / math.sqrt(dh)  # [C, H, K]
        att = torch.softmax(scores.masked_fill(~mask[:, None, :], float("-inf")), -1).nan_to_num(0.0)
        return torch.einsum("chk,ckz->chz", att, z).reshape(c, -1)  # [C, H * Dz]


def esu_reference(esu: ESU, z: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Eqs. 3-4 one candidate and one head at a time: the spec :class:`ESU` is tested against."""
    out = []
    for c in range(len(query)):
        zc = z[c][mask[c]]  # [n, Dz]
        heads = []
        for i in range(esu.heads):
            sl = slice(i * esu.head_dim, (i + 1) * esu.head_dim)
            wb, wa = esu.w_b.weight[sl], esu.w_a.weight[sl]  # [dh, Dz], [dh, Dq]
            s = (zc @ wb.T) @ (wa @ query[c]) / math.sqrt(esu.head_dim)  # [n]
            heads.append(torch.softmax(s, 0) @ zc if len(zc) else z.new_zeros(z.shape[-1]))
        out.append(torch.cat(heads))
    return torch.stack(out)


def request_groups(lengths: np.ndarray, cands: np.ndarray, budget: int) -> list[np.ndarray]:
    """Requests sorted by history length and cut into groups whose padded score tensor
    (requests x most candidates x longest history) stays under ``budget`` (a lone request may exceed it).

    Example:
        >>> [g.tolist() for g in request_groups(np.array([5, 100, 7, 90]), np.array([2, 2, 2, 2]), 400)]
        [[0, 2], [3, 1]]
    """
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    while start < len(order):
        end, most = start + 1, int(cands[order[start]])
        while end < len(order):  # lengths grow along ``order``: the newest is the longest
            most = max(most, int(cands[order[end]]))
            if (end + 1 - start) * most * max(int(lengths[order[end]]), 1) > budget:
                break
            end += 1
        groups.append(order[start:end])
        start = end
    return groups


def _pad_rows(rows: torch.Tensor, lengths: torch.Tensor, width: int, fill: int = -1) -> torch.Tensor:
    """Jagged row ids [sum lengths] -> [n, width] padded with ``fill``."""
    n = len(lengths)
    out = torch.full((n, width), fill, dtype=torch.int64, device=rows.device)
    seg = torch.repeat_interleave(torch.arange(n, device=rows.device), lengths)
    out[seg, positions(lengths)] = rows
    return out


def chunk_scores(q: torch.Tensor, hs: torch.Tensor, m: torch.Tensor, summaries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KSA-guided search, step 1: g_j = max over chunk j's S summaries of (W_s h) . (W_a e_a).

    Args:
        q: [n, Mg, d'] projected candidates (W_a e_a) of n requests. hs: [n, mmax*S, d'] projected
            summaries (W_s h), chunk-major. m: [n] full chunks of each request.
    Returns:
        (scores [n, Mg, mmax], valid [n, Mg, mmax]).
    """
    n, mw = q.shape[0], q.shape[1]
    mmax = hs.shape[1] // summaries
    gs = torch.bmm(q, hs.transpose(1, 2)).view(n, mw, mmax, summaries).amax(-1)
    valid = (torch.arange(mmax, device=q.device)[None] < m[:, None])[:, None, :].expand_as(gs)
    return gs, valid


def chosen_events(gs: torch.Tensor | None, valid: torch.Tensor | None, lengths: torch.Tensor, *, chunk: int,
                  chunks: int, candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KSA-guided search, step 2: the events to score exactly, per candidate: every event of its
    ``chunks`` best chunks, plus the trailing partial chunk (no summary covers it yet).

    Args:
        gs, valid: [n, Mg, mmax] chunk scores (None when no request has a full chunk; then pass
            ``candidates`` = Mg). lengths: [n] history lengths.
    Returns:
        (positions [n, Mg, P], valid [n, Mg, P]) with P = min(chunks, mmax) * C + C - 1.

    Example:
        >>> gs = torch.tensor([[[0.1, 0.9, 0.5]]])
        >>> pos, ok = chosen_events(gs, torch.ones(1, 1, 3, dtype=torch.bool), torch.tensor([7]), chunk=2, chunks=1)
        >>> pos[ok].tolist()   # chunk 1 (events 2, 3) and the partial chunk (event 6)
        [2, 3, 6]
    """
    dev = lengths.device
    n = len(lengths)
    m = lengths // chunk
    if gs is not None and gs.shape[-1]:
        mw = gs.shape[1]
        kc = min(chunks, gs.shape[-1])
        cval, cidx = torch.topk(gs.masked_fill(~valid, float("-inf")), kc, -1)  # [n, Mg, kc]
        pos = (cidx[..., None] * chunk + torch.arange(chunk, device=dev)).reshape(n, mw, kc * chunk)
        ok = (cval > float("-inf"))[..., None].expand(n, mw, kc, chunk).reshape(n, mw, kc * chunk)
    else:
        mw = candidates if gs is None else gs.shape[1]
        pos = torch.zeros(n, mw, 0, dtype=torch.int64, device=dev)
        ok = torch.zeros(n, mw, 0, dtype=torch.bool, device=dev)
    tail = (m * chunk)[:, None] + torch.arange(max(chunk - 1, 0), device=dev)[None]  # [n, C-1] the partial chunk
    tail_ok = tail < lengths[:, None]
    pos = torch.cat([pos, tail[:, None, :].expand(n, mw, -1)], -1)
    ok = torch.cat([ok, tail_ok[:, None, :].expand(n, mw, -1)], -1)
    return pos, ok


class SIMBlock(nn.Module):
    """GSU (hard | soft | ksa) + ESU in the composed model; output ``[C, heads * 4D]``.

    ``max_len``: hard search reads no raw history (its behaviours come in the batch's ``sim_*``
    features), soft and ksa read whole histories. ``search_k``: what the batch builder must search.
    """

    def __init__(self, *, dim: int, cfg: SIMConfig, ksa: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg, self.mode, self.k = cfg, cfg.mode, cfg.k
        self.max_len = 0 if cfg.mode == "hard" else None
        self.esu = ESU(key_dim=4 * dim, query_dim=2 * dim, heads=cfg.heads, head_dim=cfg.head_dim)
        self.out_dim = self.esu.out_dim
        if cfg.mode != "hard":
            self.w_b = nn.Linear(2 * dim, cfg.search_dim, bias=False)  # behaviour side of r_i
            self.w_a = nn.Linear(2 * dim, cfg.search_dim, bias=False)  # candidate side
            self.aux = MLP(in_dim=4 * dim, hidden=cfg.aux_hidden, out_dim=1)  # Eq. 2 on [U_r | e_a]
        if cfg.mode == "ksa":
            if ksa is None:
                raise ValueError("SIM mode 'ksa' needs the model's KSA block")
            self.w_s = nn.Linear(ksa.cfg.d_model, cfg.search_dim, bias=False)  # summary side of g_j
            self._ksa = [ksa]  # a list: the KSA block is the model's, not a submodule of this one
            ksa.record = True  # its encode stays readable in ``last`` after its forward
        self._aux: dict[str, torch.Tensor] = {}
        self.measure_recall = False  # ksa mode, eval: count how much of the soft top-K the guided search finds
        self.recall = [0, 0]  # [found, soft top-K size]

    @property
    def search_k(self) -> int | None:
        return self.k if self.mode == "hard" else None

    def forward(self, emb, request: torch.Tensor) -> torch.Tensor:
        query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)  # [C, 2D]
        self._aux = {}
        if self.mode == "hard":
            s = emb.search
            if s is None:
                raise ValueError("SIM hard search needs the batch's sim_* features: build batches with "
                                 "search_k=model.search_k (models.batch.batch_from_requests or hard_search)")
            keys = esu_keys(s)  # [R, 4D]
            glen = emb.search_offsets[1:] - emb.search_offsets[:-1]  # [G]
            rows = _pad_rows(torch.arange(len(keys), device=keys.device), glen, max(int(glen.max()) if len(glen) else 0, 1))
            sel = rows[emb.cand_group]  # [C, K'] rows of keys, -1 = none
        else:
            keys = esu_keys(emb.history)  # [L_total, 4D]
            sel = self._soft_search(emb, query, request)  # [C, K'] rows of the history, -1 = none
        mask = sel >= 0
        if not len(keys):  # no request of the batch has a behaviour (users without history): gather from a zero row
            keys = keys.new_zeros(1, keys.shape[-1])
        z = keys[sel.clamp(min=0)] * mask[..., None]  # [C, K', 4D]
        return self.esu(z, mask, query)

    # --- soft and KSA-guided search

    def _soft_search(self, emb, query: torch.Tensor, request: torch.Tensor) -> torch.Tensor:
        h = emb.history
        hoff = emb.hist_offsets
        dev = hoff.device
        lengths = hoff[1:] - hoff[:-1]  # [B]
        e = torch.cat([h["item"], h["category"]], -1)  # [L_total, 2D] the behaviour embeddings e_i
        kp = self.w_b(e)  # [L_total, d']
        qp = self.w_a(query)  # [C, d']
        b = len(lengths)
        per = torch.bincount(request, minlength=b)  # [B] candidates per request
        cand_slot = positions(per)  # [C] index among its request's candidates
        len_np, per_np = lengths.cpu().numpy(), per.cpu().numpy()  # host copies: the groups are planned on them
        sel = torch.full((len(query), self.k), -1, dtype=torch.int64, device=dev)
        train_aux = self.training and self.cfg.aux_weight > 0
        aux_u = query.new_zeros(len(query), e.shape[1]) if train_aux else None
        # the KSA block's full kernel (the distillation teacher) has no summaries to guide a search
        exact = self.mode == "soft" or self._ksa[0].kernel == "full"
        guide = None if exact else self._guide_inputs(emb, lengths)
        guide_losses = []
        for grp in request_groups(len_np, per_np, self.cfg.score_budget) if len(e) else []:  # no history: nothing to search
            g = torch.as_tensor(grp, device=dev)
            glen, gper = lengths[g], per[g]
            width, mw = max(int(glen.max()), 1), max(int(gper.max()), 1)
            ev = _pad_rows(torch.repeat_interleave(hoff[:-1][g], glen) + positions(glen), glen, width)  # [n, Lg]
            in_group = torch.zeros(b, dtype=torch.bool, device=dev)
            in_group[g] = True
            where = torch.full((b,), -1, dtype=torch.int64, device=dev)
            where[g] = torch.arange(len(g), device=dev)
            cands = torch.nonzero(in_group[request]).squeeze(1)  # [Cg] candidates of the group
            gi, si = where[request[cands]], cand_slot[cands]
            q = qp.new_zeros(len(g), mw, qp.shape[1]).index_put((gi, si), qp[cands])  # [n, Mg, d']
            valid = ev >= 0  # [n, Lg]
            k_pad = kp[ev.clamp(min=0)] * valid[..., None]  # [n, Lg, d']
            need_full = exact or train_aux or (self.training and self.cfg.guide_weight > 0) or self.measure_recall
            r = torch.bmm(q, k_pad.transpose(1, 2)) if need_full else None  # [n, Mg, Lg]
            if train_aux:  # Eq. 2: U_r = sum_i r_i e_i (padding has r_i = 0)
                e_pad = e[ev.clamp(min=0)] * valid[..., None]  # [n, Lg, 2D]
                aux_u[cands] = torch.bmm(r, e_pad)[gi, si]
            if exact:
                top = self._top_k(r.detach(), valid[:, None, :].expand_as(r), ev[:, None, :].expand_as(r))
            else:
                top, loss = self._guided(guide, g, glen, q, k_pad, ev, r, gi, si)
                if loss is not None:
                    guide_losses.append(loss * len(cands))
            sel[cands, :top.shape[-1]] = top[gi, si]
        if train_aux:
            self._aux["gsu_logit"] = self.aux(torch.cat([aux_u, query], -1)).squeeze(-1)  # [C]
        if guide_losses:
            self._aux["guide"] = torch.stack(guide_losses).sum() / max(len(query), 1)
        return sel

    def _top_k(self, r: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows [n, Mg, k'] of the k' = min(K, width) best valid scores (-1 where fewer are valid).

        Equal scores are common (a history repeats items, and equal embeddings score equally), and
        ``torch.topk`` breaks ties by memory layout, which would make a request's selection depend
        on the batch around it. Ties at the K-th score go to the most recent events (largest rows).
        """
        kk = min(self.k, r.shape[-1])
        x = r.masked_fill(~valid, float("-inf"))
        kth = torch.topk(x, kk, dim=-1).values[..., -1:]  # [n, Mg, 1] the K-th best score
        above = x > kth
        tie = (x == kth) & valid
        need = kk - above.sum(-1, keepdim=True)  # [n, Mg, 1] ties to take
        tie_rows = torch.topk(torch.where(tie, rows, -1), kk, dim=-1).values  # newest ties first
        cut = tie_rows.gather(-1, (need - 1).clamp(min=0))
        chosen = above | (tie & (rows >= cut) & (need > 0))
        val, idx = torch.topk(chosen.to(r.dtype), kk, dim=-1)  # every chosen one (at most kk)
        return torch.where(val > 0, rows.gather(-1, idx), torch.full_like(idx, -1))

    def _guide_inputs(self, emb, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each request's chunk summaries from the KSA block's encode of this forward."""
        ksa = self._ksa[0]
        enc = ksa.last
        if enc is None:
            raise RuntimeError("SIM mode 'ksa' reads the KSA block's encode: it must run before SIM, with record on")
        dev = lengths.device
        src = emb.history_source if emb.history_source is not None else torch.arange(len(lengths), device=dev)
        reps = torch.unique(src)
        slot = torch.empty(len(lengths), dtype=torch.int64, device=dev)
        slot[reps] = torch.arange(len(reps), device=dev)
        sum_off = torch.as_tensor(enc.geometry.sum_offsets, device=dev)[slot[src]]  # [B] first summary of its source
        return {"summaries": self.w_s(enc.summaries), "first": sum_off}  # [M, d'], [B]

    def _guided(self, guide, g, glen, q, k_pad, ev, r, gi, si):
        """KSA-guided search for one request group; returns (rows [n, Mg, k'], guide loss or None)."""
        C, S = self._ksa[0].cfg.chunk, self._ksa[0].cfg.summaries
        dev = q.device
        m = glen // C  # [n] full chunks, each with S summaries
        mmax = max(int(m.max()), 0)
        n, mw = q.shape[0], q.shape[1]
        loss = None
        if mmax:
            sidx = guide["first"][g][:, None] + torch.arange(mmax * S, device=dev)[None]  # [n, mmax*S]
            svalid = torch.arange(mmax * S, device=dev)[None] < (m * S)[:, None]
            hs = guide["summaries"][sidx.clamp(max=max(len(guide["summaries"]) - 1, 0))] * svalid[..., None]  # [n, mmax*S, d']
            gs, cvalid = chunk_scores(q, hs, m, S)
            if self.training and self.cfg.guide_weight > 0 and r is not None:
                # teacher: logsumexp of the soft scores inside each chunk (no gradient to the soft search)
                t = r.detach()[..., :mmax * C].reshape(n, mw, mmax, C).logsumexp(-1)
                t = t.masked_fill(~cvalid, float("-inf"))
                logp = torch.log_softmax(gs.masked_fill(~cvalid, float("-inf")), -1)
                p_t = torch.softmax(t, -1)
                has = cvalid[..., 0]  # [n, Mg] requests with at least one chunk
                kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - logp)).masked_fill(~cvalid, 0.0).sum(-1)  # [n, Mg]
                loss = kl[gi, si][has[gi, si]].sum() / max(len(gi), 1)
            pos, pvalid = chosen_events(gs.detach(), cvalid, glen, chunk=C, chunks=self.cfg.guide_chunks)
        else:
            pos, pvalid = chosen_events(None, None, glen, chunk=C, chunks=self.cfg.guide_chunks, candidates=mw)
        pos = pos.clamp(max=max(k_pad.shape[1] - 1, 0))
        kp = k_pad.gather(1, pos.reshape(n, -1, 1).expand(-1, -1, k_pad.shape[2])).view(n, mw, -1, k_pad.shape[2])
        scores = torch.einsum("nmd,nmpd->nmp", q, kp)  # [n, Mg, P] exact r_i on the chosen events only
        rows = ev.gather(1, pos.reshape(n, -1)).view(n, mw, -1)
        top = self._top_k(scores.detach(), pvalid, rows)
        if self.measure_recall and r is not None:
            full = self._top_k(r.detach(), (ev >= 0)[:, None, :].expand_as(r), ev[:, None, :].expand_as(r))[gi, si]
            got = top[gi, si]
            hit = ((full[..., :, None] == got[..., None, :]) & (full[..., :, None] >= 0)).any(-1)
            self.recall[0] += int(hit.sum())
            self.recall[1] += int((full >= 0).sum())
        return top, loss

    # --- serving: one request from a KSA state

    def guided_search_one(self, query: torch.Tensor, summaries: torch.Tensor, n: int, keys, *,
                          differentiable: bool = False) -> torch.Tensor:
        """KSA-guided GSU + ESU for one request without its whole history in memory: what serving
        does with a user's :class:`models.ksa.KSAState` (its ``top_sum`` rows are ``summaries``).

        Args:
            query: [M, 2D] candidates' [item | category] embeddings.
            summaries: [>= (n // C) * S, d_model] top-layer KSA summary states, chunk-major.
            n: the history length.
            keys: ``keys(positions [P]) -> [P, 4D]``, the ESU keys [item | category | behaviour | gap]
                of those history events (looked up only for the chosen chunks' events).
            differentiable: keep autograd as the caller has it (AGE differentiates the output in
                ``query``; the chunk and top-k choices are discrete, as in :meth:`forward`); by
                default no graph is built.
        Returns:
            [M, heads * 4D], what :meth:`forward` returns for these candidates.
        """
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            return self._guided_search_one(query, summaries, n, keys)

    def _guided_search_one(self, query: torch.Tensor, summaries: torch.Tensor, n: int, keys) -> torch.Tensor:
        C, S = self._ksa[0].cfg.chunk, self._ksa[0].cfg.summaries
        mq = len(query)
        lengths = torch.tensor([n], device=query.device)
        q = self.w_a(query)[None]  # [1, M, d']
        m = n // C
        if m:
            gs, valid = chunk_scores(q, self.w_s(summaries[:m * S])[None], lengths // C, S)
            pos, ok = chosen_events(gs, valid, lengths, chunk=C, chunks=self.cfg.guide_chunks)
        else:
            pos, ok = chosen_events(None, None, lengths, chunk=C, chunks=self.cfg.guide_chunks, candidates=mq)
        if not bool(ok.any()):
            return query.new_zeros(mq, self.out_dim)
        uniq, inv = torch.unique(pos[ok], return_inverse=True)  # each chosen event looked up once
        z = keys(uniq)  # [U, 4D]
        kp = self.w_b(z[:, : z.shape[1] // 2])  # [U, d'] from [item | category]
        slot = torch.zeros_like(pos)
        slot[ok] = inv
        scores = torch.einsum("md,mpd->mp", q[0], kp[slot[0]])  # [M, P]
        top = self._top_k(scores[None], ok, slot)[0]  # [M, k'] rows of z, -1 = none
        mask = top >= 0
        return self.esu(z[top.clamp(min=0)] * mask[..., None], mask, query)

    # --- training losses

    def aux_loss(self, labels: torch.Tensor) -> torch.Tensor | None:
        """alpha * L_GSU (+ guide_weight * guide loss in ksa mode) of the latest training forward."""
        parts = []
        if "gsu_logit" in self._aux:
            parts.append(self.cfg.aux_weight * F.binary_cross_entropy_with_logits(self._aux["gsu_logit"], labels))
        if "guide" in self._aux:
            parts.append(self.cfg.guide_weight * self._aux["guide"])
        self._aux = {}
        return torch.stack(parts).sum() if parts else None
