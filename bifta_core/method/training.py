"""CLIP / CLIP-PGS contrastive training: config, loss, optimiser, schedule, augmentation, step.

Pure torch (no Ray): ``pipelines/train.py`` runs :class:`Trainer` inside Ray Train workers, and
``jobs/bench.py pgs-train`` times it alone. What is implemented, and where it comes from:

* CLIP-PGS (Pei et al., "Seeing What Matters: Empowering CLIP with Patch Generation-to-Selection",
  CVPR 2025): during contrastive pre-training/fine-tuning, a fraction ``pgs_mask`` of the ViT's
  patch tokens is removed before the transformer (Sec. 3); which ones is chosen by the paper's
  generation-to-selection (Sec. 3.2-3.3), i.e. :func:`bifta_core.method.pgs.select_patches` -- the very
  code ``bifta label --pgs-keep`` uses at inference. ``pgs_mask=0`` is plain CLIP.
* The loss is CLIP's symmetric InfoNCE over the global batch (Radford et al. 2021, Fig. 3), with a
  learnable temperature ``logit_scale`` clamped to ``ln 100`` after every step.
* Optimiser and schedule follow open_clip's training defaults for ViTs (which CLIP-PGS trains
  with): AdamW, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on weight matrices only (not on
  gains, biases, embeddings' 1-D params or ``logit_scale``), linear warm-up then cosine decay.
* Gradient accumulation as in open_clip: features of all micro-batches are computed first without
  gradients, then each micro-batch is recomputed with gradients and its loss taken against the
  whole accumulated batch, so negatives come from the full effective batch (not the micro-batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bifta_core.errors import ConfigError
from bifta_core.validation import integer
from bifta_core.method.seeding import derive_seed

__all__ = [
    "TrainConfig",
    "PgsClip",
    "Trainer",
    "StepResult",
    "clip_loss",
    "param_groups",
    "build_optimizer",
    "cosine_lr_lambda",
    "random_resized_crop",
    "decode_train_image",
    "epoch_permutation",
    "sample_index",
    "state_dict_sha256",
    "MAX_LOGIT_SCALE",
]

#: CLIP clamps the learnable ``logit_scale`` so the softmax temperature never drops below 1/100
#: (Radford et al. 2021, Sec. 2.5); open_clip clamps ``ln``-space to ``[0, ln 100]``.
MAX_LOGIT_SCALE = math.log(100.0)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_TAG_KEYS = ("model", "pretrained")


# ----------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Every setting of a training run; the CLI (``bifta train``) and the Python API share it.

    Batch sizes: ``batch_size`` images per worker per micro-step; ``accum_steps`` micro-steps per
    optimiser step; the effective (global) batch is ``batch_size * accum_steps * num_workers``
    and the contrastive loss sees all of it as negatives (open_clip semantics).
    """

    data: list[str] = field(default_factory=list)  # manifests (.parquet/.csv, local or s3://)
    out: str = ""  # checkpoints, metrics and summary (local or s3://)
    model: str = "ViT-B-16"  # the paper trains ViT-B/16
    pretrained: str = "random"  # open_clip tag, checkpoint path/URI, or random/scratch
    pgs_mask: float = 0.5  # fraction of patch tokens masked; 0 = plain CLIP
    steps: int | None = None  # optimiser steps; default: epochs x steps per epoch
    epochs: int | None = None  # default 1 when steps is not given
    batch_size: int = 64
    accum_steps: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int | None = None  # default min(10000, 10 % of the steps)
    grad_clip_norm: float | None = None
    precision: str = "auto"  # fp32 on CPU; fp16 autocast (+ grad scaling) on CUDA; or bf16
    aug_scale: tuple[float, float] = (0.9, 1.0)  # open_clip's RandomResizedCrop scale for training
    seed: int = 0
    checkpoint_every: int = 1000
    resume: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    data_cpus: float = 1.0  # CPUs per decode/augment task
    uri_column: str = "uri"
    image_column: str = "image"  # bytes column, used when the manifest has no uri column
    caption_column: str = "caption"
    id_column: str = "image_id"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_anon: bool = False

    # --------------------------------------------------------------- helpers
    @property
    def keep_ratio(self) -> float:
        return 1.0 - float(self.pgs_mask)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum_steps * self.num_workers

    @property
    def from_scratch(self) -> bool:
        return self.pretrained in ("random", "scratch")

    @property
    def load_pretrained(self) -> str:
        """The ``--pretrained`` value for :func:`bifta_core.io.models.load_model`."""
        return "random" if self.from_scratch else self.pretrained

    def warmup_steps(self, total_steps: int) -> int:
        if self.warmup is not None:
            return self.warmup
        return min(10_000, max(1, total_steps // 10))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["aug_scale"] = list(self.aug_scale)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("data"), str):
            values["data"] = [values["data"]]
        if values.get("aug_scale") is not None:
            values["aug_scale"] = _pair("--aug-scale", values["aug_scale"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str) -> "TrainConfig":
        import json

        from bifta_core.io import storage

        try:
            text = storage.read_bytes(path).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --config {path}: {exc}") from exc
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml/json parse errors: one line
            raise ConfigError(f"--config {path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path} must hold a mapping of settings")
        return cls.from_dict({k.replace("-", "_"): v for k, v in data.items()})

    # --------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` (one line, naming the flag) for the first bad value."""
        if not self.data:
            raise ConfigError("no --data manifest given (.parquet/.csv with a uri or image column and a caption column)")
        if not self.out:
            raise ConfigError("no --out given (checkpoints and metrics go there; local folder or s3://)")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("--model must name an open_clip architecture")
        if not isinstance(self.pretrained, str) or not self.pretrained:
            raise ConfigError("--pretrained is empty: an open_clip tag, a checkpoint path/URI, or random")
        m = self.pgs_mask
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise ConfigError(f"--pgs-mask must be a number in [0, 1) (0 = plain CLIP), got {m!r}")
        for name in ("batch_size", "accum_steps", "num_workers", "checkpoint_every", "cpus_per_worker"):
            _int(name, getattr(self, name), minimum=1)
        if self.steps is not None:
            _int("steps", self.steps, minimum=1)
        if self.epochs is not None:
            _int("epochs", self.epochs, minimum=1)
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give --steps or --epochs, not both")
        if self.warmup is not None:
            _int("warmup", self.warmup, minimum=0)
        _int("seed", self.seed, minimum=0)
        for name in ("lr", "eps", "data_cpus"):
            _number(name, getattr(self, name), positive=True)
        _number("weight_decay", self.weight_decay, positive=False)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _number(name, v, positive=False)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"--{name} must be in [0, 1), got {v}")
        if self.grad_clip_norm is not None:
            _number("grad_clip_norm", self.grad_clip_norm, positive=True)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        lo, hi = _pair("--aug-scale", self.aug_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"--aug-scale must be A,B with 0 < A <= B <= 1, got {lo},{hi}")
        for name in ("resume", "use_gpu", "s3_anon"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        return self


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int(name: str, value: Any, minimum: int) -> None:
    integer(_flag(name), value, minimum=minimum)


def _number(name: str, value: Any, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        kind = "a positive number" if positive else "a number >= 0"
        raise ConfigError(f"{_flag(name)} must be {kind}, got {value!r}")


def _pair(flag: str, value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        value = value.split(",")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be two numbers A,B, got {value!r}") from None
    return lo, hi


# ----------------------------------------------------------------------------------- data
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of ``epoch``: a permutation of ``range(num_samples)`` seeded from (seed, epoch).

    A pure function of its arguments, so a resumed run (or any data worker) recomputes exactly the
    order the first run used.
    """
    rng = np.random.default_rng(derive_seed(seed, f"epoch:{epoch}"))
    return rng.permutation(num_samples)


def sample_index(positions: np.ndarray, num_samples: int, epoch_len: int, seed: int,
                 perm_cache: dict[tuple[int, int, int], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Map global stream positions to (manifest row, epoch).

    The stream is epoch 0's permutation truncated to ``epoch_len`` (whole global batches), then
    epoch 1's, ... so position ``step * global_batch + j`` is the ``j``-th sample of ``step``.
    """
    positions = np.asarray(positions, dtype=np.int64)
    epochs = positions // epoch_len
    rows = np.empty_like(positions)
    cache = perm_cache if perm_cache is not None else {}
    for e in np.unique(epochs):
        # keyed by everything the permutation depends on: a reused worker process may serve
        # several runs (other seeds, other manifests) one after the other
        key = (num_samples, seed, int(e))
        if key not in cache:
            cache.clear()  # one epoch's permutation at a time: memory stays O(num_samples)
            cache[key] = epoch_permutation(num_samples, seed, int(e))
        sel = epochs == e
        rows[sel] = cache[key][positions[sel] - int(e) * epoch_len]
    return rows, epochs


def random_resized_crop(width: int, height: int, scale: tuple[float, float], gen: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10
                        ) -> tuple[int, int, int, int]:
    """(left, top, w, h) of torchvision's ``RandomResizedCrop`` box, drawn from ``gen``.

    Same sampling as torchvision (area fraction uniform in ``scale``, log-uniform aspect ratio,
    10 attempts, then a centred crop clamped to ``ratio``), but from an explicit generator so each
    image's augmentation depends only on (seed, image id, epoch).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        u = torch.rand(4, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = min(int(u[2] * (width - w + 1)), width - w)
            top = min(int(u[3] * (height - h + 1)), height - h)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_train_image(data: bytes, size: int, scale: tuple[float, float], seed: int, image_id: str,
                       epoch: int) -> np.ndarray:
    """Decode, random-resized-crop and resize one training image → ``uint8 [3, size, size]``.

    open_clip's training transform (RandomResizedCrop to the model's input size, bicubic, no flip:
    captions may name left and right), seeded from (seed, image id, epoch) so every epoch sees a
    new crop and a rerun sees the same one. Normalisation happens on the trainer.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        gen = torch.Generator().manual_seed(derive_seed(seed, f"aug:{image_id}:{epoch}"))
        left, top, w, h = random_resized_crop(img.width, img.height, scale, gen)
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


# ----------------------------------------------------------------------------------- model
class PgsClip(nn.Module):
    """An open_clip CLIP whose ``forward`` encodes images with CLIP-PGS token masking.

    Wrapping the whole forward in one module lets DDP see it (calling
    :func:`bifta_core.method.pgs.encode_image_with_keep` on ``ddp.module`` would bypass the gradient
    all-reduce hooks). ``keep_idx=None`` is the plain CLIP image forward.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, keep_idx: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from bifta_core.method.pgs import encode_image_with_keep

        if keep_idx is None:
            img = self.clip.encode_image(pixels)
        else:
            img = encode_image_with_keep(self.clip, pixels, keep_idx)
        txt = self.clip.encode_text(tokens)
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), self.clip.logit_scale.exp()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
              ) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3): mean of image→text and text→image
    cross-entropies over the ``[B, B]`` scaled cosine logits, positives on the diagonal."""
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's exclusion rule: gains/biases (1-D), LayerNorm/BatchNorm, and ``logit_scale``."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weight decay on weight matrices only (open_clip ``main.py`` defaults)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel (same update, one pass over memory) where
    torch has it for the parameters' device -- on CPU the per-tensor default costs as much as a
    ViT-B forward pass for small batches."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, **kwargs)


def cosine_lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """open_clip's ``cosine_lr``: linear warm-up to the base LR over ``warmup`` steps, then cosine
    decay to 0 at ``total``. Returns the LR multiplier for ``LambdaLR`` (step counted from 0)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))

    return factor


def state_dict_sha256(module: nn.Module) -> str:
    """Content hash of a module's weights (compares DDP replicas and reruns)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------- trainer
@dataclass
class StepResult:
    """What one optimiser step did (the per-step metrics row)."""

    step: int  # 1-based: the number of optimiser steps done after this one
    loss: float
    lr: float
    logit_scale: float
    images: int  # images in this step, all workers
    kept_tokens: int  # patch tokens each image kept (class token excluded)
    masked_tokens: int  # patch tokens each image lost to CLIP-PGS
    seconds: float


class _Gather:
    """All-gather of features across DDP ranks; identity on one process.

    As in open_clip (``gather_with_grad=False, local_loss=False``): other ranks' features come in
    without gradient, this rank's slice keeps its own so the backward pass reaches its encoder.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[self.rank] = x
        return torch.cat(parts)


class Trainer:
    """One process's part of CLIP / CLIP-PGS training (single process or one DDP rank).

    ``model`` is an open_clip CLIP (ViT image tower when ``pgs_mask > 0``); ``wrap`` turns the
    :class:`PgsClip` around it into what is called forward (DDP in Ray Train; identity alone).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, *, mean: Sequence[float],
                 std: Sequence[float], device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
        from bifta_core.method import pgs

        self.cfg, self.total_steps, self.rank, self.world = cfg, total_steps, rank, world
        self.device = torch.device(device)
        self.module = PgsClip(model).to(self.device).train()
        self.forward = wrap(self.module) if wrap is not None else self.module
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.pgs_config = None
        if cfg.pgs_mask > 0:
            if not pgs.supports_pgs(model):
                raise ConfigError(f"--pgs-mask needs a ViT image tower; {cfg.model} has none (use --pgs-mask 0)")
            self.patch_size = pgs.patch_size_of(model)
            self.num_patches = math.prod(pgs.grid_size_of(model))
            self.pgs_config = pgs.PgsConfig(keep_ratio=cfg.keep_ratio)
        elif pgs.supports_pgs(model):
            self.num_patches = math.prod(pgs.grid_size_of(model))
        else:
            self.num_patches = 0
        self.optimizer = build_optimizer(self.module.clip, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_lr_lambda(cfg.warmup_steps(total_steps), total_steps))
        self.precision = _resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.gather = _Gather(rank, world)
        self.step = 0

    # ----------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Optimiser, schedule, scaler and step: with the weights, all a resume needs."""
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])

    @property
    def clip(self) -> nn.Module:
        return self.module.clip

    # ----------------------------------------------------------- step
    def _autocast(self):
        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            return torch.autocast("cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)
        return contextlib.nullcontext()

    def normalize(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        x = pixels_uint8.to(self.device, torch.float32, non_blocking=True) / 255.0
        return (x - self.mean) / self.std

    def select(self, pixels: torch.Tensor, micro: int) -> torch.Tensor | None:
        """CLIP-PGS kept-patch indices for one micro-batch (Sec. 3.2-3.3), or ``None`` (plain CLIP).

        Seeded from (seed, step, rank, micro-batch): a rerun of the same step selects the same
        patches, and no two ranks or micro-batches share a random stream.
        """
        if self.pgs_config is None:
            return None
        from bifta_core.method import pgs

        gen = torch.Generator().manual_seed(
            derive_seed(self.cfg.seed, f"pgs:{self.step}:{self.rank}:{micro}"))
        return pgs.select_patches(pixels, self.mean.flatten().tolist(), self.std.flatten().tolist(),
                                  self.patch_size, self.pgs_config, gen)

    def train_step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimiser step over ``accum_steps`` micro-batches of ``(uint8 pixels, tokens)``.

        With one micro-batch: forward, all-gather, loss over the global batch, backward. With more
        (open_clip's accumulation): features of every micro-batch without gradient first, then each
        micro-batch again with gradient and its loss against the whole accumulated batch; DDP's
        all-reduce runs only on the last backward.
        """
        start = time.perf_counter()
        inputs = []
        for j, (pixels, tokens) in enumerate(micro_batches):
            x = self.normalize(pixels)
            inputs.append((x, tokens.to(self.device, non_blocking=True), self.select(x, j)))
        self.optimizer.zero_grad(set_to_none=True)

        if len(inputs) == 1:
            x, t, keep = inputs[0]
            with self._autocast():
                img, txt, scale = self.forward(x, t, keep)
                loss = clip_loss(self.gather(img.float()), self.gather(txt.float()), scale.float())
            self.scaler.scale(loss).backward()
            loss_value = float(loss.detach())
        else:
            with torch.no_grad(), self._autocast():
                cached = [self.forward(x, t, keep)[:2] for x, t, keep in inputs]
            loss_value = 0.0
            for j, (x, t, keep) in enumerate(inputs):
                last = j == len(inputs) - 1
                sync = contextlib.nullcontext() if last or not hasattr(self.forward, "no_sync") \
                    else self.forward.no_sync()
                with sync:
                    with self._autocast():
                        img, txt, scale = self.forward(x, t, keep)
                        imgs = torch.cat([c[0] for c in cached[:j]] + [img] + [c[0] for c in cached[j + 1:]])
                        txts = torch.cat([c[1] for c in cached[:j]] + [txt] + [c[1] for c in cached[j + 1:]])
                        loss = clip_loss(self.gather(imgs.float()), self.gather(txts.float()), scale.float())
                    self.scaler.scale(loss).backward()
                loss_value = float(loss.detach())  # every micro-batch sees the same full-batch loss

        if self.cfg.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        with torch.no_grad():  # CLIP's temperature clamp (Radford et al. 2021, Sec. 2.5)
            self.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        keep = inputs[0][2]
        kept = int(keep.shape[1]) if keep is not None else self.num_patches
        images = sum(int(x.shape[0]) for x, _, _ in inputs) * self.world
        return StepResult(step=self.step, loss=loss_value, lr=float(lr),
                          logit_scale=float(self.clip.logit_scale.detach().exp()), images=images,
                          kept_tokens=kept, masked_tokens=self.num_patches - kept,
                          seconds=time.perf_counter() - start)


def _resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 on CPU; on CUDA ``auto`` means fp16 autocast with grad scaling (open_clip's ``amp``)."""
    if device.type != "cuda":
        return "fp32"
    return "fp16" if precision == "auto" else precision
