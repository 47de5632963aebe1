"""Evaluation: score every method from one set of image embeddings and summarise accuracy.

An evaluation encodes each image once per view preset and scores all methods from those
embeddings, so every method sees exactly the crops ``bifta label --method M`` would give it:

* the whole image, decoded as the view-less methods (CLIP, CLIP-E, CLIP-D, CuPL) decode it;
* for each view preset the rows need — ``wca`` (WCA: scale 0.1–0.9, 60 views, no IoU test) and
  ``bifta`` (BiFTA: scale 0.5–0.9, 100 views, IoU refinement 0.85) — the whole image at that
  preset's working resolution and *every* sampled view (boxes seeded from ``(seed, image id)``
  exactly as the labelling pipeline seeds them), with a flag saying which views the preset's
  refinement keeps (for WCA, every view up to ``max_views``).

=================================  ============  =====================  ==============  ===========
row (``method``)                   scorer        descriptions           views           aggregation
=================================  ============  =====================  ==============  ===========
``clip``                           CLIP          class prompt           whole image     –
``clip-e``                         CLIP-E        prompt templates       whole image     –
``clip-d``                         CLIP-D        descriptors            whole image     –
``cupl``                           CuPL          sentences              whole image     –
``waffle``                         WaffleCLIP    random words, chars    whole image     –
``wca``                            WCA           sentences              wca, kept       normalized
``wca+refined-desc``               WCA           refined sentences      wca, kept       normalized
``bifta-unrefined-desc-views``     BiFTA         sentences              bifta, all      normalized
``bifta-unrefined-views``          BiFTA         refined sentences      bifta, all      normalized
``bifta-unrefined-desc``           BiFTA         sentences              bifta, kept     normalized
``bifta``                          BiFTA         refined sentences      bifta, kept     normalized
``wca-grid``                       WCA           sentences              bifta-grid      normalized
``bifta-grid``                     BiFTA         refined sentences      bifta-grid      normalized
``…/sum``                          WCA / BiFTA   as above               as above        sum
=================================  ============  =====================  ==============  ===========

``wca`` and ``bifta`` are the methods as ``bifta label`` runs them (same boxes, same crops, same
whole-image embedding, same text bank). The four ``bifta*`` rows are the 2×2 ablation
{descriptions unrefined, refined} × {all sampled views, views kept by IoU refinement} on BiFTA's
views; ``wca+refined-desc`` adds description refinement to WCA. The ``*-grid`` rows score BiFTA's
grid views (3 × 3 tiles, :data:`bifta_core.method.registry.VIEW_PRESETS`) the way BiFTA's release scores
them with ``--crop_strategy grid`` (its "wca" and "bifta" methods). Accuracy is top-k over the whole
label set; ties between equal scores are broken towards the lower class index, exactly as
:func:`bifta_core.method.prediction.top_k` does.

The optional repeated-run protocol of the WCA release (:func:`bifta_core.method.scoring.sample_view_subsets`)
scores ``protocol_views`` views drawn with replacement per image and run, and reports the mean and
population standard deviation over ``protocol_runs`` runs. Draws are seeded per image from
``(seed, image id)``, so the result does not depend on batching or image order.

Everything here is pure torch/polars: no Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import polars as pl
import torch

from bifta_core.errors import ConfigError, InputError, LabelSetError
from bifta_core.validation import integer
from bifta_core.io.label_sets import LabelSet, key_of
from bifta_core.method.registry import METHODS
from bifta_core.method.prediction import ScoreParams, method_scores
from bifta_core.method.scoring import sample_view_subsets, wca_scores
from bifta_core.method.seeding import generator_for
from bifta_core.method.text_banks import BankSpec, LabelSetEmbeddings

#: View modes: no views (whole image only), every sampled view, views kept by the preset's refinement.
VIEW_MODES = ("none", "all", "kept")
#: View presets an evaluation samples views with (:data:`bifta_core.method.registry.VIEW_PRESETS`).
VIEW_PRESET_NAMES = ("wca", "bifta", "bifta-grid")
#: CLIP's learned logit scale (≈100): confidences are ``softmax(LOGIT_SCALE · score)``.
DEFAULT_LOGIT_SCALE = 100.0
#: Top-k accuracies reported.
TOPK = (1, 5)


@dataclass(frozen=True)
class EvalMethod:
    """One row of the evaluation: a scorer with its text bank, views and aggregation."""

    name: str
    method: str  # scorer passed to bifta_core.method.prediction.method_scores
    bank: str | None  # key in LabelSetEmbeddings.banks (None for CLIP)
    views: str  # one of VIEW_MODES
    aggregation: str | None  # WCA aggregation for view methods, else None
    descriptions: str  # what the text side is made of, for the report
    preset: str | None = None  # view preset (VIEW_PRESET_NAMES) of a view row, else None

    def __post_init__(self) -> None:
        if self.views not in VIEW_MODES:
            raise ConfigError(f"view mode must be one of {', '.join(VIEW_MODES)}, got {self.views!r}")
        if (self.views == "none") != (self.preset is None) or (self.preset is not None
                                                                and self.preset not in VIEW_PRESET_NAMES):
            raise ConfigError(f"{self.name}: a view row needs a view preset ({', '.join(VIEW_PRESET_NAMES)}), "
                              f"a whole-image row none; got views={self.views!r}, preset={self.preset!r}")

    @property
    def uses_views(self) -> bool:
        return self.views != "none"


def standard_methods() -> tuple[EvalMethod, ...]:
    """Every row an evaluation scores, in report order (see the module docstring): each method of
    :data:`bifta_core.method.registry.METHODS` as ``bifta label`` runs it, then the ablations."""
    rows = [EvalMethod(m.name, m.name, m.name if m.has_bank else None, "none", None, m.summary)
            for m in METHODS.values() if not m.uses_views]
    for agg in ("normalized", "sum"):
        suffix = "" if agg == "normalized" else "/sum"
        rows += [
            EvalMethod(f"wca{suffix}", "wca", "wca", "kept", agg, "sentences", "wca"),
            EvalMethod(f"wca+refined-desc{suffix}", "wca", "bifta", "kept", agg, "refined sentences", "wca"),
            EvalMethod(f"bifta-unrefined-desc-views{suffix}", "bifta", "wca", "all", agg, "sentences", "bifta"),
            EvalMethod(f"bifta-unrefined-views{suffix}", "bifta", "bifta", "all", agg, "refined sentences", "bifta"),
            EvalMethod(f"bifta-unrefined-desc{suffix}", "bifta", "wca", "kept", agg, "sentences", "bifta"),
            EvalMethod(f"bifta{suffix}", "bifta", "bifta", "kept", agg, "refined sentences", "bifta"),
            EvalMethod(f"wca-grid{suffix}", "wca", "wca", "kept", agg, "sentences", "bifta-grid"),
            EvalMethod(f"bifta-grid{suffix}", "bifta", "bifta", "kept", agg, "refined sentences", "bifta-grid"),
        ]
    return tuple(rows)


def presets_for(methods: Sequence[EvalMethod]) -> list[str]:
    """The view presets ``methods`` need, in :data:`VIEW_PRESET_NAMES` order."""
    wanted = {m.preset for m in methods if m.uses_views}
    return [p for p in VIEW_PRESET_NAMES if p in wanted]


def method_names() -> list[str]:
    """Names of :func:`standard_methods`, for flag help and error messages."""
    return [m.name for m in standard_methods()]


def select_methods(wanted: Sequence[str] | None) -> list[EvalMethod]:
    """The standard rows named in ``wanted`` (all when empty/None), in report order.

    Raises :class:`ConfigError` naming unknown entries and the valid names.
    """
    rows = list(standard_methods())
    if not wanted:
        return rows
    names = [w.strip() for w in wanted if w and w.strip()]
    known = {m.name for m in rows}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown evaluation method(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return [m for m in rows if m.name in names]


def bank_specs_for(methods: Sequence[EvalMethod], threshold: float = 0.99, top_k: int | None = 50, *,
                   waffle_seed: int = 0, waffle_words: str | None = None) -> list[BankSpec]:
    """Text banks the rows need: one per distinct ``bank`` key, a method name (``bifta`` is the
    refined pool), refined as that method refines by default.

    The ``wca`` bank holds the unrefined sentences and ``bifta`` the refined ones (both with WCA
    description weights); the others hold their method's texts (WaffleCLIP's drawn from ``waffle_seed``).
    """
    keys = list(dict.fromkeys(m.bank for m in methods if m.bank is not None))
    return [BankSpec.of(k, refine=METHODS[k].refine, seed=waffle_seed, waffle_words=waffle_words,
                        threshold=threshold, top_k=top_k) for k in keys]


def usable_methods(label_set: LabelSet, methods: Sequence[EvalMethod]) -> tuple[list[EvalMethod], dict[str, str]]:
    """Split ``methods`` into those the label set supports and ``{name: reason}`` for the rest.

    A method is skipped when its label-set file is missing (e.g. no ``clip-d.json``).
    """
    ok: list[EvalMethod] = []
    skipped: dict[str, str] = {}
    reasons: dict[str, str | None] = {}
    for m in methods:
        if m.bank is None:
            ok.append(m)
            continue
        src = m.bank  # bank keys are method names: their texts come from that method's file
        if src not in reasons:
            try:
                label_set.require(src)
                reasons[src] = None
            except LabelSetError as exc:
                reasons[src] = str(exc)
        if reasons[src] is None:
            ok.append(m)
        else:
            skipped[m.name] = str(reasons[src])
    return ok, skipped


# ------------------------------------------------------------------------------------ labels


def class_lookup(classes: Sequence[str], synonyms: Sequence[Sequence[str]] | None = None) -> dict[str, int]:
    """``key_of(name or synonym) → class index`` (the first class wins for a shared key)."""
    lookup: dict[str, int] = {}
    for i, name in enumerate(classes):
        for s in [name, *(synonyms[i] if synonyms is not None else ())]:
            lookup.setdefault(key_of(s), i)
    return lookup


def map_labels(
    labels: Sequence[str | None],
    classes: Sequence[str],
    synonyms: Sequence[Sequence[str]] | None = None,
    label_set_name: str = "label set",
) -> list[int]:
    """Map ground-truth label strings to class indices through :func:`key_of` normalisation.

    Raises :class:`InputError` for missing labels or labels naming no class (listing a few).
    """
    lookup = class_lookup(classes, synonyms)
    out: list[int] = []
    unknown: dict[str, int] = {}
    missing = 0
    for label in labels:
        if label is None or not str(label).strip():
            missing += 1
            out.append(-1)
            continue
        idx = lookup.get(key_of(str(label)))
        if idx is None:
            unknown[str(label)] = unknown.get(str(label), 0) + 1
            out.append(-1)
        else:
            out.append(idx)
    if missing:
        raise InputError(f"{missing} images have no ground-truth label; evaluation needs one per image")
    if unknown:
        names = list(unknown)
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise InputError(
            f"{len(names)} ground-truth labels name no class of '{label_set_name}' "
            f"({sum(unknown.values())} images): {shown}"
        )
    return out


# ----------------------------------------------------------------------------------- scoring


@dataclass
class ViewSet:
    """One view preset's embeddings of a batch of images.

    ``image_emb`` is the whole image as ``bifta label`` encodes it for the preset's method (decoded
    at the preset's working resolution); ``view_emb`` holds every sampled view in sampling order,
    ``view_mask`` marks real (non-padding) views and ``view_kept`` the views the preset's
    refinement keeps (the views ``bifta label`` scores).
    """

    image_emb: torch.Tensor  # float32 [B, D]
    view_emb: torch.Tensor  # float32 [B, V, D]
    view_mask: torch.Tensor  # bool [B, V]
    view_kept: torch.Tensor  # bool [B, V]

    def select(self, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(view_emb, mask)`` for view mode ``all`` or ``kept``.

        ``kept`` moves the kept views to the front (in sampling order) and trims the padding, so a
        row scores the same tensor layout as the labelling pipeline, which encodes only those.
        """
        if mode == "all":
            return self.view_emb, self.view_mask
        if mode != "kept":
            raise ConfigError(f"view mode must be 'all' or 'kept', got {mode!r}")
        keep = self.view_mask & self.view_kept
        if bool(keep.eq(self.view_mask).all()):
            return self.view_emb, self.view_mask
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        width = max(1, int(keep.sum(dim=1).max())) if keep.numel() else 0
        order = order[:, :width]
        emb = torch.gather(self.view_emb, 1, order[..., None].expand(-1, -1, self.view_emb.shape[-1]))
        mask = torch.gather(keep, 1, order)
        # Padding holds zeros, as in the labelling pipeline's batches (not a dropped view's embedding).
        return torch.where(mask[..., None], emb, torch.zeros((), dtype=emb.dtype, device=emb.device)), mask

    def slice(self, start: int, end: int) -> "ViewSet":
        return ViewSet(self.image_emb[start:end], self.view_emb[start:end], self.view_mask[start:end],
                       self.view_kept[start:end])


@dataclass
class ImageBatch:
    """Embeddings of a batch of images, as encoded once for all methods.

    ``image_emb`` is the whole image as the view-less methods encode it; ``views`` holds one
    :class:`ViewSet` per encoded view preset (empty when no views were encoded).
    """

    image_ids: list[str]
    true_index: torch.Tensor  # long [B]
    image_emb: torch.Tensor  # float32 [B, D]
    views: dict[str, ViewSet] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def view_set(self, preset: str | None) -> ViewSet:
        """The :class:`ViewSet` of ``preset``; :class:`ConfigError` when it was not encoded."""
        if preset not in self.views:
            raise ConfigError(f"these embeddings hold no {preset} views; the rows using them cannot be scored")
        return self.views[str(preset)]


@dataclass(frozen=True)
class Protocol:
    """WCA's repeated-run protocol: ``runs`` runs of ``views`` views drawn per image."""

    runs: int
    views: int
    seed: int = 0

    def __post_init__(self) -> None:
        integer("--protocol-runs", self.runs)
        integer("--protocol-views", self.views)


def scores_for(m: EvalMethod, emb: LabelSetEmbeddings, batch: ImageBatch, params: ScoreParams) -> torch.Tensor:
    """``[B, C]`` scores of one row for a batch (all of the row's views)."""
    bank = emb.banks[m.bank] if m.bank is not None else None
    view_emb = view_mask = None
    image_emb = batch.image_emb
    p = params
    if m.uses_views:
        vs = batch.view_set(m.preset)
        view_emb, view_mask = vs.select(m.views)
        image_emb = vs.image_emb
        p = ScoreParams(image_scale=params.image_scale, text_scale=params.text_scale,
                        aggregation=m.aggregation or params.aggregation)
    return method_scores(m.method, emb.class_emb, image_emb, bank, view_emb, view_mask, p)


def protocol_indices(view_mask: torch.Tensor, image_ids: Sequence[str], protocol: Protocol) -> torch.Tensor:
    """``[runs, B, views]`` view indices, drawn per image with a generator seeded from
    ``(protocol.seed, "<image id>:protocol")`` by :func:`sample_view_subsets`."""
    parts = []
    for i, image_id in enumerate(image_ids):
        g = generator_for(protocol.seed, f"{image_id}:protocol")
        parts.append(sample_view_subsets(view_mask[i : i + 1].cpu(), protocol.views, protocol.runs, g))
    return torch.cat(parts, dim=1)


def protocol_scores_for(
    m: EvalMethod, emb: LabelSetEmbeddings, batch: ImageBatch, params: ScoreParams, protocol: Protocol
) -> torch.Tensor:
    """``[runs, B, C]`` scores of a view row under the repeated-run protocol."""
    if not m.uses_views:
        raise ConfigError(f"{m.name} scores no views; the protocol applies to WCA/BiFTA rows only")
    bank = emb.banks[str(m.bank)]
    vs = batch.view_set(m.preset)
    view_emb, mask = vs.select(m.views)
    idx = protocol_indices(mask, batch.image_ids, protocol).to(view_emb.device)
    runs, b, k = idx.shape
    d = view_emb.shape[-1]
    gathered = torch.gather(view_emb[None].expand(runs, -1, -1, -1), 2, idx[..., None].expand(-1, -1, -1, d))
    flat_views = gathered.reshape(runs * b, k, d)
    flat_mask = torch.ones(flat_views.shape[:2], dtype=torch.bool, device=view_emb.device)
    flat_images = vs.image_emb[None].expand(runs, -1, -1).reshape(runs * b, -1)
    scores = wca_scores(
        flat_views, flat_mask, flat_images, bank.desc_emb, bank.desc_class, emb.class_emb,
        image_scale=params.image_scale, text_scale=params.text_scale,
        aggregation=m.aggregation or params.aggregation,
    )
    return scores.reshape(runs, b, -1)


def true_rank(scores: torch.Tensor, true_index: torch.Tensor) -> torch.Tensor:
    """1-based rank of the true class in each row of ``[..., B, C]`` scores → long ``[..., B]``.

    Equal scores rank the lower class index first (the tie rule of :func:`bifta_core.method.prediction.top_k`),
    so ``rank == 1`` exactly when the predicted label is the true one.
    """
    t = true_index.to(scores.device, torch.long)
    target = torch.gather(scores, -1, t.expand(scores.shape[:-1])[..., None])
    classes = torch.arange(scores.shape[-1], device=scores.device)
    ahead = (scores > target) | ((scores == target) & (classes < t[..., None]))
    return 1 + ahead.sum(dim=-1)


def confidences(scores: torch.Tensor, logit_scale: float = DEFAULT_LOGIT_SCALE) -> torch.Tensor:
    """Top-1 probability of ``softmax(logit_scale · scores)`` per row → float32 ``[..., B]``."""
    return torch.softmax(scores.float() * float(logit_scale), dim=-1).amax(dim=-1)


@dataclass
class _Rows:
    image_id: list[str] = field(default_factory=list)
    true_index: list[int] = field(default_factory=list)
    label_index: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    true_score: list[float] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)
    top5: list[list[int]] = field(default_factory=list)
    views: list[int] = field(default_factory=list)  # views the row scores per image (0: whole image only)
    protocol_ranks: list[torch.Tensor] = field(default_factory=list)  # each long [runs, b]


class EvaluationAccumulator:
    """Collects per-image outcomes of every row over streamed batches; summarises at the end.

    Memory is a few numbers per (row, image) — never the score matrices or embeddings.
    """

    def __init__(
        self,
        methods: Sequence[EvalMethod],
        classes: Sequence[str],
        *,
        params: ScoreParams = ScoreParams(),
        protocol: Protocol | None = None,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
    ) -> None:
        if not methods:
            raise ConfigError("no method left to evaluate")
        self.methods = list(methods)
        self.classes = list(classes)
        self.params = params
        self.protocol = protocol
        self.logit_scale = logit_scale
        self._rows = {m.name: _Rows() for m in self.methods}

    def add(self, batch: ImageBatch, emb: LabelSetEmbeddings) -> dict[str, torch.Tensor]:
        """Score ``batch`` with every row and record the outcomes; returns the ``[B, C]`` scores."""
        if len(batch) == 0:
            return {}
        if emb.num_classes != len(self.classes):
            raise ConfigError("label-set embeddings do not match the accumulator's classes")
        out: dict[str, torch.Tensor] = {}
        k = min(5, len(self.classes))
        for m in self.methods:
            scores = scores_for(m, emb, batch, self.params).float()
            out[m.name] = scores
            r = self._rows[m.name]
            t = batch.true_index.to(scores.device)
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
            top = torch.gather(scores, 1, order)
            margin = top[:, 0] - top[:, 1] if k > 1 else torch.zeros(len(batch))
            r.image_id.extend(batch.image_ids)
            r.true_index.extend(t.tolist())
            r.label_index.extend(order[:, 0].tolist())
            r.score.extend(top[:, 0].tolist())
            r.margin.extend(margin.tolist())
            r.confidence.extend(confidences(scores, self.logit_scale).tolist())
            r.true_score.extend(torch.gather(scores, 1, t[:, None])[:, 0].tolist())
            r.rank.extend(true_rank(scores, t).tolist())
            r.top5.extend(order.tolist())
            if m.uses_views:
                r.views.extend(batch.view_set(m.preset).select(m.views)[1].sum(dim=1).tolist())
            else:
                r.views.extend([0] * len(batch))
            if self.protocol is not None and m.uses_views:
                runs = protocol_scores_for(m, emb, batch, self.params, self.protocol)
                r.protocol_ranks.append(true_rank(runs, t).cpu())
        return out

    @property
    def num_images(self) -> int:
        return len(self._rows[self.methods[0].name].image_id)

    def predictions(self) -> pl.DataFrame:
        """One row per (method, image): prediction, scores, confidence and the true class's rank.

        Methods come in report order, images sorted by id within each method."""
        frames = []
        for m in self.methods:
            r = self._rows[m.name]
            n = len(r.image_id)
            frames.append(pl.DataFrame({
                "method": [m.name] * n,
                "image_id": r.image_id,
                "true_label": [self.classes[i] for i in r.true_index],
                "true_index": pl.Series(r.true_index, dtype=pl.Int32),
                "label": [self.classes[i] for i in r.label_index],
                "label_index": pl.Series(r.label_index, dtype=pl.Int32),
                "score": pl.Series(r.score, dtype=pl.Float32),
                "margin": pl.Series(r.margin, dtype=pl.Float32),
                "confidence": pl.Series(r.confidence, dtype=pl.Float32),
                "true_score": pl.Series(r.true_score, dtype=pl.Float32),
                "true_rank": pl.Series(r.rank, dtype=pl.Int32),
                "correct": [x == 1 for x in r.rank],
                "top5_labels": [[self.classes[i] for i in row] for row in r.top5],
                "views_encoded": pl.Series(r.views, dtype=pl.Int32),
            }).sort("image_id", maintain_order=True))
        return pl.concat(frames)

    def metrics(self, bins: int = 10) -> pl.DataFrame:
        """One row per method: ``method, top1, top5, n`` (the contract), then calibration and the
        row's recipe; with a protocol also ``top1_std, top5_std, protocol_runs, protocol_views``
        and the all-views accuracies ``top1_full, top5_full``."""
        preds = self.predictions()
        ece = expected_calibration_error(preds, bins) if preds.height else {}
        rows = []
        for m in self.methods:
            r = self._rows[m.name]
            ranks = torch.tensor(r.rank, dtype=torch.long)
            n = int(ranks.numel())
            row: dict[str, object] = {"method": m.name}
            full = {k: float((ranks <= k).double().mean()) if n else float("nan") for k in TOPK}
            row.update({f"top{k}": full[k] for k in TOPK})
            row["n"] = n
            if self.protocol is not None:
                if m.uses_views and r.protocol_ranks:
                    pr = torch.cat(r.protocol_ranks, dim=1)  # [runs, N]
                    for k in TOPK:
                        acc = (pr <= k).double().mean(dim=1)
                        row[f"top{k}"] = float(acc.mean())
                        row[f"top{k}_std"] = float(acc.std(correction=0))
                    row["protocol_runs"], row["protocol_views"] = self.protocol.runs, self.protocol.views
                else:
                    row.update({f"top{k}_std": 0.0 for k in TOPK})
                    row["protocol_runs"], row["protocol_views"] = 1, 0
                row.update({f"top{k}_full": full[k] for k in TOPK})
            conf = torch.tensor(r.confidence, dtype=torch.float64)
            row["mean_confidence"] = float(conf.mean()) if n else float("nan")
            row["ece"] = ece.get(m.name, float("nan"))
            row.update(scorer=m.method, descriptions=m.descriptions, views=m.views, view_preset=m.preset,
                       aggregation=m.aggregation)
            rows.append(row)
        schema_overrides = {"n": pl.Int64, "aggregation": pl.String, "view_preset": pl.String}
        return pl.DataFrame(rows, schema_overrides=schema_overrides, infer_schema_length=None)

    def per_class(self) -> pl.DataFrame:
        """One row per (method, true class): ``method, class, class_index, n, top1, top5``."""
        return per_class_accuracy(self.predictions())


def per_class_accuracy(predictions: pl.DataFrame) -> pl.DataFrame:
    """Group predictions by (method, true class) → ``method, class, class_index, n, top1, top5``."""
    if predictions.height == 0:
        return pl.DataFrame(schema={"method": pl.String, "class": pl.String, "class_index": pl.Int32,
                                    "n": pl.UInt32, "top1": pl.Float64, "top5": pl.Float64})
    order = {m: i for i, m in enumerate(predictions["method"].unique(maintain_order=True).to_list())}
    return (
        predictions.group_by(["method", "true_label", "true_index"], maintain_order=True)
        .agg(
            n=pl.len(),
            top1=(pl.col("true_rank") == 1).mean(),
            top5=(pl.col("true_rank") <= 5).mean(),
        )
        .rename({"true_label": "class", "true_index": "class_index"})
        .with_columns(_order=pl.col("method").replace_strict(order, return_dtype=pl.Int32))
        .sort(["_order", "class_index"], maintain_order=True)
        .drop("_order")
    )


def reliability_table(predictions: pl.DataFrame, bins: int = 10) -> pl.DataFrame:
    """Accuracy vs confidence in ``bins`` equal-width bins per method (empty bins omitted):
    ``method, bin, lo, hi, n, accuracy, confidence``."""
    if bins < 1:
        raise ConfigError(f"bins must be a positive integer, got {bins}")
    if predictions.height == 0:
        return pl.DataFrame(schema={"method": pl.String, "bin": pl.Int32, "lo": pl.Float64, "hi": pl.Float64,
                                    "n": pl.UInt32, "accuracy": pl.Float64, "confidence": pl.Float64})
    b = (pl.col("confidence").cast(pl.Float64) * bins).floor().clip(0, bins - 1).cast(pl.Int32)
    return (
        predictions.with_columns(bin=b)
        .group_by(["method", "bin"], maintain_order=True)
        .agg(n=pl.len(), accuracy=pl.col("correct").mean(), confidence=pl.col("confidence").cast(pl.Float64).mean())
        .with_columns(lo=pl.col("bin") / bins, hi=(pl.col("bin") + 1) / bins)
        .select("method", "bin", "lo", "hi", "n", "accuracy", "confidence")
        .sort("bin", maintain_order=True)
        .sort(pl.col("method").replace_strict(
            {m: i for i, m in enumerate(predictions["method"].unique(maintain_order=True).to_list())},
            return_dtype=pl.Int32), maintain_order=True)
    )


def expected_calibration_error(predictions: pl.DataFrame, bins: int = 10) -> dict[str, float]:
    """ECE per method: ``Σ_bins n_b / N · |accuracy_b − confidence_b|`` over :func:`reliability_table`."""
    table = reliability_table(predictions, bins)
    if table.height == 0:
        return {}
    ece = (
        table.with_columns(w=pl.col("n") / pl.col("n").sum().over("method"))
        .group_by("method", maintain_order=True)
        .agg(ece=(pl.col("w") * (pl.col("accuracy") - pl.col("confidence")).abs()).sum())
    )
    return dict(zip(ece["method"].to_list(), ece["ece"].to_list()))


def worst_classes(per_class: pl.DataFrame, method: str, n: int = 15) -> pl.DataFrame:
    """The ``n`` classes with the lowest top-1 accuracy for ``method`` (more images first on ties)."""
    return (
        per_class.filter(pl.col("method") == method)
        .sort(["top1", "n", "class_index"], descending=[False, True, False])
        .head(n)
    )


def chunks(batch: ImageBatch, size: int) -> Iterable[ImageBatch]:
    """Split a batch into pieces of at most ``size`` images (bounds the ``[B, C]`` matrices)."""
    if size < 1:
        raise ConfigError(f"chunk size must be positive, got {size}")
    for s in range(0, len(batch), size):
        e = s + size
        yield ImageBatch(
            image_ids=batch.image_ids[s:e],
            true_index=batch.true_index[s:e],
            image_emb=batch.image_emb[s:e],
            views={p: vs.slice(s, e) for p, vs in batch.views.items()},
        )
