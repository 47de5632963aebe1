"""The method table: every rule that makes a method what it is, stated once.

A method is its texts (which label-set role it encodes), its views (the whole image only, or a
view preset), whether its descriptions are refined by default (BiFTA), and its scorer:

=========  ===============  ==================  ==========  =========  ========================
method     texts            label-set files     views       refined    scorer
=========  ===============  ==================  ==========  =========  ========================
clip       class prompt     –                   –           no         prompt (CLIP)
clip-e     templates        clip-e.json         –           no         mean (CLIP-E)
clip-d     descriptors      clip-d.json         –           no         mean (CLIP-D, Menon)
cupl       sentences        cupl.json           –           no         mean (CuPL)
waffle     waffle           clip-d.json         –           no         mean (WaffleCLIP)
wca        sentences        cupl.json           wca         no         wca (WCA §3.2)
bifta      sentences        cupl.json,          bifta       yes        wca (BiFTA)
                            llm-pool.json
=========  ===============  ==================  ==========  =========  ========================

Scorers (:mod:`bifta_core.method.prediction`): ``prompt`` is the cosine to ``"a photo of a {c}."``;
``mean`` the cosine to the re-normalised mean of the class's unit text embeddings; ``wca`` the
cosine between the weighted views and the weighted descriptions (WCA §3.2). Adding a method is
one entry here plus, if it needs one, its scorer.

View presets say how a method's views are made: ``random`` square crops of side
``U(alpha, beta) · min(W, H)`` (WCA §3), or BiFTA's ``grid`` of ``g × g`` non-overlapping square
tiles; then BiFTA's IoU refinement where a threshold is set. This module imports no torch, so the
driver and the CLI can read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bifta_core.errors import ConfigError
from bifta_core.io.label_sets import DESCRIPTORS_FILE, POOL_FILE, SENTENCES_FILE, TEMPLATES_FILE

#: Where a method's texts come from (``bifta_core.io.label_sets.LabelSet.texts`` reads each).
TEXT_SOURCES = ("class prompt", "templates", "descriptors", "sentences", "waffle")
#: How a method turns image and text embeddings into class scores.
SCORERS = ("prompt", "mean", "wca")
#: How views are generated.
VIEW_GENERATORS = ("random", "grid")


@dataclass(frozen=True)
class ViewPreset:
    """Settings for view generation and refinement.

    Attributes:
        name: preset name.
        scale: ``(alpha, beta)``; crop side = ``floor(U(alpha, beta) * min(W, H))`` (random views).
            For grid views ``(1/g, 1/g)``: the tile side, which also sets the working resolution.
        num_views: number of boxes generated per image (``g²`` for a grid).
        iou_threshold: BiFTA view refinement threshold (``None``: no IoU filtering, as in WCA).
        max_views: most views kept after refinement.
        generator: ``random`` (WCA/BiFTA random crops) or ``grid`` (BiFTA's ``--crop_strategy grid``).
        grid: tiles per side of a grid preset.
    """

    name: str
    scale: tuple[float, float]
    num_views: int
    iou_threshold: float | None
    max_views: int
    generator: str = "random"
    grid: int = 3


def grid_preset(base: ViewPreset, grid: int) -> ViewPreset:
    """``base`` with its views made as a ``grid × grid`` tiling (IoU refinement as in ``base``)."""
    if int(grid) != grid or grid < 1:
        raise ConfigError(f"--grid must be a positive integer, got {grid}")
    g = int(grid)
    return replace(base, scale=(1.0 / g, 1.0 / g), num_views=g * g, max_views=g * g, generator="grid", grid=g)


VIEW_PRESETS: dict[str, ViewPreset] = {
    # WCA: 60 crops with scale in [0.1, 0.9], no overlap filtering.
    "wca": ViewPreset("wca", (0.1, 0.9), 60, None, 60),
    # BiFTA: larger crops, overlapping ones removed by IoU > 0.85.
    "bifta": ViewPreset("bifta", (0.5, 0.9), 100, 0.85, 100),
}
#: BiFTA's grid views (the release's default ``--num_grid 3``), refined by BiFTA's IoU rule like its
#: random views (non-overlapping tiles never exceed it, so every tile is kept, as in the release).
VIEW_PRESETS["bifta-grid"] = replace(grid_preset(VIEW_PRESETS["bifta"], 3), name="bifta-grid")


@dataclass(frozen=True)
class Method:
    """One method: what it encodes, which views it scores, and how it scores them."""

    name: str
    texts: str  # one of TEXT_SOURCES
    files: frozenset[str]  # optional label-set files it reads (classes.json is always read)
    scorer: str  # one of SCORERS
    views: str | None  # a VIEW_PRESETS name, or None: the whole image only
    refine: bool  # BiFTA description refinement by default
    summary: str  # what its text side is made of, for reports

    @property
    def uses_views(self) -> bool:
        return self.views is not None

    @property
    def has_bank(self) -> bool:
        """It encodes texts of its own (a text bank); a ``class prompt`` method scores the prompts."""
        return self.texts != "class prompt"

    @property
    def weighted(self) -> bool:
        """Its text bank carries WCA description weights (WCA §3.2)."""
        return self.scorer == "wca"

    @property
    def refinement_pool(self) -> bool:
        """Refinement draws on BiFTA's pool (``cupl.json`` ∪ ``llm-pool.json``), not its own texts."""
        return self.texts == "sentences"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("clip", "class prompt", frozenset(), "prompt", None, False, "class prompt"),
    Method("clip-e", "templates", frozenset({TEMPLATES_FILE}), "mean", None, False, "prompt templates"),
    Method("clip-d", "descriptors", frozenset({DESCRIPTORS_FILE}), "mean", None, False, "descriptors"),
    Method("cupl", "sentences", frozenset({SENTENCES_FILE}), "mean", None, False, "sentences"),
    Method("waffle", "waffle", frozenset({DESCRIPTORS_FILE}), "mean", None, False, "random words and characters"),
    Method("wca", "sentences", frozenset({SENTENCES_FILE}), "wca", "wca", False, "sentences"),
    Method("bifta", "sentences", frozenset({SENTENCES_FILE, POOL_FILE}), "wca", "bifta", True, "refined sentences"),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def method(name: str) -> Method:
    """The table entry of ``name``; :class:`ConfigError` naming the valid methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; choose from {', '.join(METHOD_NAMES)}") from None
