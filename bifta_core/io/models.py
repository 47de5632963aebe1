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
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from bifta_core.errors import ConfigError, ModelLoadError

logger = logging.getLogger("bifta.models")

RANDOM_WEIGHTS = "random"
#: Seed of ``pretrained="random"`` weights: every process (each Ray actor) builds the same model.
RANDOM_WEIGHTS_SEED = 0
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: The MLP activation of the text and image transformers: open_clip's default nn.GELU, or the
#: sigmoid approximation ``x * sigmoid(1.702 x)`` OpenAI's CLIP weights were trained with.
ACTIVATIONS = ("gelu", "quick_gelu")
#: Keys a TorchScript OpenAI checkpoint carries in its state dict besides the weights (open_clip's
#: ``load_state_dict`` pops exactly these when it unwraps such an archive).
_OPENAI_EXTRA_KEYS = frozenset({"input_resolution", "context_length", "vocab_size"})
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_HUB_HOSTS = (("huggingface.co", 443), ("openaipublic.azureedge.net", 443))


@lru_cache(maxsize=None)
def register_bundled_configs() -> tuple[str, ...]:
    """Register the tiny test architectures shipped in ``bifta_core/io/model_configs`` with open_clip."""
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


def is_weights_location(pretrained: str) -> bool:
    """``--pretrained`` names weights by location (a file path or a URI), not an open_clip tag."""
    return "://" in pretrained or _looks_like_path(pretrained)


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


def architecture_name(model_name: str) -> str:
    """open_clip's name of the ``--model`` architecture (``ViT-B/32`` is spelt ``ViT-B-32``)."""
    return model_name.replace("/", "-")


def _open_clip_config(arch: str) -> dict | None:
    """open_clip's config of ``arch``: from its registry once open_clip is imported, else from the
    file open_clip ships for it (``open_clip/model_configs``), read without importing open_clip, so
    a label driver (which never imports it) can check a model before Ray starts. None when unknown."""
    import sys

    if "open_clip" in sys.modules:
        return sys.modules["open_clip"].get_model_config(arch)
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "model_configs", f"{arch}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
    return None


def _hub_text_parts(arch: str) -> list[tuple[str, str]]:
    """``[(what, repo)]`` of the text side that open_clip loads from the Hugging Face hub for ``arch``
    (with ``transformers``): an ``hf_tokenizer_name`` (SigLIP, SigLIP 2, CLIPA…) and an
    ``hf_model_name`` text tower. Empty for architectures on open_clip's bundled CLIP tokenizer."""
    text = (_open_clip_config(arch) or {}).get("text_cfg", {})
    parts = []
    for key, what in (("hf_tokenizer_name", "tokenizer"), ("hf_model_name", "text model")):
        repo = text.get(key)
        if repo and not os.path.isdir(repo) and (what, repo) not in parts:
            parts.append((what, repo))
    return parts


def _hf_cached(repo: str) -> bool:
    """Whether the Hugging Face cache already holds a snapshot of ``repo`` (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False


def check_hub_text_files(model_name: str) -> None:
    """Fail with one :class:`ModelLoadError` line, before any model is built, when ``model_name``'s
    tokenizer (or HF text tower) must come from the Hugging Face hub and cannot: the
    ``transformers`` package is missing, or the files are not cached and the hub is unreachable
    (or ``HF_HUB_OFFLINE`` is set). A no-op for architectures on the bundled CLIP tokenizer."""
    import importlib.util

    arch = architecture_name(model_name)
    parts = _hub_text_parts(arch)
    if not parts:
        return
    what = " and ".join(f"the {kind} {repo}" for kind, repo in parts)
    problems = []
    if importlib.util.find_spec("transformers") is None:
        problems.append("the `transformers` package that loads it is not installed (pip install transformers)")
    missing = [repo for repo in dict.fromkeys(r for _, r in parts) if not _hf_cached(repo)]
    if missing:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        if offline or not _hub_reachable():
            why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
            problems.append(f"{', '.join(missing)} is not in the local Hugging Face cache and {why}")
    if problems:
        raise ModelLoadError(
            f"model {arch} (--model) needs {what} from the Hugging Face hub: " + "; ".join(problems)
        )


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
        from bifta_core.io import storage

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


def _parse_device(device: str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{device}'") from None


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit CUDA request without a GPU is an error.

    ``cuda:N`` is checked against the GPUs this process sees, so a bad ordinal is one
    :class:`ModelLoadError` line instead of "invalid device ordinal" at the first kernel.
    """
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = _parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device} requested but no CUDA GPU is visible")
        visible = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda:0")
        elif dev.index >= visible:
            raise ModelLoadError(
                f"--device {device}: this process sees {visible} GPU(s) (cuda:0..cuda:{visible - 1})"
            )
    return dev


def actor_device(device: str, gpu_ids: Sequence) -> str:
    """The device string for a process that Ray gave ``gpu_ids`` (``ray.get_gpu_ids()``).

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's own GPUs, in ``gpu_ids`` order, so inside a
    ``num_gpus=1`` actor the only ordinal is ``cuda:0`` whatever ``--device cuda:N`` said. ``cuda:N``
    naming one of the actor's GPUs (a physical id) maps to its local ordinal; any other index maps
    to the actor's first GPU (Ray, not the flag, chooses GPUs on a cluster). Without GPUs
    (``gpu_ids`` empty) the flag is returned unchanged and :func:`resolve_device` validates it.
    """
    if not gpu_ids:
        return device
    dev = _parse_device(device) if device != "auto" else torch.device("cuda")
    if dev.type != "cuda":
        return device  # check_gpu_assignment refuses cpu on a GPU actor
    ids = [str(g) for g in gpu_ids]
    if dev.index is not None and str(dev.index) in ids:
        return f"cuda:{ids.index(str(dev.index))}"
    if dev.index not in (None, 0):
        logger.warning("--device %s: this actor was given GPU %s by Ray; using it as cuda:0", device, ids[0])
    return "cuda:0"


def cuda_problem() -> str | None:
    """Why CUDA cannot run this torch build here, or ``None`` when a kernel ran on the GPU.

    Catches the silent CPU fallback of issue 11: a torch wheel built for a newer CUDA than the
    driver supports reports ``is_available() == False``; a GPU older than every architecture the
    wheel was compiled for (e.g. sm_70 on a CUDA 13 build) fails at the first kernel.
    """
    build = f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
    if torch.version.cuda is None:
        return f"{build} is a CPU-only build"
    if not torch.cuda.is_available():
        return (f"{build} cannot use the GPU: no device visible or the NVIDIA driver is too old for "
                f"this CUDA version (see docs/scaling.md, 'GPU images')")
    try:
        major, minor = torch.cuda.get_device_capability(0)
        archs = torch.cuda.get_arch_list()
        if archs and not _runs_on(archs, major, minor):
            return f"{build} has no kernels for this GPU (sm_{major}{minor}; built for {', '.join(archs)})"
        (torch.ones(8, device="cuda:0") * 2).sum().item()  # a real kernel, not just a context
    except Exception as exc:  # noqa: BLE001 - any failure here means "unusable"
        return f"{build} cannot run a kernel on the GPU: {_first_line(exc)}"
    return None


def _runs_on(archs: Sequence[str], major: int, minor: int) -> bool:
    """Whether a wheel built for ``archs`` has code for compute capability ``major.minor``:
    a cubin for ``sm_XY`` runs on the same major with minor ≥ Y; PTX (``compute_XY``) on any
    GPU ≥ X.Y (JIT-compiled)."""
    for arch in archs:
        kind, _, code = arch.partition("_")
        digits = "".join(ch for ch in code if ch.isdigit())
        if len(digits) < 2:
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def check_gpu_assignment(gpu_ids: Sequence, device: str, *, probe: Callable[[], str | None] = cuda_problem) -> None:
    """Fail loudly when a process that holds GPUs would run on the CPU (issue 11).

    ``gpu_ids`` is what Ray assigned (``ray.get_gpu_ids()``; empty for CPU actors, where nothing
    is checked). Raises :class:`ConfigError` (one line) when ``device`` asks for the CPU or when
    CUDA is unusable (``probe``, default :func:`cuda_problem`), instead of labelling on one core.
    """
    if not gpu_ids:
        return
    ids = ",".join(str(g) for g in gpu_ids)
    if device != "auto" and _parse_device(device).type != "cuda":
        raise ConfigError(f"--device {device} but this worker was given GPU {ids}; use --device auto or cuda")
    problem = probe()
    if problem:
        raise ConfigError(f"worker was given GPU {ids} but CUDA is unusable: {problem}")


def effective_precision(precision: str, on_cuda: bool) -> str:
    """What ``--precision`` means where the images are encoded: always fp32 on CPU; on CUDA
    ``auto`` is fp16 autocast, else the requested fp32/fp16/bf16. For run ids and cache keys."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if not on_cuda:
        return "fp32"
    return "fp16" if precision == "auto" else precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 on CPU always; on CUDA ``auto`` means fp16 autocast (bf16 when asked)."""
    return effective_precision(precision, device.type == "cuda")


def text_precision(precision: str) -> str:
    """Precision of the label-set text encode: ``auto`` → fp32 (once per label set, so exactness is
    cheap), otherwise the requested one (fp16/bf16 on CPU still run fp32, a harmless superset).

    It is part of the label-set cache key, so banks encoded in fp16 are never reused by fp32 runs.
    """
    effective_precision(precision, False)  # validates
    return "fp32" if precision == "auto" else precision


def set_fp32_exact(device: torch.device) -> None:
    """Disable TF32 for fp32 on CUDA (matmuls and cuDNN convolutions), so ``--precision fp32``
    really computes in IEEE fp32 (Ampere+ default to TF32 for convolutions)."""
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv"):
        # torch >= 2.9: mixing the new and legacy flags is an error, so use only the new ones.
        matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:  # pragma: no cover - older torch
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _archive_entries(path: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


class _KeysOnly(pickle.Unpickler):
    """Unpickles a ``torch.save`` ``data.pkl`` without tensors or foreign classes: keys only."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        return lambda *args, **kwargs: None  # tensors, storages, anything else: never executed

    def persistent_load(self, pid):
        return None


def _state_dict_keys(path: str) -> set[str]:
    """Top-level tensor names of a checkpoint, read without loading any tensor.

    An unreadable file gives no keys: loading it later reports the real problem.
    """
    import io

    try:
        if path.endswith(".safetensors"):
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                return set(json.loads(fh.read(min(n, 1 << 26)))) - {"__metadata__"}
        data = [e for e in _archive_entries(path) if e.endswith("/data.pkl") or e == "data.pkl"]
        if not data:
            return set()
        with zipfile.ZipFile(path) as zf:
            obj = _KeysOnly(io.BytesIO(zf.read(data[0]))).load()
    except Exception:  # noqa: BLE001 - unreadable here just means "no OpenAI evidence"
        return set()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return set()
    return {k[7:] if str(k).startswith("module.") else str(k) for k in obj}


def is_openai_checkpoint(path: str) -> bool:
    """True for OpenAI-format CLIP checkpoints (trained with QuickGELU).

    OpenAI released TorchScript archives (a zip with ``code/`` and ``constants.pkl``; open_clip's
    own loader treats every TorchScript checkpoint as OpenAI's); a state dict saved from one keeps
    the ``input_resolution``/``context_length``/``vocab_size`` entries. Only the archive listing
    and the pickled key names are read, never the tensors.
    """
    entries = _archive_entries(path)
    if any(e.endswith("/constants.pkl") or "/code/" in e for e in entries):
        return True
    return _OPENAI_EXTRA_KEYS <= _state_dict_keys(path)


def _activation(arch: str, weights: ResolvedWeights, quick_gelu: bool | None) -> str:
    import open_clip

    if quick_gelu is not None:  # --quick-gelu / --no-quick-gelu: the user knows best
        return "quick_gelu" if quick_gelu else "gelu"
    if weights.kind == "tag":
        # The tag's pretrained config records what the weights were trained with (no network).
        return "quick_gelu" if open_clip.get_pretrained_cfg(arch, weights.source).get("quick_gelu") else "gelu"
    if weights.kind == "file" and is_openai_checkpoint(weights.source):
        return "quick_gelu"
    return "quick_gelu" if (open_clip.get_model_config(arch) or {}).get("quick_gelu") else "gelu"


def resolved_activation(
    model_name: str, pretrained: str, quick_gelu: bool | None = None, cache_dir: str | None = None
) -> str:
    """``"quick_gelu"`` or ``"gelu"``: the activation :func:`load_model` builds for these weights.

    Precedence: the explicit flag; an open_clip tag's pretrained config (``ViT-B-32`` + ``openai``
    → QuickGELU: OpenAI trained with it, and open_clip 3.3 only warns about the mismatch); an
    OpenAI-format checkpoint (:func:`is_openai_checkpoint`) → QuickGELU; else the architecture's
    own config (``*-quickgelu`` names). No network for tags; a URI is fetched once per node.
    """
    arch = _check_arch(model_name)
    return _activation(arch, resolve_pretrained(arch, pretrained, cache_dir=cache_dir), quick_gelu)


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
        activation: str = "gelu",
    ) -> None:
        self.model = model.eval()
        self.activation = activation
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
        """Stable id of (architecture, weights, activation) for cache keys (see :func:`model_identity`)."""
        return _identity(self.model_name, self.weights.identity, self.activation)

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

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean/std as ``[1,3,1,1]`` on ``device``, uploaded once (not one small copy per chunk)."""
        cache = self.__dict__.setdefault("_norm_cache", {})
        if device not in cache:
            cache[device] = (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                             torch.tensor(self.std, device=device).view(1, 3, 1, 1))
        return cache[device]

    def normalize_pixels(self, images_0_255: torch.Tensor) -> torch.Tensor:
        """uint8/float 0..255 ``[N,3,S,S]`` → the model's normalised float input (on the model's device).

        Call it per ``--view-batch-size`` chunk: the float copy is 4× the uint8 views.
        """
        x = images_0_255.to(self.device, non_blocking=True).to(torch.float32) / 255.0
        mean, std = self._constants(x.device)
        return (x - mean) / std

    def encode_images(self, pixels: torch.Tensor, keep_idx: torch.Tensor | None = None, *,
                      check_keep: bool = True) -> torch.Tensor:
        """Encode normalised images ``[N,3,S,S]`` → ``[N,D]`` float32, unit norm.

        ``keep_idx`` (``[N,K]`` patch indices) encodes with CLIP-PGS token selection (ViTs only);
        ``check_keep=False`` trusts indices made by ``select_patches`` (no device read-backs).
        """
        with torch.inference_mode(), self.autocast():
            x = pixels.to(self.device, non_blocking=True)
            if keep_idx is None:
                emb = self.model.encode_image(x)
            else:
                from bifta_core.method.pgs import encode_image_with_keep

                emb = encode_image_with_keep(self.model, x, keep_idx.to(self.device), check_keep=check_keep)
        return F.normalize(emb.float(), dim=-1)

    def encode_text(self, texts: Sequence[str], batch_size: int = 256,
                    on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """Encode strings in batches → ``[T,D]`` float32, unit norm, on CPU; ``on_batch(done)`` after
        each batch (progress of a long label-set stage)."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
                with self.autocast():
                    emb = self.model.encode_text(tokens)
                out.append(F.normalize(emb.float(), dim=-1).cpu())
                if on_batch is not None:
                    on_batch(min(len(texts), start + batch_size))
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
            "activation": self.activation,
            "image_size": self.image_size,
        }


def load_model(
    model_name: str = "ViT-B-32",
    pretrained: str = "openai",
    *,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
    quick_gelu: bool | None = None,
    require_cuda: bool = False,
) -> ClipModel:
    """Build ``model_name`` and load ``pretrained`` weights (see module docstring).

    ``quick_gelu`` forces the activation (``None``: :func:`resolved_activation`). ``require_cuda``
    (set by GPU actors) turns any non-CUDA outcome into an error instead of a CPU fallback.
    ``--precision fp32`` on CUDA disables TF32 (:func:`set_fp32_exact`).

    Raises :class:`ModelLoadError` (one line, names ``--model``/``--pretrained``) for an unknown
    architecture, weights that cannot be had, or a checkpoint that does not fit the architecture.
    """
    arch = _check_arch(model_name)
    weights = resolve_pretrained(arch, pretrained, cache_dir=cache_dir)
    if require_cuda:
        problem = cuda_problem()
        if problem:
            raise ModelLoadError(f"this worker needs CUDA (it was given a GPU) but {problem}")
    dev = resolve_device(device)
    if require_cuda and dev.type != "cuda":
        raise ModelLoadError(f"--device {device} resolves to {dev} but this worker was given a GPU")
    prec = resolve_precision(precision, dev)
    if prec == "fp32":
        set_fp32_exact(dev)
    activation = _activation(arch, weights, quick_gelu)
    check_hub_text_files(arch)  # before building: a hub tokenizer that cannot be had is one line

    try:
        if weights.kind == "random":
            # Fork the RNG so seeding the weights never disturbs the caller's random stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_WEIGHTS_SEED)
                model = build_clip(arch, None, activation, cache_dir)
        elif weights.kind == "file":
            model = build_clip(arch, weights.source, activation, cache_dir)
        else:
            offline = not _hub_reachable()
            with _hf_offline(offline):
                try:
                    model = build_clip(arch, weights.source, activation, cache_dir)
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
    import open_clip

    model.to(dev)
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except (OSError, ImportError) as exc:
        hub = _hub_text_parts(arch)
        if not hub:
            raise
        # transformers raises OSError when the hub files cannot be fetched, ImportError for a missing package.
        raise ModelLoadError(
            f"cannot load the tokenizer {hub[0][1]} of model {arch} from the Hugging Face hub: {_first_line(exc)}"
        ) from exc
    if weights.kind == "random":
        logger.warning("model %s uses RANDOM weights (--pretrained random): labels are meaningless", arch)
    return ClipModel(
        model, tokenizer, model_name=arch, pretrained=pretrained, weights=weights, device=dev, precision=prec,
        activation=activation,
    )


def build_clip(arch: str, source: str | None, activation: str, cache_dir: str | None = None) -> torch.nn.Module:
    """The open_clip module for ``arch`` with ``activation``, weights from ``source`` (None: random init).

    ``quick_gelu`` is set in the model config (``force_quick_gelu``), so open_clip builds QuickGELU
    exactly as for its ``*-quickgelu`` architectures; ``gelu`` overrides a config that says
    otherwise (``--no-quick-gelu``).
    """
    import open_clip

    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    kwargs: dict = dict(device="cpu", precision="fp32", weights_only=True, cache_dir=cache_dir)
    if activation == "quick_gelu":
        kwargs["force_quick_gelu"] = True
    else:
        kwargs["quick_gelu"] = False  # model-constructor override, highest precedence in open_clip
    if source is not None and os.path.isfile(source) and _OPENAI_EXTRA_KEYS <= _state_dict_keys(source):
        # A state dict saved from OpenAI's TorchScript model keeps three non-weight entries that
        # open_clip strips only from the TorchScript archive itself; strip them here too.
        model = open_clip.create_model(arch, pretrained=None, **kwargs)
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}
        if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        model.load_state_dict(state, strict=True)
        return model
    return open_clip.create_model(arch, pretrained=source, **kwargs)


def _check_arch(model_name: str) -> str:
    register_bundled_configs()
    arch = architecture_name(model_name)
    if arch not in _known_architectures():
        raise ModelLoadError(
            f"unknown model architecture '{model_name}' (--model); see open_clip.list_models() for names"
        )
    return arch


def _identity(arch: str, weights_identity: str, activation: str, precision: str | None = None) -> str:
    # GELU models keep their historical identity; QuickGELU ones differ from every GELU encoding
    # (text banks encoded with the wrong activation before the fix are never reused).
    ident = f"{arch}|{weights_identity}" + ("|quick_gelu" if activation == "quick_gelu" else "")
    return ident if precision is None else f"{ident}|{precision}"


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


def model_identity(
    model_name: str,
    pretrained: str,
    cache_dir: str | None = None,
    *,
    quick_gelu: bool | None = None,
    precision: str | None = None,
) -> str:
    """:attr:`ClipModel.identity` without building the model (label-set cache keys on the driver).

    Includes the resolved activation; with ``precision`` (label sets pass :func:`text_precision`)
    also the precision the texts are encoded in, so fp16 banks never serve an fp32 run.
    """
    arch = _check_arch(model_name)
    weights = resolve_pretrained(arch, pretrained, cache_dir=cache_dir)
    check_hub_text_files(arch)  # the driver asks for this identity right before it needs the model
    return _identity(arch, weights.identity, _activation(arch, weights, quick_gelu), precision)


def model_provenance(
    model_name: str,
    pretrained: str,
    *,
    precision: str = "auto",
    on_cuda: bool,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> dict:
    """What a run's rows depend on in the model, for the run id and ``_bifta_run.json``.

    ``{"model", "pretrained", "weights" (content identity), "activation", "precision"}`` where
    precision is :func:`effective_precision` for where images are encoded (``on_cuda``).
    """
    arch = _check_arch(model_name)
    weights = resolve_pretrained(arch, pretrained, cache_dir=cache_dir)
    return {
        "model": arch,
        "pretrained": pretrained,
        "weights": weights.identity,
        "activation": _activation(arch, weights, quick_gelu),
        "precision": effective_precision(precision, on_cuda),
    }


def model_preprocess(model_name: str, pretrained: str = RANDOM_WEIGHTS) -> dict:
    """The model's eval preprocessing (size, mean, std, resize_mode…) without building it.

    Same precedence as open_clip's factory: defaults, the architecture's ``preprocess_cfg``, the
    pretrained tag's settings, and the vision tower's image size.
    """
    import dataclasses

    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    register_bundled_configs()
    arch = architecture_name(model_name)
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
    vision = (open_clip.get_model_config(architecture_name(model_name)) or {}).get("vision_cfg", {})
    return isinstance(vision.get("layers"), int) and "timm_model_name" not in vision
