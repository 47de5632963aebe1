"""One typed configuration for a labelling run, shared by the CLI, the Python API and job submission.

``LabelConfig`` is plain data: build it in Python, load it from a YAML/JSON file, or let
``jobs.label`` fill it from flags (flags override the file). ``validate()`` turns every bad value
into a one-line :class:`ConfigError`; the resolved view and description settings for the chosen
method come from the presets of the WCA and BiFTA papers unless overridden.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from bifta_core.method.cascade import DEFAULT_FIRST_STAGE, check_cascade
from bifta_core.errors import ConfigError
from bifta_core.validation import integer, number, switch
from bifta_core.method.registry import METHOD_NAMES, METHODS, VIEW_GENERATORS, VIEW_PRESETS, ViewPreset, grid_preset
from bifta_core.method.presets import PRESETS, preset_names

AGGREGATIONS = ("normalized", "sum")
#: A shard is one Parquet row group of the saved listing (Arrow caps a row group at 1Mi rows).
MAX_SHARD_SIZE = 1_000_000


@dataclass
class ModelConfig:
    """Which CLIP to run and where."""

    model: str = "ViT-B-32"
    pretrained: str = "openai"
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str | None = None
    quick_gelu: bool | None = None  # None: what the weights were trained with (tag config, OpenAI checkpoint)


@dataclass
class LabelConfig:
    """Everything that determines a labelling run's output rows."""

    input: str = ""
    labels: list[str] = field(default_factory=list)  # "PATH" or "NAME=PATH", one per label set
    out: str = ""
    method: str | None = None  # None: the --preset's method, else bifta
    model: ModelConfig = field(default_factory=ModelConfig)
    # A released configuration (bifta_core.method.presets): its view settings replace the method's defaults
    preset: str | None = None
    # Views (None = the method's preset: wca 60 views at scale 0.1-0.9; bifta 100 at 0.5-0.9, IoU 0.85)
    views: str | None = None  # random | grid (None: the method's generator, random)
    grid: int = 3  # tiles per side of grid views (BiFTA's --num_grid)
    num_views: int | None = None
    max_views: int | None = None
    iou_threshold: float | None = None
    scale: tuple[float, float] | None = None
    # Description refinement (BiFTA): cosine threshold and top-K per class
    refine_descriptions: bool | None = None
    desc_threshold: float = 0.99
    desc_top_k: int = 50
    # WCA scoring
    image_scale: float = 4.0
    text_scale: float = 2.0
    aggregation: str = "normalized"
    # Execution
    batch_size: int = 8  # images per encode batch (views of these images are flattened together)
    view_batch_size: int = 256  # crops per encoder forward pass
    num_encoders: int | None = None  # encode actors; default: --gpus, else one per visible GPU, else one CPU actor
    gpus: int | None = None  # GPU encode actors to ask the cluster for (autoscaling clusters start with none)
    num_decoders: int | None = None  # most decode+views tasks at once (default: the free CPUs)
    seed: int = 0
    limit: int | None = None
    top_k: int = 5
    max_pixels: int = 120_000_000  # decompression-bomb guard (Pillow refuses > ~179 MP regardless)
    merge_duplicate_classes: bool = False
    labelset_cache: str | None = None  # default: labelsets/ of the cache root (bifta_core.io.cache); "" disables
    labelset_artifacts: list[str] = field(default_factory=list)
    waffle_words: str | None = None  # WaffleCLIP word list (.pkl/.json/.txt); default: the bundled list
    pgs_keep: float | None = None  # CLIP-PGS keep ratio for view encodes (None = off)
    pgs_whole_image: bool = False  # also apply PGS to the whole-image encode
    # Cascade (bifta_core.method.cascade): keep the first stage's answer where its margin is >= T, views elsewhere
    cascade_margin: float | None = None  # T (None: no cascade; inf: views for every image)
    cascade_first: str = DEFAULT_FIRST_STAGE  # the whole-image method that decides first
    explain: bool = True
    explain_views: int = 5  # top_views: the K highest-weighted views of a WCA/BiFTA row (0: none)
    # Kept embeddings (bifta_core.io.saved_embeddings), for `bifta relabel`
    save_embeddings: bool = False  # the whole-image embedding of every image, next to each part file
    save_view_embeddings: bool = False  # also the encoded views, their boxes and weights (implies the above)
    embeddings_dtype: str = "float16"
    shard_size: int = 20_000  # inputs per shard = per output file (~5,000 files at 100M images)
    retry_errors: bool = False  # redo the shards whose files hold error rows
    # S3 settings as flags (else the standard AWS environment); never credentials
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_anon: bool = False

    def __post_init__(self) -> None:
        if self.method is None:  # a released preset names its method
            known = isinstance(self.preset, str) and self.preset in PRESETS
            self.method = PRESETS[self.preset].method if known else "bifta"

    # ------------------------------------------------------------------ resolution
    @property
    def uses_views(self) -> bool:
        return self.method in METHODS and METHODS[self.method].uses_views

    @property
    def cascade(self) -> bool:
        """A cascade run: a first stage scores the whole image, views only where it is unsure."""
        return self.cascade_margin is not None

    def view_preset(self, name: str | None = None) -> ViewPreset:
        """The view settings in force for the view preset ``name`` (default: the method's, as a grid
        under ``views: grid``): the released ``--preset``'s settings where it is for that preset,
        else the method defaults, with explicit overrides applied."""
        if name is None:
            name = METHODS[self.method].views or "bifta"
        release = PRESETS.get(self.preset) if self.preset else None
        base = release.view if release is not None and release.view.name == name else VIEW_PRESETS[name]
        if base.generator == "grid" or (self.views == "grid" and name == METHODS[self.method].views):
            base = grid_preset(base, self.grid)
        iou = self.iou_threshold if self.iou_threshold is not None else base.iou_threshold
        if base.generator == "grid":  # the tiling fixes the views: only the refinement can be changed
            return dataclasses.replace(base, iou_threshold=iou)
        num = self.num_views if self.num_views is not None else base.num_views
        max_views = self.max_views if self.max_views is not None else (base.max_views if iou is not None else num)
        return ViewPreset(
            name=base.name,
            scale=tuple(self.scale) if self.scale is not None else base.scale,
            num_views=num,
            iou_threshold=iou,
            max_views=min(max_views, num),
        )

    @property
    def refines_descriptions(self) -> bool:
        if self.refine_descriptions is not None:
            return self.refine_descriptions
        return METHODS[self.method].refine

    def label_specs(self) -> list[tuple[str | None, str]]:
        """``--labels`` values as (name or None, location)."""
        specs = []
        for item in self.labels:
            name, sep, path = item.partition("=")
            if sep and name and "/" not in name and "," not in name and path:
                specs.append((name.strip(), path.strip()))
            else:
                specs.append((None, item))
        return specs

    # ------------------------------------------------------------------ validation
    def validate(self) -> "LabelConfig":
        """Raise :class:`ConfigError` for the first bad value; return self for chaining."""
        if not self.input:
            raise ConfigError("no INPUT given (a folder, glob, manifest .csv/.parquet, or s3:// prefix)")
        if not self.labels and not self.labelset_artifacts:
            raise ConfigError("no label set given: pass --labels PATH (or --labelset-artifact)")
        if not self.out:
            raise ConfigError("no output location given: pass --out PATH")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHOD_NAMES)}, got '{self.method}'")
        if self.preset is not None:
            if not isinstance(self.preset, str) or self.preset not in PRESETS:
                raise ConfigError(f"unknown --preset '{self.preset}'; `bifta presets` lists them: {', '.join(preset_names())}")
            if PRESETS[self.preset].method != self.method:
                raise ConfigError(f"--preset {self.preset} is a setting of --method {PRESETS[self.preset].method}, "
                                  f"not {self.method}")
        if self.views is not None and self.views not in VIEW_GENERATORS:
            raise ConfigError(f"--views must be one of {', '.join(VIEW_GENERATORS)}, got '{self.views}'")
        if self.views == "grid":
            if not self.uses_views:
                view_methods = ", ".join(m.name for m in METHODS.values() if m.uses_views)
                raise ConfigError(f"--views grid needs a method that scores views ({view_methods}), not {self.method}")
            if self.num_views is not None or self.scale is not None or self.max_views is not None:
                raise ConfigError("--views grid makes --grid × --grid tiles: --num-views, --max-views and --scale "
                                  "do not apply")
        integer("--grid", self.grid, maximum=16)
        if self.waffle_words is not None:
            if not isinstance(self.waffle_words, str) or not self.waffle_words:
                raise ConfigError(f"--waffle-words must be a file path, got {self.waffle_words!r}")
            from bifta_core.method.waffle import words_location

            self.waffle_words = words_location(self.waffle_words)
        if not isinstance(self.cascade_first, str):
            raise ConfigError(f"--cascade-first must be a method name, got {self.cascade_first!r}")
        check_cascade(self.method, self.cascade_first, self.cascade_margin)
        for flag, value in (("--save-embeddings", self.save_embeddings),
                            ("--save-view-embeddings", self.save_view_embeddings), ("--no-explain", self.explain)):
            switch(flag, value)
        if self.save_view_embeddings:
            if not self.uses_views:
                raise ConfigError(f"--save-view-embeddings needs a method that encodes views (wca, bifta), "
                                  f"not {self.method}")
            self.save_embeddings = True
        if self.embeddings_dtype not in ("float16", "float32"):
            raise ConfigError(f"--embeddings-dtype must be float16 or float32, got {self.embeddings_dtype!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}, got '{self.aggregation}'")
        integer("--num-views", self.num_views, optional=True)
        integer("--max-views", self.max_views, optional=True)
        integer("--batch-size", self.batch_size, optional=True)
        integer("--view-batch-size", self.view_batch_size, optional=True)
        integer("--num-encoders", self.num_encoders, optional=True)
        integer("--gpus", self.gpus, optional=True)
        integer("--num-decoders", self.num_decoders, optional=True)
        integer("--limit", self.limit, optional=True)
        integer("--top-k", self.top_k, optional=True)
        integer("--explain-views", self.explain_views, minimum=0)
        integer("--desc-top-k", self.desc_top_k, optional=True)
        integer("--max-pixels", self.max_pixels, optional=True)
        integer("--shard-size", self.shard_size, optional=True)
        for flag, value, optional in (
            ("--iou-threshold", self.iou_threshold, True),
            ("--desc-threshold", self.desc_threshold, False),
            ("--pgs-keep", self.pgs_keep, True),
            ("--image-scale", self.image_scale, False),
            ("--text-scale", self.text_scale, False),
        ):
            number(flag, value, optional=optional)
        for flag, value in (("--model", self.model.model), ("--pretrained", self.model.pretrained),
                            ("--device", self.model.device), ("--precision", self.model.precision)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{flag} must be a non-empty string, got {value!r}")
        if self.model.quick_gelu is not None and not isinstance(self.model.quick_gelu, bool):
            raise ConfigError(f"--quick-gelu must be true, false or unset, got {self.model.quick_gelu!r}")
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            raise ConfigError(f"--labels must be a list of label-set locations, got {self.labels!r}")
        if self.scale is not None:
            if not isinstance(self.scale, (tuple, list)) or len(self.scale) != 2:
                raise ConfigError(f"--scale must be two numbers A,B, got {self.scale!r}")
            for v in self.scale:
                number("--scale", v)
        if self.iou_threshold is not None and not 0.0 <= self.iou_threshold <= 1.0:
            raise ConfigError(f"--iou-threshold must be within [0, 1], got {self.iou_threshold}")
        if not -1.0 <= self.desc_threshold <= 1.0:
            raise ConfigError(f"--desc-threshold must be a cosine within [-1, 1], got {self.desc_threshold}")
        if self.scale is not None:
            a, b = self.scale
            if not 0.0 < a <= b <= 1.0:
                raise ConfigError(f"--scale A,B needs 0 < A <= B <= 1, got {a},{b}")
        if self.shard_size > MAX_SHARD_SIZE:
            raise ConfigError(f"--shard-size must be at most {MAX_SHARD_SIZE:,}, got {self.shard_size:,}")
        if self.pgs_keep is not None and not 0.0 < self.pgs_keep <= 1.0:
            raise ConfigError(f"--pgs-keep must be within (0, 1], got {self.pgs_keep}")
        integer("--seed", self.seed, minimum=0)
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["scale"] is not None:
            d["scale"] = list(d["scale"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelConfig":
        """Build from plain data (a config file); unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ConfigError("a config file must hold a mapping of option names to values")
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
        model_data = data.pop("model", {}) or {}
        if isinstance(model_data, str):
            model_data = {"model": model_data}
        if not isinstance(model_data, dict):
            raise ConfigError(f"config option 'model' must be an architecture name or a mapping, got {model_data!r}")
        model_data = dict(model_data)
        for key in list(data):
            if key in model_keys and key not in known:
                model_data[key] = data.pop(key)
        unknown = sorted(set(data) - known) + sorted(f"model.{k}" for k in set(model_data) - model_keys)
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(unknown)}")
        if isinstance(data.get("labels"), str):
            data["labels"] = [data["labels"]]
        if isinstance(data.get("labelset_artifacts"), str):
            data["labelset_artifacts"] = [data["labelset_artifacts"]]
        if data.get("scale") is not None:
            data["scale"] = parse_scale(data["scale"])
        return cls(model=ModelConfig(**model_data), **data)

    @classmethod
    def from_file(cls, path: str) -> "LabelConfig":
        """Read a YAML or JSON config file."""
        return cls.from_dict(cls.read_file(path))

    @staticmethod
    def read_file(path: str) -> Any:
        """The plain data of a YAML or JSON config file (unresolved: no defaults filled in)."""
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            if path.lower().endswith(".json"):
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except Exception as exc:  # yaml and json raise different types; both are user errors here
            raise ConfigError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
        return data


def parse_scale(value: Any) -> tuple[float, float]:
    """``"0.5,0.9"`` or ``[0.5, 0.9]`` → ``(0.5, 0.9)``."""
    try:
        if isinstance(value, str):
            parts = [float(p) for p in value.split(",")]
        else:
            parts = [float(p) for p in value]
    except (TypeError, ValueError):
        raise ConfigError(f"--scale must be two numbers A,B, got {value!r}") from None
    if len(parts) != 2:
        raise ConfigError(f"--scale must be two numbers A,B, got {value!r}")
    return parts[0], parts[1]


