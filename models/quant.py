"""Quantized embedding lookups for serving: a model's torchrec tables as ``torchrec.quant`` modules.

:func:`quantize_embeddings` converts, in place, every collection that
:class:`models.embedding.FeatureEmbeddings` owns: ``sequence`` (the ``EmbeddingCollection`` of item,
category, behavior, time_gap, brand, price_bucket), ``pooled`` (the ``EmbeddingBagCollection`` of
the profile features, when the data has any) and each collection of ``extra`` (the tables blocks ask
for: CAN's co-action rows, the Cartesian baseline's crosses). Only the tables change: the blocks,
the head and the AGE gate stay fp32, and the quantized lookups still return float32 in the same
types (a dict of ``JaggedTensor`` from an EC, a ``KeyedTensor`` from an EBC), so
``FeatureEmbeddings.forward`` runs unchanged. They run on the CPU through fbgemm-gpu-cpu; a
quantized model serves (eval mode), it does not train.

Precisions (:data:`PRECISIONS`):

* ``fp32``: the trained tables as they are.
* ``fp16``: every value a half float.
* ``int8``, ``int4``: row-wise. Row r keeps unsigned integers q in [0, 2^bits) and its own scale
  s_r = (max_r - min_r) / (2^bits - 1) and bias b_r = min_r (two fp16 numbers stored in the row);
  a lookup returns ``s_r * q + b_r``, so each value is off by at most s_r / 2.

Rows are packed without padding (``row_alignment=1``, fbgemm's own default on the CPU, where these
lookups run). torchrec's default, 16 bytes, is the GPU kernels' alignment: at 16 values it pads an
int8 row (16 + 4 bytes) to 32, the size of an fp16 row, so a narrow table would save no more in
int8 than in fp16. The lookups return the same values at either alignment (tested); only the
padding differs. Bytes per row as :func:`table_bytes` measures them (the buffer the lookup kernel
reads; int rows include the 4 bytes of scale and bias)::

    row width              fp32   fp16   int8   int4
    16 (item, category)      64     32     20     12    int8: 16 + 4, int4: 8 + 4
    160 (CAN induction)     640    320    164     84    int8: 160 + 4, int4: 80 + 4
    (at row_alignment=16:                  32     16    for 16 wide; 176 and 96 for 160 wide)

So int8 keeps 31% of a 16-wide table and 26% of a 160-wide one; int4 19% and 13%. (torchrec's
state dict shows an int4 table as a ``UInt4Tensor`` twice the real width: 32 bytes a row at dim 16
with 16-byte alignment, the figure STACK.md quotes; the buffer holds 16.)

A model is quantized once: converting a quantized model to another precision is refused (the fp32
rows are gone); load the export again instead.

Example:
    >>> from models.batch import FeatureSpec
    >>> from models.ctr import build_model
    >>> from recsys.config import load_config
    >>> from recsys.model_schemas import RunConfig
    >>> cfg = load_config(RunConfig, overrides=["name=doc", "model.embedding.dim=16"])
    >>> model = build_model(cfg.model, FeatureSpec(sizes={"item": 1000, "category": 20})).eval()
    >>> table_bytes(model)["item"], precision_of(model)
    (64000, 'fp32')
    >>> model = quantize_embeddings(model, "int8")
    >>> table_bytes(model)["item"], precision_of(model)
    (20000, 'int8')
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torchrec
import torchrec.quant.embedding_modules as quant
from torch import nn
from torch.ao.quantization import PlaceholderObserver, QConfig
from torchrec.modules.embedding_configs import DataType

from recsys.types import EMBEDDING_PRECISIONS

#: The precisions a model's tables can be served at (``recsys serve --embeddings``).
PRECISIONS: tuple[str, ...] = EMBEDDING_PRECISIONS
#: The default: the tables as trained.
DEFAULT_PRECISION = "fp32"
#: Bytes a quantized row is padded to a multiple of: 1 (none), fbgemm's default on the CPU.
ROW_ALIGNMENT = 1
_WEIGHT_DTYPE = {"fp16": torch.float16, "int8": torch.qint8, "int4": torch.quint4x2}
_OF_DATA_TYPE = {DataType.FP16: "fp16", DataType.INT8: "int8", DataType.INT4: "int4"}


def check_precision(value: object, where: str = "precision") -> str:
    """``value`` if it is one of :data:`PRECISIONS`.

    Raises:
        ValueError: naming ``where``, the value and the allowed ones.
    """
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{where}: {value!r} is not a precision; expected one of {', '.join(PRECISIONS)}")
    return value


def _collections(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(owner, attribute or key, collection) of every torchrec collection of ``model.embeddings``."""
    emb = model.embeddings
    yield emb, "sequence", emb.sequence
    if emb.pooled is not None:
        yield emb, "pooled", emb.pooled
    if emb.extra is not None:
        for key, collection in emb.extra.items():
            yield emb.extra, key, collection


def precision_of(model: nn.Module) -> str:
    """The precision of ``model``'s tables: ``fp32`` unless :func:`quantize_embeddings` converted them."""
    c = model.embeddings.sequence
    if isinstance(c, quant.EmbeddingCollection | quant.EmbeddingBagCollection):
        return _OF_DATA_TYPE[c.embedding_configs()[0].data_type]
    return DEFAULT_PRECISION


def quantize_embeddings(model: nn.Module, precision: str, *, row_alignment: int = ROW_ALIGNMENT) -> nn.Module:
    """Convert every torchrec collection of ``model.embeddings`` to ``precision``, in place.

    Args:
        model: a :class:`~models.ctr.CTRModel` in eval mode, on the CPU.
        precision: one of :data:`PRECISIONS` (``fp32``: nothing changes).
        row_alignment: pad each quantized row to a multiple of this many bytes (1: packed; 16:
            torchrec's default, the GPU kernels' alignment). The values looked up do not change.

    Returns:
        ``model``, its tables now ``torchrec.quant`` modules (lookups still return float32).

    Raises:
        ValueError: an unknown precision, a model in training mode or off the CPU, or a model
            already quantized to another precision.
    """
    check_precision(precision)
    if not isinstance(row_alignment, int) or isinstance(row_alignment, bool) or row_alignment < 1:
        raise ValueError(f"row_alignment: {row_alignment!r} is not a positive number of bytes")
    if model.training:
        raise ValueError("model: must be in eval mode to quantize its tables (call model.eval() first)")
    devices = sorted({str(p.device) for p in model.parameters()} - {"cpu"})
    if devices:
        raise ValueError(f"model: quantized lookups run on the CPU; the model has parameters on {devices}")
    current = precision_of(model)
    if current == precision:
        return model
    if current != DEFAULT_PRECISION:
        raise ValueError(f"model: its tables are already {current}; quantize a fp32 model (load it again) "
                         f"to get {precision}")
    qconfig = QConfig(activation=PlaceholderObserver.with_args(dtype=torch.float),  # float32 lookups out
                      weight=PlaceholderObserver.with_args(dtype=_WEIGHT_DTYPE[precision]))
    for owner, name, collection in list(_collections(model)):
        target = (quant.EmbeddingBagCollection if isinstance(collection, torchrec.EmbeddingBagCollection)
                  else quant.EmbeddingCollection)
        collection.qconfig = qconfig
        quant.quant_prep_customize_row_alignment(collection, [type(collection)], row_alignment)
        converted = target.from_float(collection)
        del collection.qconfig
        delattr(collection, quant.MODULE_ATTR_ROW_ALIGNMENT_INT)
        if isinstance(owner, nn.ModuleDict):
            owner[name] = converted
        else:
            setattr(owner, name, converted)
    return model


def table_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of every table of ``model.embeddings`` (fp32 or quantized), and their ``total``.

    A quantized table's bytes are rows x the row stride of the buffer fbgemm's lookup reads: the
    values, the per-row scale and bias (int8, int4) and any padding to the row alignment.
    Table names are distinct across collections (``profile_*``, ``can_*``, ``cart_*``).

    Returns:
        table name -> bytes, plus ``total``.
    """
    out: dict[str, int] = {}
    for _, _, c in _collections(model):
        if isinstance(c, quant.EmbeddingCollection | quant.EmbeddingBagCollection):
            # torchrec groups tables by data type into one fbgemm module each; the split weights
            # are views into its buffer, so stride(0) is the row as stored
            for tables, tbe in zip(c._key_to_tables.values(), c._emb_modules, strict=True):
                for cfg, (weight, _) in zip(tables, tbe.split_embedding_weights(), strict=True):
                    out[cfg.name] = int(weight.shape[0]) * int(weight.stride(0))
        else:
            modules = c.embeddings if isinstance(c, torchrec.EmbeddingCollection) else c.embedding_bags
            out.update({name: m.weight.numel() * m.weight.element_size() for name, m in modules.items()})
    out["total"] = sum(out.values())
    return out
