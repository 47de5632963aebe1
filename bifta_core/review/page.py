"""The review page of ``bifta review``: which rows to show, their thumbnails, one static HTML file.

Pure functions (polars, Pillow, no Ray): :func:`select_rows` picks a review queue (ok rows with the
lowest margin first, then error rows with their error) and a seeded sample per predicted class;
:func:`thumbnail` makes a ≤ 256 px JPEG of an image; :func:`render_page` writes one self-contained
HTML page (no server, no external script, style sheet or font) with the thumbnails embedded, the
top-k labels as bars, the margin, the explanation, the highest-weighted WCA/BiFTA views drawn as
boxes with their weights, and filters (label set, class, status, margin range, group) that run in
the browser. Filters can also be given in the page address (``review.html#status=error&min=0.1``),
so a filtered view can be shared as a link.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from typing import Any

import polars as pl
from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112
#: Longest side of an embedded thumbnail, pixels.
THUMB_SIDE = 256
#: Columns a page item carries (beyond its thumbnail).
ITEM_COLUMNS = ("image_id", "uri", "label_set", "status", "error", "label", "topk_labels", "topk_scores", "margin",
                "explanation", "top_views", "decided_by", "method")


@dataclass(frozen=True)
class Selection:
    """How many rows a page shows: at most ``max_items``; about half of them the review queue (lowest
    margin), up to a quarter error rows, the rest ``per_class`` rows per predicted class."""

    max_items: int = 200
    per_class: int = 4
    seed: int = 0


def select_rows(rows: pl.LazyFrame | pl.DataFrame, selection: Selection = Selection()) -> pl.DataFrame:
    """The rows of the page, each with ``group``: ``queue`` (ok, lowest margin first), ``error`` or
    ``sample`` (per predicted class, a seeded choice by a hash of the image id: the same rows every
    time). Works on a lazy scan of a whole prediction folder: only the chosen rows are collected."""
    lf = rows.lazy()
    cols = [c for c in ITEM_COLUMNS if c in lf.collect_schema().names()]
    lf = lf.select(cols)
    n = selection.max_items
    ok = lf.filter(pl.col("status") == "ok")
    queue = ok.sort(["margin", "image_id", "label_set"]).head(max(1, n // 2)).with_columns(group=pl.lit("queue"))
    errors = (lf.filter(pl.col("status") != "ok").sort(["image_id", "label_set"]).head(max(0, n // 4))
              .with_columns(group=pl.lit("error")))
    queue_df, errors_df = pl.collect_all([queue, errors])
    rest = ok.join(queue_df.lazy().select("image_id", "label_set"), on=["image_id", "label_set"], how="anti")
    rank = pl.col("image_id").hash(selection.seed).rank("ordinal").over(["label_set", "label"])
    # round-robin over the classes: every class gets its first row before any gets a second
    sample = (rest.with_columns(_rank=rank).filter(pl.col("_rank") <= selection.per_class)
              .sort(["_rank", "label_set", "label"]).drop("_rank").with_columns(group=pl.lit("sample")))
    room = max(0, n - queue_df.height - errors_df.height)
    return pl.concat([queue_df, errors_df, sample.head(room).collect()], how="diagonal_relaxed")


@dataclass(frozen=True)
class Thumbnail:
    """A JPEG thumbnail and the geometry boxes are drawn with (original = EXIF-oriented pixels)."""

    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def thumbnail(data: bytes, side: int = THUMB_SIDE, max_pixels: int = 120_000_000) -> Thumbnail | None:
    """A ≤ ``side`` px JPEG of an image (EXIF orientation applied, as view boxes are), or None when the
    bytes are not a readable image (the page then shows the row without a picture)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                return None
            raw_w, raw_h = img.size  # before draft() shrinks it
            swapped = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            ow, oh = (raw_h, raw_w) if swapped else (raw_w, raw_h)
            img.draft("RGB", (side, side))  # JPEG: decode at a DCT scale near the thumbnail
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            rgb.thumbnail((side, side), Image.BICUBIC)
            buf = io.BytesIO()
            rgb.save(buf, "JPEG", quality=82)
            return Thumbnail(buf.getvalue(), rgb.width, rgb.height, ow, oh)
    except Exception:  # any unreadable image: no thumbnail, the row still shows
        return None


def render_page(items: list[dict[str, Any]], thumbs: dict[str, Thumbnail | None], context: dict[str, Any]) -> str:
    """The page: ``items`` (rows from :func:`select_rows`), ``thumbs`` by ``uri``, ``context``:
    ``title``, ``out``, ``rows`` (rows in the folder), ``random_weights`` (a warning banner)."""
    records = []
    for k, item in enumerate(items):
        t = thumbs.get(item["uri"])
        records.append({
            "k": k, "id": item["image_id"], "uri": item["uri"], "set": item.get("label_set"),
            "status": item["status"], "error": item.get("error"), "label": item.get("label"),
            "top": list(zip(item.get("topk_labels") or [], [round(float(s), 5) for s in item.get("topk_scores") or []])),
            "margin": None if item.get("margin") is None else round(float(item["margin"]), 6),
            "why": item.get("explanation") or [], "views": item.get("top_views") or [],
            "by": item.get("decided_by"), "group": item["group"],
            "img": None if t is None else "data:image/jpeg;base64," + base64.b64encode(t.jpeg).decode("ascii"),
            "w": None if t is None else t.original_width, "h": None if t is None else t.original_height,
        })
    data = json.dumps(records, separators=(",", ":")).replace("</", "<\\/")  # never closes the <script>
    title = html.escape(str(context.get("title", "bifta review")))
    summary = html.escape(f"{len(items)} rows shown of {context.get('rows', '?')} in {context.get('out', '')}")
    if context.get("random_weights"):
        summary += " — <strong>WARNING: random model weights, these labels are meaningless</strong>"
    return _PAGE.replace("__TITLE__", title).replace("__SUMMARY__", summary).replace("__DATA__", data)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f5f6f8;color:#1c1e21}
header{padding:12px 18px;background:#20232a;color:#fff}
header h1{font-size:18px;margin:0 0 4px} header p{margin:0;font-size:13px;color:#c8ccd4}
#filters{display:flex;flex-wrap:wrap;gap:10px;padding:10px 18px;background:#fff;border-bottom:1px solid #ddd;
  position:sticky;top:0;z-index:2;font-size:13px;align-items:center}
#filters label{display:flex;gap:4px;align-items:center} #filters input{width:70px}
#count{margin-left:auto;font-weight:600}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px;padding:14px 18px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:10px;font-size:12.5px}
.card[hidden]{display:none}
.card.error{border-left:4px solid #d93025} .card.queue{border-left:4px solid #f9ab00}
.thumb{position:relative;width:100%;background:#eee;border-radius:4px;overflow:hidden;margin-bottom:8px}
.thumb img{display:block;width:100%;height:auto}
.box{position:absolute;border:2px solid #00e5ff;box-sizing:border-box;pointer-events:none}
.box span{position:absolute;left:0;top:0;background:rgba(0,0,0,.65);color:#fff;font-size:10px;padding:0 3px}
.noimg{padding:40px 0;text-align:center;color:#888}
.label{font-size:15px;font-weight:650;margin:2px 0} .meta{color:#5f6368;margin-bottom:6px;word-break:break-all}
.bar{display:flex;align-items:center;gap:6px;margin:2px 0}
.bar .name{width:40%;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar .track{flex:1;background:#e8eaed;height:9px;border-radius:5px;overflow:hidden}
.bar .fill{height:100%;background:#1a73e8} .bar .val{width:52px;text-align:right;color:#5f6368}
.why{margin:6px 0 0;padding-left:16px;color:#3c4043} .err{color:#d93025;font-weight:600}
</style></head><body>
<header><h1>__TITLE__</h1><p>__SUMMARY__</p></header>
<div id="filters">
<label>group <select id="f-group"><option value="">all</option><option value="queue">review queue</option>
<option value="error">errors</option><option value="sample">per-class sample</option></select></label>
<label>label set <select id="f-set"><option value="">all</option></select></label>
<label>class <select id="f-class"><option value="">all</option></select></label>
<label>status <select id="f-status"><option value="">all</option><option value="ok">ok</option>
<option value="error">error</option></select></label>
<label>margin from <input id="f-min" type="number" step="any"></label>
<label>to <input id="f-max" type="number" step="any"></label>
<span id="count"></span></div>
<main id="grid"></main>
<script id="bifta-data" type="application/json">__DATA__</script>
<script>
(function () {
  "use strict";
  var items = JSON.parse(document.getElementById("bifta-data").textContent);
  var grid = document.getElementById("grid");
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function card(it) {
    var c = el("article", "card " + it.group);
    c.dataset.k = it.k;
    var t = el("div", "thumb");
    if (it.img) {
      var img = el("img"); img.src = it.img; img.alt = it.id; t.appendChild(img);
      it.views.forEach(function (v) {
        var b = el("div", "box");
        b.style.left = (100 * v.x0 / it.w) + "%"; b.style.top = (100 * v.y0 / it.h) + "%";
        b.style.width = (100 * (v.x1 - v.x0) / it.w) + "%"; b.style.height = (100 * (v.y1 - v.y0) / it.h) + "%";
        b.appendChild(el("span", null, v.weight.toFixed(3))); t.appendChild(b);
      });
    } else { t.appendChild(el("div", "noimg", "no preview")); }
    c.appendChild(t);
    if (it.status === "ok") {
      c.appendChild(el("div", "label", it.label));
      var m = it.set + " · margin " + it.margin.toFixed(4) + (it.by ? " · decided by " + it.by : "");
      c.appendChild(el("div", "meta", m));
      var top = it.top.length ? it.top[0][1] : 1, low = Math.min.apply(null, it.top.map(function (p) { return p[1]; }));
      it.top.forEach(function (p) {
        var r = el("div", "bar"); r.appendChild(el("span", "name", p[0]));
        var tr = el("span", "track"), f = el("span", "fill");
        var span = top - low || 1; f.style.width = (100 * (0.15 + 0.85 * (p[1] - low) / span)) + "%";
        f.style.display = "block"; tr.appendChild(f); r.appendChild(tr);
        r.appendChild(el("span", "val", p[1].toFixed(4))); c.appendChild(r);
      });
      if (it.why.length) { var u = el("ul", "why"); it.why.forEach(function (w) { u.appendChild(el("li", null, w)); }); c.appendChild(u); }
    } else {
      c.appendChild(el("div", "err", "error")); c.appendChild(el("div", "meta", it.error));
    }
    c.appendChild(el("div", "meta", it.id));
    return c;
  }
  var cards = items.map(function (it) { var c = card(it); grid.appendChild(c); return c; });
  function fill(id, values) {
    var s = document.getElementById(id);
    values.forEach(function (v) { var o = el("option", null, v); o.value = v; s.appendChild(o); });
  }
  function distinct(key) {
    var seen = {}; items.forEach(function (it) { if (it[key] !== null && it[key] !== undefined) seen[it[key]] = 1; });
    return Object.keys(seen).sort();
  }
  fill("f-set", distinct("set")); fill("f-class", distinct("label"));
  var ids = {group: "f-group", set: "f-set", "class": "f-class", status: "f-status", min: "f-min", max: "f-max"};
  function apply() {
    var f = {}; Object.keys(ids).forEach(function (k) { f[k] = document.getElementById(ids[k]).value; });
    var lo = f.min === "" ? -Infinity : Number(f.min), hi = f.max === "" ? Infinity : Number(f.max), shown = 0;
    items.forEach(function (it, i) {
      var ok = (!f.group || it.group === f.group) && (!f.set || it.set === f.set) &&
        (!f["class"] || it.label === f["class"]) && (!f.status || it.status === f.status) &&
        ((lo === -Infinity && hi === Infinity) || (it.margin !== null && it.margin >= lo && it.margin <= hi));
      cards[i].hidden = !ok; if (ok) shown += 1;
    });
    document.getElementById("count").textContent = shown + " of " + items.length + " shown";
  }
  var hash = new URLSearchParams(location.hash.slice(1));
  Object.keys(ids).forEach(function (k) {
    var e = document.getElementById(ids[k]);
    if (hash.has(k)) e.value = hash.get(k);
    e.addEventListener("input", apply); e.addEventListener("change", apply);
  });
  apply();
})();
</script></body></html>
"""
