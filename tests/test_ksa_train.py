"""KSA in training: user-grouped batches, self-distillation's warm-up, training in process and on Ray,
export and serving of a KSA model."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from features.history import HistoryStore
from models.batch import FeatureSpec, batch_from_requests
from models.ctr import build_model
from recsys.config import load_config
from recsys.model_schemas import RunConfig
from tests.conftest import ROOT, run_cli

KSA = ROOT / "configs" / "models" / "ksa.yaml"
SIM_KSA = ROOT / "configs" / "models" / "sim_ksa.yaml"
#: A KSA model small enough to train on the tiny world in seconds.
SMALL = ["model.embedding.dim=8", "model.din.max_len=20", "model.ksa.d_model=16", "model.ksa.heads=2",
         "model.ksa.window=2", "model.head.hidden=[32,16]"]


def _spec(data):
    dataset = json.loads((data / "dataset.json").read_text())
    return FeatureSpec.from_dataset(dataset, time_gap_buckets=20, use_user_id=False)


def test_user_batches_keep_each_users_requests_together_in_time_order(tiny_data):
    from pipelines.train import _train_batches

    cfg = load_config(RunConfig, KSA, ["train.batch_size=16"])

    class FakeRun:  # only what _train_batches reads
        config = cfg
        data_dir = tiny_data
        history_len = None  # whole histories

    orders = []
    for epoch in (1, 2):
        tables = list(_train_batches({"source": "local"}, FakeRun(), epoch))
        users = np.concatenate([t.column("user").to_numpy() for t in tables])
        times = np.concatenate([t.column("timestamp").to_numpy() for t in tables])
        change = np.r_[True, users[1:] != users[:-1]]
        assert len(np.unique(users)) == change.sum()  # every user's requests are one contiguous run
        same = ~change
        assert (times[1:][same[1:]] >= times[:-1][same[1:]]).all()  # oldest first within a user
        assert len(users) == pq.read_metadata(tiny_data / "requests" / "train.parquet").num_rows
        orders.append(users[change])
    assert not np.array_equal(orders[0], orders[1])  # users are reshuffled every epoch


def test_distillation_warm_up_trains_summary_parameters_only(tiny_data):
    from pipelines.train import Distiller

    cfg = load_config(RunConfig, KSA, [*SMALL, "model.ksa.distill.enabled=true", "model.ksa.distill.summary_steps=1"])
    spec = _spec(tiny_data)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    table = pq.read_table(tiny_data / "requests" / "train.parquet").slice(0, 16)
    batch = batch_from_requests(spec, table, store, max_history=None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    distill = Distiller.of(model, cfg)
    loss = distill.step(model, batch, torch.nn.BCEWithLogitsLoss(), step=0)
    opt.step()
    assert torch.isfinite(loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("summary" in n for n in changed), sorted(changed)
    assert "blocks.ksa.encoder.summary_embedding" in changed
    # after the warm-up every parameter learns, embedding tables included
    opt.zero_grad()
    distill.step(model, batch, torch.nn.BCEWithLogitsLoss(), step=1)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("embeddings.") for n in changed) and any("readout" in n for n in changed)


def test_distillation_trains_a_model_with_the_ksa_guided_sim_search(tiny_data):
    """The full-attention teacher has no summaries to guide SIM's search: it searches exactly (soft)."""
    from pipelines.train import Distiller

    dc = "model.ksa.distill"
    cfg = load_config(RunConfig, SIM_KSA, [*SMALL, "model.sim.k=10", "model.sim.guide_chunks=1",
                                           f"{dc}.enabled=true", f"{dc}.summary_steps=0"])
    spec = _spec(tiny_data)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec).train()
    store = HistoryStore.open(tiny_data / "history" / "history.arrow")
    table = pq.read_table(tiny_data / "requests" / "train.parquet").slice(0, 16)
    batch = batch_from_requests(spec, table, store, max_history=None)
    hoff = model.embeddings(batch).hist_offsets
    assert int((hoff[1:] - hoff[:-1]).max()) > 3 * 8  # past one guided chunk and the raw window
    sim, ksa = model.blocks["sim"], model.blocks["ksa"]
    ksa.kernel = "full"
    with torch.no_grad():  # the teacher's forward alone: its search is the soft search
        teacher = model(batch)
        teacher_att = [a.clone() for a in ksa.last.attention]
        sim.mode = "soft"
        torch.testing.assert_close(model(batch), teacher, atol=0, rtol=0)
        sim.mode = "ksa"
    ksa.kernel = cfg.model.ksa.kernel
    loss = Distiller.of(model, cfg).step(model, batch, torch.nn.BCEWithLogitsLoss(), step=0)
    assert torch.isfinite(loss) and (ksa.kernel, ksa.record) == (cfg.model.ksa.kernel, True)  # restored for SIM
    assert sim.w_s.weight.grad.abs().sum() > 0  # the guide loss still trains the summary projection
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    dcfg = cfg.model.ksa.distill

    def grads(kl_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The documented loss BCE + SIM's aux + kl KL(teacher || student) + mse MSE(attention), and its gradients."""
        model.zero_grad()
        logits = model(batch)
        p_t, log_s, log_1s = torch.sigmoid(teacher), F.logsigmoid(logits), F.logsigmoid(-logits)
        kl = (p_t * (p_t.log() - log_s) + (1 - p_t) * ((1 - p_t).log() - log_1s)).mean()
        mse = torch.stack([((s - t) ** 2).clamp(max=dcfg.clamp).mean() for s, t in zip(ksa.last.attention, teacher_att, strict=True)]).mean()
        total = F.binary_cross_entropy_with_logits(logits, batch.labels) + model.aux_loss(batch.labels) + kl_weight * kl + dcfg.mse * mse
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = grads(dcfg.kl)
    torch.testing.assert_close(loss.detach(), want_loss, atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)
    # the teacher's KL reaches the student: without it the head's gradient differs, by over 10x the tolerance above
    _, without_kl = grads(0.0)
    assert (got["head.layers.4.weight"] - without_kl["head.layers.4.weight"]).abs().max() > 1e-5


def test_the_teacher_is_full_attention_over_the_same_layers():
    """With a window wider than any history, summaries are never visible: KSA = the full teacher."""
    from models.ksa import KSAEncoder
    from recsys.model_schemas import KSAConfig

    cfg = KSAConfig(enabled=True, chunk=4, window=50, d_model=8, heads=2)
    torch.manual_seed(0)
    enc = KSAEncoder(cfg=cfg).double()
    x = torch.randn(150, 8, dtype=torch.float64)
    lengths = np.array([100, 0, 50])
    torch.testing.assert_close(enc(x, lengths, kernel="full").events, enc(x, lengths, kernel="chunked").events)
    narrow = KSAEncoder(cfg=KSAConfig(enabled=True, chunk=4, window=2, d_model=8, heads=2)).double()
    narrow.load_state_dict(enc.state_dict())
    assert not torch.allclose(narrow(x, lengths, kernel="full").events, narrow(x, lengths, kernel="chunked").events)


@pytest.mark.slow
def test_ksa_trains_with_distillation_exports_and_serves_its_eval_scores(tiny_data, tmp_path):
    run = tmp_path / "run"
    sets = [a for s in [*SMALL, "train.epochs=1", "model.ksa.distill.enabled=true", "model.ksa.distill.summary_steps=3"]
            for a in ("--set", s)]
    r = run_cli("--quiet", "train", "--config", str(KSA), "--data", str(tiny_data), "--out", str(run), "--workers", "0", *sets)
    assert r.returncode == 0, r.stderr
    epoch = json.loads((run / "metrics.jsonl").read_text())
    assert epoch["valid"]["examples"] > 0 and np.isfinite(epoch["train_loss"])
    assert json.loads((run / "run.json").read_text())["history_len"] is None  # whole histories
    r = run_cli("eval", "--run", str(run), "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    from pipelines.demo import _score_over_http

    r = run_cli("export", "--run", str(run), "--out", str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr
    served = _score_over_http(tmp_path / "export", tiny_data, run / "eval" / "test-scores.parquet", 4)
    assert served["requests"] == 4 and served["max_abs_diff"] <= 1e-5


@pytest.mark.slow
def test_ksa_trains_on_ray_with_user_batches(tiny_data, tmp_path):
    from pipelines.train import train

    cfg = load_config(RunConfig, KSA, [*SMALL, "train.epochs=1"])
    run = train(cfg, tiny_data, tmp_path / "run", workers=2)
    epoch = json.loads((run.path / "metrics.jsonl").read_text())
    n_train = sum(len(x) for x in pq.read_table(tiny_data / "requests" / "train.parquet").column("item").to_pylist())
    # every candidate at most once across both workers; the ranks stop together when one runs out
    assert 0.9 * n_train < epoch["examples"] <= n_train
    assert 0 < epoch["valid"]["auc"] < 1
