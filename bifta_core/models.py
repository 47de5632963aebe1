"""CLIP model loading: any open_clip architecture, weights from a hub tag, a file or a URI.

``pretrained`` may be
- an open_clip tag (``openai``, ``laion2b_s34b_b79k``…) — downloaded through open_clip's hub code;
- a local checkpoint path, loaded with ``torch.load(weights_only=True)`` via open_clip;
- an fsspec URI (``s3://…``), downloaded once per node into a local cache first;
- ``random`` — the architecture with seeded random weights, for tests and smoke runs only.

The loaded model is wrapped in :class:`ClipModel`, which owns device, precision and the
preprocessing constants every other stage needs (input size, mean, std).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from bifta_core.errors import ModelLoadError

logger = logging.getLogger("bifta.models")

RANDOM_WEIGHTS = "random"
#: Seed of ``pretrained="random"`` weights: every process (each Ray actor) builds the same model.
RANDOM_WEIGHTS_SEED = 0
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_HUB_HOSTS = (("huggingface.co", 443), ("openaipublic.azureedge.net", 443))


@lru_cache(maxsize=None)
def register_bundled_configs() -> tuple[str, ...]:
    """Register the tiny test architectures shipped in ``bifta_core/model_configs`` with open_clip."""
    import open_clip

    names = []
    for path in sorted(_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(path)
        names.append(path.stem)
    return tuple(names)


def _known_architectures() -> list[str]:
    import open_clip

    register_bundled_configs()
    return open_clip.list_models()


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or value.startswith(".")
        or value.startswith("~")
        or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    )


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP probe, so an offline machine fails in seconds instead of minutes of retries.

    Behind a proxy or a hub mirror a direct connection proves nothing, so the probe is skipped
    (and the hub client's own timeouts apply).
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    for host, port in _HUB_HOSTS:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


@contextlib.contextmanager
def _hf_offline(enabled: bool):
    """Make huggingface_hub serve from its local cache only (no HEAD requests, no retries)."""
    if not enabled:
        yield
        return
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants

        old_flag = getattr(hf_constants, "HF_HUB_OFFLINE", None)
        hf_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
        hf_constants, old_flag = None, None
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = old_flag


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights come from, and a stable identity for cache keys."""

    kind: str  # "random" | "file" | "tag"
    source: str  # local path, tag name, or "random"
    identity: str  # changes whenever the weights change


@lru_cache(maxsize=64)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, cached per (path, size, mtime) so a process hashes each checkpoint once."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_identity(path: str) -> str:
    """Identity by content, not path or mtime: a copy of the same checkpoint elsewhere is the same model."""
    st = os.stat(path)
    return f"sha256:{_content_digest(os.path.realpath(path), st.st_size, st.st_mtime_ns)}"


def _canonical_tag(model_name: str, pretrained: str) -> str | None:
    import open_clip

    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        if tag.lower() == pretrained.lower():
            return tag
    return None


def resolve_pretrained(model_name: str, pretrained: str, cache_dir: str | None = None) -> ResolvedWeights:
    """Turn the user's ``--pretrained`` value into a local file, a hub tag, or random weights.

    A remote checkpoint is downloaded once per node (later calls reuse the copy, even offline) and,
    like a local file, identified by its content hash, so every node and every rerun agree on it.
    Raises :class:`ModelLoadError` with a one-line message naming ``--pretrained`` when the weights
    cannot be had (missing file, unknown tag, failed download).
    """
    import open_clip

    if not pretrained:
        raise ModelLoadError("--pretrained is empty: give an open_clip tag, a checkpoint path or URI, or 'random'")
    if pretrained == RANDOM_WEIGHTS:
        return ResolvedWeights("random", RANDOM_WEIGHTS, f"random:{RANDOM_WEIGHTS_SEED}")
    if "://" in pretrained and not pretrained.startswith("file://"):
        from bifta_core import storage

        try:
            local = storage.cached_download(pretrained, cache_dir=cache_dir)
        except Exception as exc:  # storage raises StorageError; anything else is a transport failure
            raise ModelLoadError(f"cannot fetch checkpoint {pretrained} (--pretrained): {exc}") from exc
        return ResolvedWeights("file", local, _file_identity(local))
    local_candidate = os.path.expanduser(pretrained.removeprefix("file://"))
    if os.path.isfile(local_candidate):
        return ResolvedWeights("file", local_candidate, _file_identity(local_candidate))
    if os.path.isdir(local_candidate):
        raise ModelLoadError(f"--pretrained {pretrained} is a folder; point it at the checkpoint file inside")
    tag = _canonical_tag(model_name, pretrained)
    if tag is not None:
        return ResolvedWeights("tag", tag, f"tag:{model_name}:{tag}")
    if _looks_like_path(pretrained):
        raise ModelLoadError(f"checkpoint file not found: {pretrained} (--pretrained)")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    known = ", ".join(tags) if tags else "none — pass a checkpoint path"
    raise ModelLoadError(
        f"unknown pretrained tag '{pretrained}' for {model_name} (--pretrained); known tags: {known}"
    )


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit CUDA request without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} requested but no CUDA GPU is visible")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 on CPU always; on CUDA ``auto`` means fp16 autocast (bf16 when asked)."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if device.type != "cuda":
        return "fp32"
    return "fp16" if precision == "auto" else precision


class ClipModel:
    """An open_clip model plus what the pipeline needs to feed it.

    Weights stay fp32; on CUDA the forward passes run under fp16/bf16 autocast. Every encode runs in
    ``torch.inference_mode()`` and returns float32, L2-normalised embeddings.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable,
        *,
        model_name: str,
        pretrained: str,
        weights: ResolvedWeights,
        device: torch.device,
        precision: str,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.pretrained = pretrained
        self.weights = weights
        self.device = device
        self.precision = precision
        pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = pp.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(float(m) for m in pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(float(s) for s in pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.interpolation = str(pp.get("interpolation", "bicubic"))
        self.resize_mode = str(pp.get("resize_mode", "shortest"))

    @property
    def is_random(self) -> bool:
        """True for ``pretrained='random'``: outputs are meaningless and must say so."""
        return self.weights.kind == "random"

    @property
    def identity(self) -> str:
        """Stable id of (architecture, weights) for cache keys."""
        return f"{self.model_name}|{self.weights.identity}"

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        with torch.inference_mode():
            return int(self.encode_text(["x"]).shape[-1])

    def autocast(self):
        """fp16/bf16 autocast on CUDA, a no-op context on CPU."""
        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def normalize_pixels(self, images_0_255: torch.Tensor) -> torch.Tensor:
        """uint8/float 0..255 ``[N,3,S,S]`` → the model's normalised float input."""
        x = images_0_255.to(self.device, torch.float32, non_blocking=True) / 255.0
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_images(self, pixels: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Encode normalised images ``[N,3,S,S]`` → ``[N,D]`` float32, unit norm.

        ``keep_idx`` (``[N,K]`` patch indices) encodes with CLIP-PGS token selection (ViTs only).
        """
        with torch.inference_mode(), self.autocast():
            x = pixels.to(self.device, non_blocking=True)
            if keep_idx is None:
                emb = self.model.encode_image(x)
            else:
                from bifta_core.pgs import encode_image_with_keep

                emb = encode_image_with_keep(self.model, x, keep_idx.to(self.device))
        return F.normalize(emb.float(), dim=-1)

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Encode strings in batches → ``[T,D]`` float32, unit norm, on CPU."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
                with self.autocast():
                    emb = self.model.encode_text(tokens)
                out.append(F.normalize(emb.float(), dim=-1).cpu())
        if not out:
            return torch.empty(0, self.embed_dim)
        return torch.cat(out)

    def describe(self) -> dict:
        """Plain-data summary for logs and run metadata."""
        return {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "weights": self.weights.kind,
            "random_weights": self.is_random,
            "device": str(self.device),
            "precision": self.precision,
            "image_size": self.image_size,
        }


def load_model(
    model_name: str = "ViT-B-32",
    pretrained: str = "openai",
    *,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
) -> ClipModel:
    """Build ``model_name`` and load ``pretrained`` weights (see module docstring).

    Raises :class:`ModelLoadError` (one line, names ``--model``/``--pretrained``) for an unknown
    architecture, weights that cannot be had, or a checkpoint that does not fit the architecture.
    """
    import open_clip

    register_bundled_configs()
    arch = model_name.replace("/", "-")
    if arch not in _known_architectures():
        raise ModelLoadError(
            f"unknown model architecture '{model_name}' (--model); see open_clip.list_models() for names"
        )
    weights = resolve_pretrained(arch, pretrained, cache_dir=cache_dir)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)

    kwargs = dict(device="cpu", precision="fp32", weights_only=True, cache_dir=cache_dir)
    try:
        if weights.kind == "random":
            # Fork the RNG so seeding the weights never disturbs the caller's random stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_WEIGHTS_SEED)
                model = open_clip.create_model(arch, pretrained=None, **kwargs)
        elif weights.kind == "file":
            model = open_clip.create_model(arch, pretrained=weights.source, **kwargs)
        else:
            offline = not _hub_reachable()
            with _hf_offline(offline):
                try:
                    model = open_clip.create_model(arch, pretrained=weights.source, **kwargs)
                except Exception as exc:
                    reason = "the model hub is unreachable" if offline else f"download failed ({_first_line(exc)})"
                    raise ModelLoadError(
                        f"cannot get '{weights.source}' weights for {arch}: {reason} and they are not "
                        f"cached; download the checkpoint and pass its path with --pretrained PATH"
                    ) from exc
    except ModelLoadError:
        raise
    except (RuntimeError, LookupError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        # torch.load on a corrupt/foreign file raises UnpicklingError, EOFError or IndexError too.
        raise ModelLoadError(
            f"cannot load weights {pretrained} into {arch} (--pretrained/--model): {_first_line(exc)}"
        ) from exc
    model.to(dev)
    tokenizer = open_clip.get_tokenizer(arch)
    if weights.kind == "random":
        logger.warning("model %s uses RANDOM weights (--pretrained random): labels are meaningless", arch)
    return ClipModel(
        model, tokenizer, model_name=arch, pretrained=pretrained, weights=weights, device=dev, precision=prec
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def save_checkpoint(model: ClipModel | torch.nn.Module, path: str) -> str:
    """Save a plain state dict that :func:`load_model` reads back with ``weights_only=True``."""
    module = model.model if isinstance(model, ClipModel) else model
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, path)
    return path


def config_fingerprint(payload: dict) -> str:
    """sha256 of a JSON-serialisable dict with sorted keys (cache keys, content hashes)."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def model_identity(model_name: str, pretrained: str, cache_dir: str | None = None) -> str:
    """:attr:`ClipModel.identity` without building the model (label-set cache keys on the driver)."""
    register_bundled_configs()
    arch = model_name.replace("/", "-")
    if arch not in _known_architectures():
        raise ModelLoadError(f"unknown model architecture '{model_name}' (--model); see open_clip.list_models() for names")
    return f"{arch}|{resolve_pretrained(arch, pretrained, cache_dir=cache_dir).identity}"


def model_preprocess(model_name: str, pretrained: str = RANDOM_WEIGHTS) -> dict:
    """The model's eval preprocessing (size, mean, std, resize_mode…) without building it.

    Same precedence as open_clip's factory: defaults, the architecture's ``preprocess_cfg``, the
    pretrained tag's settings, and the vision tower's image size.
    """
    import dataclasses

    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    register_bundled_configs()
    arch = model_name.replace("/", "-")
    model_cfg = open_clip.get_model_config(arch) or {}
    cfg = merge_preprocess_dict(dataclasses.asdict(PreprocessCfg()), model_cfg.get("preprocess_cfg", {}))
    tag = _canonical_tag(arch, pretrained) if pretrained else None
    if tag is not None:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(arch, tag))
    size = model_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    cfg["size"] = int(size[0] if isinstance(size, (tuple, list)) else size)
    return cfg


def model_input_size(model_name: str) -> int:
    """The image tower's input side from the architecture config (no weights needed)."""
    return model_preprocess(model_name)["size"]


def is_vit_architecture(model_name: str) -> bool:
    """True when the architecture's image tower is open_clip's own VisionTransformer (CLIP-PGS needs it)."""
    import open_clip

    register_bundled_configs()
    vision = (open_clip.get_model_config(model_name.replace("/", "-")) or {}).get("vision_cfg", {})
    return isinstance(vision.get("layers"), int) and "timm_model_name" not in vision
