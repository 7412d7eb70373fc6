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


#: Every configuration the tests below check, by name: (train.sharding, more overrides, same_init).
#: One spawn of 2 processes computes them all (a spawn costs each process the import of torch and
#: torchrec and the gloo set-up: most of a configuration's time).
CASES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "table_wise": ("table_wise", (), False),
    "column_wise": ("column_wise", (), False),
    "table_wise+crosses": ("table_wise", tuple(CROSSES), False),
    "rows": ("table_wise", ("train.table_sharding={item: row_wise}",), True),
    "whole": ("table_wise", (), True),
}


def _worker(rank: int, world: int, store_file: str, data_dir: str, out_dir: str) -> None:
    """Every configuration of :data:`CASES` in turn, in one process group: two real updates on a
    sharded model; rank 0 compares its logits with the gathered plain model's and writes the result
    (``OUT_DIR/NAME.json``) and the full state (``OUT_DIR/NAME.json.state.pt``). ``same_init``: the
    sharded tables start from the plain model's init (DMP initialises each shard on its rank, so two
    plans start apart)."""
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
        dataset = json.loads(open(f"{data_dir}/dataset.json").read())
        spec = FeatureSpec.from_dataset(dataset, time_gap_buckets=20, use_user_id=False)
        store = HistoryStore.open(f"{data_dir}/history/history.arrow")
        table = pq.read_table(f"{data_dir}/requests/train.parquet")
        for name, (sharding, extra, same_init) in CASES.items():
            cfg = load_config(RunConfig, overrides=[f"train.sharding={sharding}", "model.din.max_len=20", *extra])
            torch.manual_seed(0)  # every configuration from the same seed, whatever ran before it
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
                out = f"{out_dir}/{name}.json"
                torch.save(state, f"{out}.state.pt")
                with open(out, "w") as f:
                    json.dump({"max_abs_diff": diff, "plan": str(dmp.plan), "described": describe_plan(dmp)}, f)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tiny_data, tmp_path_factory) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """Each configuration's result and gathered full state, by name (:data:`CASES`)."""
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(tiny_data), str(out)), nprocs=2, join=True)
    return {name: (json.loads((out / f"{name}.json").read_text()),
                   torch.load(out / f"{name}.json.state.pt", weights_only=True)) for name in CASES}


@pytest.mark.slow
@pytest.mark.parametrize(("sharding", "crosses"), [("table_wise", False), ("column_wise", False), ("table_wise", True)])
def test_sharded_model_equals_the_gathered_plain_model(sharded, sharding, crosses):
    result, _ = sharded[f"{sharding}+crosses" if crosses else sharding]
    assert sharding in result["plan"]
    assert "rank:1" in result["plan"]  # both ranks hold tables (it really is sharded)
    if crosses:
        assert "can_induce_item" in result["plan"] and "cart_category_x_hist_category" in result["plan"]
    # exact up to float summation order; a feature-order mix-up (e.g. a sharded EBC returning its
    # keys grouped by rank) shows up here as differences of 1e-3 and more
    assert result["max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_an_item_table_split_by_rows_over_two_workers_trains_to_the_same_model(sharded):
    """train.table_sharding {item: row_wise}: the item table's rows are split over the 2 ranks (the
    plan says which rows each holds), the model computes what the plain model computes, and after
    the same steps its full state dict equals that of the same training with every table whole on
    one rank (table_wise)."""
    (rows, split), (_, whole) = sharded["rows"], sharded["whole"]
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
