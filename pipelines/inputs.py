"""Stage 1 — list inputs: a folder (recursive), a glob, a manifest, local or on S3.

Listing is done here, on the driver, instead of by a path-resolving reader, so that one unreadable
file becomes one ``error`` row later instead of failing a whole block. The result is an Arrow table
``image_id, uri[, true_label]`` in a stable order with unique ``image_id`` values.
"""

from __future__ import annotations

import glob as globlib
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bifta_core import storage
from bifta_core.errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"})
MANIFEST_EXTENSIONS = (".csv", ".parquet", ".pq")
URI_COLUMNS = ("uri", "path")  # ``path`` accepted as an alias (e.g. an ImageNet-style labels.csv)


def _has_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _read_manifest(spec: str) -> pa.Table:
    try:
        if spec.lower().endswith(".csv"):
            if storage.is_remote(spec):
                with storage.open_input(spec) as fh:
                    table = pacsv.read_csv(fh)
            else:
                table = pacsv.read_csv(spec)
        else:
            fs, path = storage.get_arrow_fs(spec) if storage.is_remote(spec) else (None, spec)
            table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read manifest {spec}: {str(exc).splitlines()[0]}") from None
    return table


def _manifest_inputs(spec: str) -> pa.Table:
    table = _read_manifest(spec)
    uri_col = next((c for c in URI_COLUMNS if c in table.column_names), None)
    if uri_col is None:
        raise InputError(f"manifest {spec} has no 'uri' column (columns: {', '.join(table.column_names)})")
    uris = [u if u is None else str(u).strip() for u in table.column(uri_col).to_pylist()]
    if any(not u for u in uris):
        missing = [i for i, u in enumerate(uris) if not u][:5]
        raise InputError(f"manifest {spec} has empty '{uri_col}' values (rows {missing})")
    base = _parent(spec)
    # Relative entries are relative to the manifest, so a dataset folder can be moved as a whole.
    uris = [u if storage.is_remote(u) or os.path.isabs(u) else storage.join(base, u) for u in uris]
    if "image_id" in table.column_names:
        ids = [None if v is None else str(v) for v in table.column("image_id").to_pylist()]
        if any(i is None or i == "" for i in ids):
            raise InputError(f"manifest {spec} has empty 'image_id' values")
    else:
        ids = [_id_from_uri(u) for u in uris]
    columns = {"image_id": ids, "uri": uris}
    if "label" in table.column_names:
        columns["true_label"] = [None if v is None else str(v) for v in table.column("label").to_pylist()]
    return pa.table(columns)


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(uri) else os.path.dirname(os.path.abspath(uri))


def _id_from_uri(uri: str) -> str:
    return uri.removeprefix("file://")


def _folder_inputs(root: str) -> pa.Table:
    files = storage.list_files(root, IMAGE_EXTENSIONS)
    prefix = root.rstrip("/") + "/"
    ids = [f[len(prefix):] if f.startswith(prefix) else f for f in files]
    return pa.table({"image_id": ids, "uri": files})


def _glob_root(pattern: str) -> str:
    """The fixed directory part of a glob (everything before the first component with a wildcard)."""
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if _has_glob(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def _glob_inputs(pattern: str) -> pa.Table:
    if storage.is_remote(pattern):
        files = storage.glob(pattern)
        root = _glob_root(pattern)
    else:
        absolute = os.path.abspath(os.path.expanduser(pattern))
        files = sorted(os.path.abspath(p) for p in globlib.glob(absolute, recursive=True))
        root = _glob_root(absolute)
    files = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    # Ids relative to the glob's fixed root: the same images keep the same ids from any working dir.
    prefix = root.rstrip("/") + "/"
    ids = [f[len(prefix):] if root and f.startswith(prefix) else f for f in files]
    return pa.table({"image_id": ids, "uri": files})


def list_inputs(spec: str, limit: int | None = None) -> pa.Table:
    """List the images of ``spec`` → table ``image_id, uri[, true_label]``.

    Raises :class:`InputError` (one line) for a missing location, an empty listing, an unreadable
    manifest, or duplicate ``image_id`` values.
    """
    if not spec:
        raise InputError("no INPUT given")
    remote = storage.is_remote(spec)
    local = os.path.abspath(os.path.expanduser(spec)) if not remote else spec
    if _has_glob(spec):
        table = _glob_inputs(spec)
    elif spec.lower().endswith(MANIFEST_EXTENSIONS):
        if not storage.exists(local):
            raise InputError(f"manifest not found: {spec}")
        table = _manifest_inputs(local)
    elif storage.isdir(local):
        table = _folder_inputs(local)
    elif storage.exists(local):
        if os.path.splitext(local)[1].lower() not in IMAGE_EXTENSIONS:
            raise InputError(f"{spec} is neither a folder, a manifest (.csv/.parquet) nor an image file")
        table = pa.table({"image_id": [os.path.basename(local)], "uri": [local]})
    else:
        raise InputError(f"input not found: {spec}")
    if table.num_rows == 0:
        raise InputError(f"no images found in {spec} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    ids = table.column("image_id").to_pylist()
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups = [i for i in ids if i in seen or seen.add(i)]
        raise InputError(f"{spec} lists {len(dups)} duplicate image ids, e.g. {dups[:3]}")
    if limit is not None:
        table = table.slice(0, limit)
    return table
