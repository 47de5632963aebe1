"""Arrow types of the columns that travel between stages.

Stages return Arrow tables with these types instead of letting Arrow infer them per batch: a batch
whose ``error`` (or ``true_label``) values are all null would otherwise be typed ``null`` and
could not be merged with a batch that has strings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

COLUMN_TYPES: dict[str, pa.DataType] = {
    "image_id": pa.string(),
    "uri": pa.string(),
    "shard": pa.string(),
    "true_label": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "data": pa.binary(),
    "whole": pa.binary(),
    "view_whole": pa.binary(),
    "work": pa.binary(),
    "crops": pa.binary(),
    "boxes": pa.binary(),
    "boxes_original": pa.binary(),
    "view_kept": pa.binary(),
    "work_hw": pa.list_(pa.int32()),
    "views_generated": pa.int32(),
    "views_kept": pa.int32(),
}


def to_table(columns: dict[str, Any]) -> pa.Table:
    """A stage's output columns as an Arrow table with the stage-independent types above."""
    arrays = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.dtype != object:
            values = values.tolist()
        arrays[name] = pa.array(list(values), type=COLUMN_TYPES.get(name))
    return pa.table(arrays)
