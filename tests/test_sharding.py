"""torchrec sharding on CPU with 2 gloo processes: the sharded model computes what the plain model
computes, and the gathered checkpoint is the full model (no Ray here: torch.multiprocessing)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

#: CAN's co-action tables (dims 160 and 16) and the Cartesian tables (hashed and exact) as well.
CROSSES = ["model.can.enabled=true", "model.can.max_len=20", "model.can.pairs=[{induction: item, feed: history.item}, "
           "{induction: brand, feed: profile.segment}]", "model.cartesian.enabled=true", "model.cartesian.max_len=20",
           "model.cartesian.rows=4096", "model.cartesian.pairs=[{induction: category, feed: history.category}, "
           "{induction: brand, feed: profile.segment}]"]


def _worker(rank: int, world: int, store_file: str, data_dir: str, sharding: str, out: str, extra: tuple[str, ...] = (),
            same_init: bool = False) -> None:
    """Two real updates on a sharded model; rank 0 compares its logits with the gathered plain model's
    and writes the result (and the full state). ``same_init``: the sharded tables start from the
    plain model's init (DMP initialises each shard on its rank, so two plans start apart)."""
    import datetime as dt

    import pyarrow.parquet as pq
    import torch.distributed as dist

    from features.history import HistoryStore
    from models.batch import FeatureSpec, batch_from_requests
    from models.ctr import build_model
    from pipelines.distributed import describe_plan, full_state_dict, load_full_state, shard
    from recsys.config import load_config
    from recsys.model_schemas import RunConfig

    # A file rendezvous: no port to pick, so nothing to collide with on a busy machine.
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=dt.timedelta(seconds=120))
    try:
        cfg = load_config(RunConfig, overrides=[f"train.sharding={sharding}", "model.din.max_len=20", *extra])
        dataset = json.loads(open(f"{data_dir}/dataset.json").read())
        spec = FeatureSpec.from_dataset(dataset, time_gap_buckets=20, use_user_id=False)
        store = HistoryStore.open(f"{data_dir}/history/history.arrow")
        table = pq.read_table(f"{data_dir}/requests/train.parquet")
        torch.manual_seed(0)
        model = build_model(cfg.model, spec)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        dmp, optimizer = shard(model, cfg.train, torch.device("cpu"))
        if same_init:
            load_full_state(dmp, optimizer, init, None)
        for step in range(2):  # a couple of real updates, so the tables are not at their init
            b = batch_from_requests(spec, table.slice((2 * step + rank) * 8, 8), store, max_history=20)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(b), b.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probe = batch_from_requests(spec, table.slice(100 + rank * 8, 8), store, max_history=20)
        dmp.eval()
        with torch.no_grad():
            logits = dmp(probe)
        state = full_state_dict(dmp)
        gathered = [None] * world
        dist.all_gather_object(gathered, logits)
        if rank == 0:
            plain = build_model(cfg.model, spec).eval()
            plain.load_state_dict(state)
            with torch.no_grad():
                again = [plain(batch_from_requests(spec, table.slice(100 + r * 8, 8), store, max_history=20))
                         for r in range(world)]
            diff = max(float((a - b).abs().max()) for a, b in zip(gathered, again, strict=True))
            plan = str(dmp.plan)
            torch.save(state, f"{out}.state.pt")
            with open(out, "w") as f:
                json.dump({"max_abs_diff": diff, "plan": plan, "described": describe_plan(dmp)}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(("sharding", "crosses"), [("table_wise", False), ("column_wise", False), ("table_wise", True)])
def test_sharded_model_equals_the_gathered_plain_model(tiny_data, tmp_path, sharding, crosses):
    out = tmp_path / "result.json"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tiny_data), sharding, str(out), tuple(CROSSES) if crosses else ()),
             nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert sharding in result["plan"]
    assert "rank:1" in result["plan"]  # both ranks hold tables (it really is sharded)
    if crosses:
        assert "can_induce_item" in result["plan"] and "cart_category_x_hist_category" in result["plan"]
    # exact up to float summation order; a feature-order mix-up (e.g. a sharded EBC returning its
    # keys grouped by rank) shows up here as differences of 1e-3 and more
    assert result["max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_an_item_table_split_by_rows_over_two_workers_trains_to_the_same_model(tiny_data, tmp_path):
    """train.table_sharding {item: row_wise}: the item table's rows are split over the 2 ranks (the
    plan says which rows each holds), the model computes what the plain model computes, and after
    the same steps its full state dict equals that of the same training with every table whole on
    one rank (table_wise)."""
    results = {}
    for name, extra in (("rows", ("train.table_sharding={item: row_wise}",)), ("whole", ())):
        out = tmp_path / f"{name}.json"
        mp.spawn(_worker, args=(2, str(tmp_path / f"rendezvous-{name}"), str(tiny_data), "table_wise", str(out), extra,
                                True), nprocs=2, join=True)
        results[name] = (json.loads(out.read_text()), torch.load(f"{out}.state.pt", weights_only=True))
    (rows, split), (_, whole) = results["rows"], results["whole"]
    item = next(line for line in rows["described"] if line.startswith("item ("))
    assert ": row_wise, rank 0 rows 0-" in item and ", rank 1 rows " in item, item
    assert all("row_wise" not in line for line in rows["described"] if not line.startswith("item ("))
    assert rows["described"][-1].startswith("bytes per rank") and "rank 1" in rows["described"][-1]
    assert rows["max_abs_diff"] < 1e-5
    assert sorted(split) == sorted(whole)
    differ = {k: float((split[k] - whole[k]).abs().max()) for k in split if not torch.allclose(split[k], whole[k],
                                                                                                 rtol=0, atol=1e-6)}
    assert not differ, differ


@pytest.mark.parametrize(("table_sharding", "message"), [
    ("{nope: row_wise}", "train.table_sharding names nope: not a table of this model (its tables: behavior, brand, "
                         "category, item,"),
    ("{profile_segment: row_wise}", "train.table_sharding.profile_segment: row_wise for the pooled table "
                                    "profile_segment has no CPU kernel"),
])
def test_table_sharding_that_cannot_run_is_refused_with_the_tables_named(tiny_data, tmp_path, table_sharding, message):
    from tests.conftest import ROOT, run_cli

    r = run_cli("train", "--config", str(ROOT / "configs" / "models" / "din.yaml"), "--data", str(tiny_data),
                "--out", str(tmp_path / "run"), "--workers", "0", "--set", f"train.table_sharding={table_sharding}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
