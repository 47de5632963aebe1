"""Label-set artifact: :class:`LabelSetEmbeddings` as one self-describing Parquet file.

The same file serves as the label-set stage's on-disk cache and as the output of
``bifta labelset build`` (reused with ``bifta label --labelset-artifact``). One row per class
prompt (``kind='class'``) and per kept description of each bank (``kind='text'``); embeddings are
Arrow fixed-size lists of float32, so polars/DuckDB read them without extension types. Parameters,
class list and the content hash live in the schema metadata under the key ``bifta``.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bifta_core.errors import LabelSetError
from bifta_core.method.text_banks import LabelSetEmbeddings, TextBank

ARTIFACT_FORMAT = 1
_META_KEY = b"bifta"


def _embedding_array(emb: torch.Tensor) -> pa.FixedSizeListArray:
    flat = pa.array(emb.to(torch.float32).contiguous().numpy().reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, int(emb.shape[1]))


def to_table(emb: LabelSetEmbeddings) -> pa.Table:
    """Flatten the embeddings into an Arrow table with metadata."""
    kinds, banks, cls_idx, texts, weights, blocks = [], [], [], [], [], []
    for c, name in enumerate(emb.classes):
        kinds.append("class")
        banks.append("")
        cls_idx.append(c)
        texts.append(name)
        weights.append(None)
    blocks.append(emb.class_emb)
    for bank in emb.banks.values():
        n = len(bank.texts)
        kinds.extend(["text"] * n)
        banks.extend([bank.key] * n)
        cls_idx.extend(bank.desc_class.tolist())
        texts.extend(bank.texts)
        weights.extend(bank.weights.tolist() if bank.weights is not None else [None] * n)
        blocks.append(bank.desc_emb)
    all_emb = torch.cat(blocks) if blocks else torch.empty(0, 0)
    table = pa.table(
        {
            "kind": pa.array(kinds, pa.string()),
            "bank": pa.array(banks, pa.string()),
            "class_index": pa.array(cls_idx, pa.int32()),
            "class_name": pa.array([emb.classes[i] for i in cls_idx], pa.string()),
            "text": pa.array(texts, pa.string()),
            "weight": pa.array(weights, pa.float32()),
            "embedding": _embedding_array(all_emb),
        }
    )
    meta = {
        "format": ARTIFACT_FORMAT,
        "name": emb.name,
        "classes": emb.classes,
        "content_hash": emb.content_hash,
        "params": emb.params,
        "model": emb.model,
        "pretrained": emb.pretrained,
        "banks": {k: {"method": b.method, "pool_sizes": b.pool_sizes} for k, b in emb.banks.items()},
    }
    return table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})


def from_table(table: pa.Table, source: str = "artifact") -> LabelSetEmbeddings:
    """Rebuild :class:`LabelSetEmbeddings` from :func:`to_table` output."""
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise LabelSetError(f"{source} is not a bifta label-set artifact (no 'bifta' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != ARTIFACT_FORMAT:
        raise LabelSetError(f"{source} has artifact format {meta.get('format')}, this bifta reads {ARTIFACT_FORMAT}")
    emb_col = table.column("embedding").combine_chunks()
    dim = emb_col.type.list_size
    matrix = torch.from_numpy(np.asarray(emb_col.flatten()).reshape(-1, dim).copy())
    kind = table.column("kind").to_pylist()
    bank = table.column("bank").to_pylist()
    cls_idx = table.column("class_index").to_pylist()
    texts = table.column("text").to_pylist()
    weights = table.column("weight").to_pylist()
    class_rows = [i for i, k in enumerate(kind) if k == "class"]
    banks: dict[str, TextBank] = {}
    for key, info in meta["banks"].items():
        rows = [i for i, (k, b) in enumerate(zip(kind, bank)) if k == "text" and b == key]
        w = [weights[i] for i in rows]
        banks[key] = TextBank(
            key=key,
            method=info["method"],
            texts=[texts[i] for i in rows],
            desc_class=torch.tensor([cls_idx[i] for i in rows], dtype=torch.long),
            desc_emb=matrix[rows] if rows else torch.empty(0, dim),
            weights=torch.tensor(w, dtype=torch.float32) if rows and w[0] is not None else None,
            pool_sizes=info.get("pool_sizes"),
        )
    return LabelSetEmbeddings(
        name=meta["name"],
        classes=list(meta["classes"]),
        class_emb=matrix[class_rows],
        banks=banks,
        content_hash=meta["content_hash"],
        params=meta.get("params", {}),
        model=meta.get("model", ""),
        pretrained=meta.get("pretrained", ""),
    )


def save_artifact(emb: LabelSetEmbeddings, uri: str) -> str:
    """Write the artifact (local: atomically via a temporary file; remote: one PUT)."""
    table = to_table(emb)
    if "://" in uri and not uri.startswith("file://"):
        from bifta_core.io import storage

        fs, path = storage.get_arrow_fs(uri)
        pq.write_table(table, path, filesystem=fs, compression="zstd")
        return uri
    path = uri.removeprefix("file://")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_artifact(uri: str) -> LabelSetEmbeddings:
    """Read an artifact written by :func:`save_artifact`; clear error if it is missing or foreign."""
    try:
        if "://" in uri and not uri.startswith("file://"):
            from bifta_core.io import storage

            fs, path = storage.get_arrow_fs(uri)
            table = pq.read_table(path, filesystem=fs)
        else:
            table = pq.read_table(uri.removeprefix("file://"))
    except FileNotFoundError:
        raise LabelSetError(f"label-set artifact not found: {uri}") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise LabelSetError(f"cannot read label-set artifact {uri}: {str(exc).splitlines()[0]}") from None
    return from_table(table, uri)
