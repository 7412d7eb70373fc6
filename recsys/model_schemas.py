"""Config schemas of a training run: the composed CTR model and its training (``configs/models/*.yaml``).

A run config has three sections: ``name`` (the model's name in ablation tables), ``model`` (one
block per part of the composed model; every optional block has ``enabled`` so that an ablation is
one config away) and ``train`` (the loop, optimizers and sharding). Later blocks (KSA, SIM, CAN,
AGE) add their sections to :class:`ModelConfig`.

Example:
    >>> from recsys.config import load_config
    >>> cfg = load_config(RunConfig, overrides=["model.din.max_len=50", "train.epochs=1"])
    >>> (cfg.model.din.max_len, cfg.train.embedding_optimizer, cfg.train.sharding)
    (50, 'rowwise_adagrad', 'table_wise')
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from recsys.config import Schema


class EmbeddingConfig(Schema):
    """torchrec tables: one per id feature; item and category tables serve candidates and history."""

    dim: int = Field(16, ge=1, le=1024, description="embedding dimension of every table")
    time_gap_buckets: int = Field(
        20, ge=2, le=64,
        description="log2 buckets of (cut-off - event time) in minutes: bucket b holds gaps in "
        "[2^b - 1, 2^(b+1) - 1) minutes, the last bucket everything older",
    )
    user_id: bool = Field(False, description="also embed the user id (profile); off by default: it memorises")


class DINConfig(Schema):
    """DIN target attention over the most recent ``max_len`` behaviours (Zhou et al., KDD 2018)."""

    enabled: bool = True
    max_len: int = Field(100, ge=1, description="most recent behaviours the candidate attends to")
    attention_hidden: list[int] = Field(default_factory=lambda: [64, 32], min_length=1)
    weighting: Literal["raw", "softmax"] = Field(
        "raw", description="raw: the paper's unnormalised weights (sum pooling); softmax: normalised"
    )
    count_readout: bool = Field(
        False, description="also give the head each candidate's sum of attention weights: with raw weighting a "
        "soft count of the behaviours it matches, which the pooled vector holds only mixed with their embeddings "
        "(not in the paper)",
    )
    match_counts: list[Literal["item", "category"]] = Field(
        default_factory=list, description="for each feature named, give the head log(1 + n), n the number of "
        "the last max_len behaviours whose id equals the candidate's (the out-of-vocabulary id 0 matches nothing): "
        "an explicit cross-count feature, as industrial CTR models carry beside attention (not in the paper; "
        "docs/RESULTS.md measures why DIN's attention alone does not learn this count)",
    )

    @model_validator(mode="after")
    def _count_needs_raw(self) -> DINConfig:
        if self.count_readout and self.weighting != "raw":
            raise ValueError("count_readout needs weighting raw: softmax weights always sum to 1")
        if len(set(self.match_counts)) != len(self.match_counts):
            raise ValueError(f"match_counts names a feature twice: {self.match_counts}")
        return self


class DistillConfig(Schema):
    """Self-distillation from a full-attention teacher, as the KSA recipe does (PAPERS.md §1.3(e)).

    The teacher is the same model run without summary tokens (every event attends to every earlier
    event), under no_grad. Loss = BCE + ``kl`` * KL(teacher || student click distribution)
    + ``mse`` * mean(clamp((student - teacher attention outputs)^2, 0, ``clamp``)) over layers.
    For the first ``summary_steps`` steps only summary parameters (names with ``summary``) train.
    """

    enabled: bool = False
    kl: float = Field(5.0, ge=0)
    mse: float = Field(5.0, ge=0)
    clamp: float = Field(0.1, gt=0, description="element-wise cap of the squared attention error")
    summary_steps: int = Field(200, ge=0, description="steps that train summary parameters only, before all")


class KSAConfig(Schema):
    """Kwai Summary Attention over the whole history (models/ksa.py; PAPERS.md §1)."""

    enabled: bool = False
    chunk: int = Field(8, ge=1, le=1024, description="C: events per chunk")
    summaries: int = Field(1, ge=1, le=64, description="S: summary tokens after each chunk (k = C/S)")
    window: int = Field(16, ge=0, le=4096, description="W: previous chunks whose raw events stay visible")
    wide_window: int = Field(128, ge=0, le=65536, description="raw window (chunks) of 'wide' layers")
    layers: list[Literal["summary", "wide"]] = Field(
        default_factory=lambda: ["summary", "summary"], min_length=1, max_length=12,
        description="layer kinds bottom-up; the KSA recipe is [summary, summary, summary, wide]",
    )
    d_model: int = Field(64, ge=2, le=4096)
    heads: int = Field(4, ge=1, le=64)
    mlp_ratio: int = Field(4, ge=1, le=16)
    readout_sink: bool = Field(
        False, description="add a learned key with a zero value to the read-out, so that attention can put its "
        "weight nowhere and the output can grow with how much of the history matches (softmax alone averages)",
    )
    kernel: Literal["auto", "chunked", "blocksparse", "reference"] = Field(
        "auto", description="attention kernel: auto (blocksparse on CPU, chunked elsewhere: the faster one measured "
        "on each), chunked (efficient, one masked call per block of chunks), blocksparse (efficient; the summaries a "
        "whole block sees run as mask-free tiles, a small mask covers only the near keys) or reference (dense mask; "
        "small n only)",
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _shapes(self) -> KSAConfig:
        if self.summaries > self.chunk:
            raise ValueError(f"summaries ({self.summaries}) must be <= chunk ({self.chunk}): k = C/S is at least 1")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"d_model ({self.d_model}) / heads ({self.heads}) must be an even integer (RoPE pairs)")
        if "wide" in self.layers and self.wide_window < self.window:
            raise ValueError(f"wide_window ({self.wide_window}) must be >= window ({self.window})")
        return self


class SIMConfig(Schema):
    """SIM: a General Search Unit picks K behaviours per candidate, the Exact Search Unit attends
    over them (models/sim.py; PAPERS.md §2)."""

    enabled: bool = False
    mode: Literal["hard", "soft", "ksa"] = Field(
        "hard", description="hard: same category as the candidate, through the category index; soft: top-K of "
        "(W_b e_i).(W_a e_a) over the whole history; ksa: soft scores on the events of the chunks whose KSA "
        "summaries score best (needs model.ksa.enabled)",
    )
    k: int = Field(50, ge=1, le=4096, description="K: behaviours the search keeps per candidate")
    heads: int = Field(2, ge=1, le=16, description="q: ESU attention heads (each outputs a weighted sum of z)")
    head_dim: int = Field(16, ge=1, le=256, description="dimension of each head's W_b z and W_a e_a")
    per_category: int = Field(
        200, ge=1, description="serving index: most recent positions kept per (user, category), as SIM's UBT",
    )
    search_dim: int = Field(32, ge=1, le=1024, description="soft search: dimension of W_b e_i and W_a e_a")
    aux_weight: float = Field(
        1.0, ge=0, description="alpha in alpha * L_GSU + beta * L_ESU (soft and ksa modes; hard search has none)",
    )
    aux_hidden: list[int] = Field(default_factory=lambda: [64, 32], min_length=1,
                                  description="MLP of the GSU auxiliary task on [sum_i r_i e_i | e_a]")
    guide_chunks: int = Field(16, ge=1, description="ksa mode: best-scoring chunks whose events are searched")
    guide_weight: float = Field(
        1.0, ge=0, description="ksa mode: weight of the loss that teaches summary scores to rank chunks as the "
        "soft scores of their events do (KL to the softmax over chunks of logsumexp r_i)",
    )
    score_budget: int = Field(
        4_000_000, ge=1024, description="soft and ksa modes: most padded (candidate, event) scores computed at once",
    )


#: Candidate features a co-action pair may take as its induction side (they parameterise the micro-MLP).
InductionFeature = Literal["item", "category", "brand", "price_bucket"]
#: User-side features a pair may feed: the history's ids (one input per step) or a profile feature.
FeedFeature = Literal["history.item", "history.category", "history.behavior", "profile.segment", "profile.age_bucket"]


class CoActionPair(Schema):
    """One feature pair: the candidate's ``induction`` feature acting on the user-side ``feed`` feature."""

    induction: InductionFeature
    feed: FeedFeature

    @property
    def label(self) -> str:
        return f"{self.induction} x {self.feed}"


def _default_pairs() -> list[CoActionPair]:
    return [CoActionPair(induction="item", feed="history.item"),
            CoActionPair(induction="category", feed="history.category")]


def _unique_pairs(pairs: list[CoActionPair], where: str) -> None:
    seen = set()
    for p in pairs:
        if (p.induction, p.feed) in seen:
            raise ValueError(f"{where}.pairs lists {p.label} twice")
        seen.add((p.induction, p.feed))


def micro_mlp_size(shapes: list[tuple[int, int]], bias: bool) -> int:
    """Values of one micro-MLP's induction vector: sum over layers of d_in*d_out (+ d_out with bias)."""
    return sum(i * o + (o if bias else 0) for i, o in shapes)


class CANConfig(Schema):
    """CAN co-action units (models/can.py; PAPERS.md §3): per pair, the candidate's induction vector
    becomes a micro-MLP applied to the feed feature (each history step, masked, then summed).

    The defaults are the official code's: the two same-type pairs, micro-MLP 16 -> 8 -> 4 without
    bias (D' = 16*8 + 8*4 = 160, D = 16), orders 1..3 concatenated, parameter independence only.
    """

    enabled: bool = False
    pairs: list[CoActionPair] = Field(default_factory=_default_pairs, min_length=1)
    mlp: list[int] = Field(
        default_factory=lambda: [16, 8, 4], min_length=2, max_length=6,
        description="micro-MLP widths: the feed size D, then each layer's output (tanh between layers)",
    )
    bias: bool = Field(False, description="micro-MLP layers have a bias (the official code has none)")
    orders: int = Field(3, ge=1, le=8, description="C: feed vectors raised element-wise to powers 1..C, outputs concatenated")
    induction_dim: int | None = Field(
        None, ge=1, description="D': size of an induction vector; must equal sum over layers of d_in*d_out (+ d_out "
        "with bias). Leave unset to derive it from mlp",
    )
    order_independent: bool = Field(False, description="a separate micro-MLP per order (induction vectors C times longer)")
    combination_independent: bool = Field(
        False, description="a separate induction slice per pair an induction feature takes part in, and a separate "
        "feed slice per pair a feed feature takes part in (PAPERS.md §3.1, level 2)",
    )
    max_len: int = Field(100, ge=1, description="most recent history steps a history pair reads")
    init_std: float = Field(0.01, gt=0, description="std of the uniform init of the co-action tables (paper: 0.01)")
    missing: Literal["error", "skip"] = Field(
        "error", description="a pair whose feature the data lacks (brand or a profile feature on Taobao or Amazon "
        "data): error, or skip: leave the pair out with a note, so that one config runs on every source (at least "
        "one pair must remain)",
    )

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        return list(zip(self.mlp[:-1], self.mlp[1:], strict=True))

    @property
    def mlp_size(self) -> int:
        """Parameters of one micro-MLP: sum of d_in*d_out (+ d_out with bias)."""
        return micro_mlp_size(self.layer_shapes, self.bias)

    @property
    def out_dim(self) -> int:
        """Output per pair: orders x the widths of all layers."""
        return self.orders * sum(self.mlp[1:])

    @model_validator(mode="after")
    def _shapes(self) -> CANConfig:
        if self.induction_dim is not None and self.induction_dim != self.mlp_size:
            shape = " -> ".join(map(str, self.mlp))
            terms = " + ".join(f"{i}*{o}" + (f" + {o}" if self.bias else "") for i, o in self.layer_shapes)
            raise ValueError(f"model.can.induction_dim ({self.induction_dim}) does not fit the micro-MLP {shape} "
                             f"{'with' if self.bias else 'without'} bias, which needs {self.mlp_size} = {terms}")
        _unique_pairs(self.pairs, "model.can")
        return self


class CartesianConfig(Schema):
    """The Cartesian-product baseline CAN is compared with: one id per (candidate value, feed value)
    of each pair, embedded in its own torchrec table (hashed when the product of the two
    vocabularies exceeds ``rows``) and summed over history steps."""

    enabled: bool = False
    pairs: list[CoActionPair] = Field(default_factory=_default_pairs, min_length=1)
    dim: int = Field(16, ge=1, le=1024, description="embedding dimension of the cross-id tables")
    rows: int = Field(
        2_097_152, ge=16, description="rows per pair: exact ids when |induction| * |feed| fits, else hashed into this many",
    )
    max_len: int = Field(100, ge=1, description="most recent history steps a history pair crosses")

    @model_validator(mode="after")
    def _pairs(self) -> CartesianConfig:
        _unique_pairs(self.pairs, "model.cartesian")
        return self


class AGEConfig(Schema):
    """AGE's dynamic gating unit (models/age.py; PAPERS.md §4.1, Eqs. 15–17): a shallow network on the
    candidate's item features, trained beside the model with its own BCE on stop-gradient embeddings.
    The backbone's training is unchanged; exploration itself is a scoring-time policy (ExploreConfig)."""

    gate: bool = Field(False, description="train the gate (estimates an item's average CTR from its features alone)")
    gate_hidden: list[int] = Field(default_factory=lambda: [64, 32], min_length=1, max_length=4,
                                   description="the gate's hidden layers (the paper: a 2-layer MLP)")
    gate_features: list[InductionFeature] | None = Field(
        None, description="candidate features the gate reads (None: every item feature the data has)",
    )


class ExploreConfig(Schema):
    """An exploration policy of AGE (models/age.py; PAPERS.md §4): ŷ_e = f(h + σ·Δh | θ) with
    ‖Δh‖ ≤ λ·|δ_y|, δ_y from MC-dropout on the dense parameters, Δh along the normalised gradient.

    The defaults are the paper's where it gives one (λ = 1e-3, dropout 0.01, N = 20, PGD, impressions
    below 3,000); ``pgd_steps``, ``pgd_step_scale`` and ``spread`` are ours (the paper is silent).
    """

    form: Literal["ts", "ucb"] = Field(
        "ts", description="ts: δ_y = f(h|θ⊙M) − f(h|θ), one signed dropout sample (Eq. 13); ucb: the spread of "
        "`samples` dropout predictions around f(h|θ) (Eq. 12)",
    )
    attack: Literal["pgd", "fgm"] = Field("pgd", description="fgm: one step along ḡ (Eq. 8); pgd: projected steps (Eq. 14)")
    lam: float = Field(1e-3, ge=0, description="λ: the perturbation radius is λ·|δ_y| (paper: 1e-3 offline, 2e-3 online)")
    dropout: float = Field(0.01, ge=0, lt=1, description="MC-dropout rate on the dense parameters θ (paper: 0.01)")
    samples: int = Field(20, ge=1, le=1000, description="N: dropout samples of the ucb form (paper: 20)")
    spread: Literal["std", "var"] = Field(
        "std", description="ucb form: the standard deviation (default) or the variance of the N samples around f(h|θ)",
    )
    pgd_steps: int = Field(3, ge=1, le=100, description="T: PGD steps (not in the paper)")
    pgd_step_scale: float = Field(
        2.5, gt=0, description="each PGD step moves pgd_step_scale · radius / T before the projection (Madry et al.'s "
        "2.5ε/T; not in the paper)",
    )
    perturb: list[str] = Field(
        default_factory=lambda: ["item"], min_length=1,
        description="candidate embeddings moved: candidate features (item, category, brand, price_bucket) or extra "
        "tables read by candidate (e.g. can_induce_item)",
    )
    gate: Literal["learned", "none", "fixed"] = Field(
        "learned", description="learned: σ = 1 where f(h|θ) > the gate's estimate (needs model.age.gate); none: σ = 1; "
        "fixed: σ = 1 where f(h|θ) > gate_threshold",
    )
    gate_threshold: float = Field(0.01, ge=0, le=1, description="the fixed gate's threshold (Table 2 tries 0.005–0.02)")
    impression_threshold: int = Field(
        3000, ge=0, description="only items with fewer impressions are explored (paper: 3,000)",
    )
    uncertainty: Literal["dropout", "noise"] = Field(
        "dropout", description="noise: δ_y ~ N(0, noise_std²) instead of MC-dropout (the paper's 'w/o δ_y' ablation)",
    )
    noise_std: float = Field(0.01, gt=0, description="std of δ_y under uncertainty=noise")
    direction: Literal["gradient", "random"] = Field(
        "gradient", description="random: one step along a random unit direction instead of ḡ (the paper's 'w/o ḡ' ablation)",
    )


class HeadConfig(Schema):
    """The MLP over [profile, candidate, block outputs] that gives one logit per candidate."""

    hidden: list[int] = Field(default_factory=lambda: [200, 80], min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class ModelConfig(Schema):
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    din: DINConfig = Field(default_factory=DINConfig)
    ksa: KSAConfig = Field(default_factory=KSAConfig)
    sim: SIMConfig = Field(default_factory=SIMConfig)
    can: CANConfig = Field(default_factory=CANConfig)
    cartesian: CartesianConfig = Field(default_factory=CartesianConfig)
    age: AGEConfig = Field(default_factory=AGEConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)

    @model_validator(mode="after")
    def _sim_needs_ksa(self) -> ModelConfig:
        if self.sim.enabled and self.sim.mode == "ksa" and not self.ksa.enabled:
            raise ValueError("model.sim.mode 'ksa' searches with the KSA summaries: set model.ksa.enabled=true")
        if self.sim.enabled and self.sim.k > self.sim.per_category and self.sim.mode == "hard":
            raise ValueError(f"model.sim.k ({self.sim.k}) must be <= model.sim.per_category ({self.sim.per_category}): "
                             "hard search reads at most per_category behaviours of a category")
        return self


ShardingType = Literal["table_wise", "row_wise", "column_wise", "data_parallel"]


class TrainConfig(Schema):
    """The per-worker loop (pipelines/train.py): the same with ``--workers 0`` and under Ray Train."""

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(128, ge=1, description="requests per step and worker (each has M candidates)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the dense parameters")
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = Field(
        "rowwise_adagrad", description="fused optimizer of the sharded tables (Adam is GPU-only for them)"
    )
    embedding_lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty of the dense parameters (Adam's weight_decay)")
    embedding_weight_decay: float = Field(
        0.0, ge=0, description="L2 penalty of the embedding rows a batch touches, applied by fbgemm's rowwise_adagrad "
        "(weight_decay_mode L2) to those rows only: the DIN paper's mini-batch aware regularisation, without its "
        "1/n_j frequency factor (docs/TRAINING.md); rowwise_adagrad only",
    )
    sharding: ShardingType = Field(
        "table_wise", description="sharding type the planner may use for every table (see docs/TRAINING.md)"
    )
    table_sharding: dict[str, ShardingType] = Field(
        default_factory=dict, description="per-table sharding types that replace `sharding` for those tables, e.g. "
        "{item: row_wise} to split the item table's rows over the workers (a table bigger than one worker); the "
        "names are the model's tables (train.log's plan lists them); on CPU row_wise runs for the sequence tables "
        "(item, category, CAN's can_induce_*) but not the pooled profile_* tables (docs/TRAINING.md)",
    )
    seed: int = Field(0, ge=0)
    shuffle: bool = Field(True, description="shuffle training requests every epoch")
    batch_by: Literal["request", "user"] = Field(
        "request", description="request: batches of shuffled requests; user: shuffled users, each user's "
        "requests together (a model that encodes whole histories encodes each user once per batch)",
    )
    log_every: int = Field(20, ge=1, description="progress line every this many steps")
    eval_every_epoch: bool = Field(True, description="valid-split metrics in metrics.jsonl after each epoch")
    select_by: Literal["valid_auc", "valid_logloss", "last"] = Field(
        "valid_auc", description="which epoch's checkpoint the run keeps as its model (run.json `checkpoint`, "
        "what evaluate and export use): the best by the valid split's AUC or logloss, or the last; the valid "
        "split only, never test. Without eval_every_epoch there are no valid metrics and the last is kept",
    )
    early_stop: int = Field(
        0, ge=0, description="stop when select_by's valid metric has not improved for this many epochs (0: off; "
        "needs eval_every_epoch and a select_by other than last)",
    )
    max_steps: int | None = Field(
        None, ge=1, description="end each epoch after this many steps of every worker (None: the whole training "
        "split); for quick runs and throughput measurements, such as the scaling figures of docs/BENCHMARKS.md",
    )
    max_history_events: int | None = Field(
        None, ge=1, description="the most history events a step carries, summed over its requests (each counted up to "
        "the model's history length; where the model reads whole histories (KSA), each user's longest once, as it "
        "is encoded once for all their requests): a batch over it is cut into consecutive smaller steps (a request, "
        "or with whole histories a user's requests, alone over it is a step of its own). Bounds a step's memory "
        "where whole histories are read and users have long ones (ksa.yaml, sim_ksa.yaml and full.yaml set 100000, "
        "docs/TRAINING.md); None: batch_size requests whatever their histories",
    )
    checkpoint_every: int = Field(
        0, ge=0, description="also save a resumable checkpoint every this many steps within an epoch (0: at epoch "
        "ends only); on Ray with ray_order stream a mid-epoch state resumes at the step it reached but in a new "
        "order (Ray Data's is not reproducible), with ray_order seeded exactly where it stopped",
    )
    ray_order: Literal["stream", "seeded"] = Field(
        "stream", description="how Ray workers get their batches: stream: Ray Data's streaming split of the train "
        "split (each worker reads only its share; the order cannot be replayed); seeded: every worker reads the "
        "split and takes every W-th batch of the in-process order of (seed, epoch) (each worker reads the whole "
        "split; a resumed or restarted run goes on with exactly the batches it had left)",
    )
    max_failures: int = Field(
        2, ge=-1, description="on Ray: how many times a run whose worker died (kill -9, out of memory, a lost node) "
        "is restarted from its last resumable state (Ray Train's FailureConfig; -1: no limit, 0: never); an "
        "error of ours (bad data, a diverging loss) is not retried",
    )
    history_dropout: float = Field(
        0.05, ge=0, lt=1, description="share of training requests whose history is emptied each epoch, chosen by a "
        "hash of (seed, epoch, request_id), so that the model learns what to predict for a user without history "
        "(features.requests.drop_histories; docs/TRAINING.md, cold start)",
    )
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per worker (default: the machine's cores / workers); 1 makes "
        "a CPU run bit-reproducible: with more, fbgemm's embedding backward can sum in an order that depends on "
        "thread timing, which changes the last bits of the weights (docs/TRAINING.md, resuming)",
    )


    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.embedding_weight_decay and self.embedding_optimizer != "rowwise_adagrad":
            raise ValueError(f"embedding_weight_decay needs embedding_optimizer rowwise_adagrad (fbgemm applies an L2 "
                             f"penalty with that optimizer only), not {self.embedding_optimizer}")
        if self.early_stop and (self.select_by == "last" or not self.eval_every_epoch):
            raise ValueError("early_stop needs valid metrics to watch: eval_every_epoch true and select_by "
                             "valid_logloss or valid_auc")
        return self


class RunConfig(Schema):
    """A model config file: ``configs/models/NAME.yaml``."""

    name: str = Field("din", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
