"""Label Studio import files from bifta predictions (pure: plain data in, JSON-ready data out).

Label Studio imports a JSON list of *tasks*; each has ``data`` (the image, referenced by the key the
labeling config's ``<Image value="$image">`` names) and optional ``predictions`` — each with a
``model_version``, a ``score`` and a ``result`` list of region results; a classification is a
``choices`` result ``{"from_name": <Choices name>, "to_name": <Image name>, "type": "choices",
"value": {"choices": [label]}}`` (Label Studio guide, "Import pre-annotated data"). bifta writes
one task per image, with one ``choices`` result per label set (a ``<Choices>`` control per label
set in :func:`labeling_config`), so reviewers correct the predictions instead of labelling from
scratch; error rows become tasks without a prediction.

Images are referenced where Label Studio can fetch them: ``s3://bucket/key`` as its S3 source
storage resolves them, ``http(s)://`` as given, and local files through its local-files serving
(``/data/local-files/?d=<path below LOCAL_FILES_DOCUMENT_ROOT>``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

IMAGE_KEY = "image"  # data key and <Image name> of the labeling config


def control_name(label_set: str) -> str:
    """A label set's ``<Choices name>``: letters, digits, ``_`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label_set) or "label"


def image_url(uri: str, local_root: str = "/") -> str:
    """Where Label Studio reads ``uri``: cloud and web URLs as they are, local paths through its
    local-files serving, relative to ``local_root`` (its ``LOCAL_FILES_DOCUMENT_ROOT``)."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", uri):
        return uri
    path = os.path.abspath(uri)
    root = os.path.abspath(local_root)
    relative = os.path.relpath(path, root)
    if relative.startswith(".."):
        raise ValueError(f"{uri} is not below --local-root {local_root}")
    return "/data/local-files/?d=" + quote(relative.replace(os.sep, "/"))


def task(rows: list[dict[str, Any]], *, local_root: str = "/") -> dict[str, Any]:
    """One task for one image from its prediction rows (one per label set)."""
    first = rows[0]
    ok = [r for r in rows if r["status"] == "ok"]
    data: dict[str, Any] = {IMAGE_KEY: image_url(first["uri"], local_root), "image_id": first["image_id"],
                            "uri": first["uri"]}
    margins = [float(r["margin"]) for r in ok if r.get("margin") is not None]
    if margins:
        data["margin"] = min(margins)  # sortable in Label Studio's data manager: the least sure label set
    if not ok:
        data["error"] = first.get("error")
        return {"data": data}
    result = [{"id": f"{control_name(r['label_set'])}-{i}", "from_name": control_name(r["label_set"]),
               "to_name": IMAGE_KEY, "type": "choices", "value": {"choices": [r["label"]]}}
              for i, r in enumerate(ok)]
    version = f"bifta {first['method']} {first['model']} ({first['pretrained']}) run {first['run_id']}"
    return {"data": data, "predictions": [{"model_version": version,
                                           "score": min(float(r["score"]) for r in ok), "result": result}]}


def tasks(rows: Iterable[dict[str, Any]], *, local_root: str = "/") -> list[dict[str, Any]]:
    """Tasks for prediction rows sorted by ``image_id`` (one task per image)."""
    out, group = [], []
    for row in rows:
        if group and row["image_id"] != group[0]["image_id"]:
            out.append(task(group, local_root=local_root))
            group = []
        group.append(row)
    if group:
        out.append(task(group, local_root=local_root))
    return out


def labeling_config(label_sets: dict[str, list[str]]) -> str:
    """The Label Studio labeling config the tasks fit: the image and one ``<Choices>`` per label set."""
    lines = ["<View>", f'  <Image name="{IMAGE_KEY}" value="${IMAGE_KEY}"/>']
    for name, classes in label_sets.items():
        lines.append(f'  <Header value={quoteattr(name)}/>')
        lines.append(f'  <Choices name="{control_name(name)}" toName="{IMAGE_KEY}" choice="single" showInline="true">')
        lines += [f"    <Choice value={quoteattr(c)}/>" for c in classes]
        lines.append("  </Choices>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"
