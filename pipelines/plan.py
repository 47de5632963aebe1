"""One plan builder for every Ray Data job: stages declared as data, resources from what the job asks.

Each stage module declares its stage next to its code (name, function or callable class, batch
size, resources, concurrency), the way NeMo Curator stages do; a job's plan is a list of stages
(:func:`label_plan` in ``pipelines.pipeline``, the evaluation's in ``pipelines.evaluate_stages``) that
:func:`build_dataset` turns into one Ray Data pipeline. Labelling and evaluation share it, so their
resources, runtime environment and retries cannot drift apart.

Resources come from the job's own settings, not from whatever the cluster has up at submit time:
on an autoscaling cluster (head ``CPU: 0``, workers ``min_workers: 0``) nothing is up yet, so
``--gpus N`` / ``--device cuda`` plan N GPU encode actors and Ray's autoscaler brings the nodes.
Only an embedded local Ray (no autoscaler) refuses a plan it can never place.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from bifta_core.config import LabelConfig
from bifta_core.errors import ConfigError

logger = logging.getLogger("bifta.plan")


#: Messages of errors worth retrying a whole stage task for (S3 throttling and 5xx, dropped connections).
TRANSIENT_ERROR_PATTERNS = ("SlowDown", "ServiceUnavailable", "InternalError", "503", "Connection reset",
                            "timed out", "EREMOTEIO", "Remote I/O error", "Parquet file size is 0 bytes")


@dataclass(frozen=True)
class Stage:
    """One Ray Data stage. ``actors=(min, max)`` makes it an actor pool (setup once per actor in
    the callable class's ``__init__``); otherwise it runs as tasks, at most ``concurrency`` at once."""

    name: str
    fn: Callable[..., Any] | type
    batch_size: int | None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: tuple[int, int] | None = None
    concurrency: int | None = None
    batch_format: str = "numpy"
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    constructor_kwargs: dict[str, Any] = field(default_factory=dict)
    gpu_visible: bool = False  # stages that reserve no GPU must not see one (Ray 2.60 no longer hides them)
    start_gate: str | None = None  # "wait": its function waits for the gate; "open": its actors open it


class StartGate:
    """Holds a plan's first stage until an encoder has loaded its model (an embedded run only).

    On a few cores, stages reading ahead while the actors import torch and load weights only slow
    that start-up down; held, the actors of every pool start together and the first tasks' worker
    processes boot meanwhile. An async Ray actor serving every pass of a driver
    (:func:`start_gate_for_pass`), each pass under its own key: an actor per pass cost a new
    worker process (~1 s of CPU) per run. ``wait`` calls wait together, ``open`` is idempotent (a
    restarted encoder opens it again). Without an ``open`` the wait ends after ``timeout_s``.
    """

    def __init__(self) -> None:
        self._opened: dict[str, Any] = {}  # pass key -> asyncio.Event (a few bytes a pass)

    def _event(self, key: str):
        import asyncio

        if key not in self._opened:  # setdefault would build a throwaway Event on every call
            self._opened[key] = asyncio.Event()
        return self._opened[key]

    async def open(self, key: str) -> None:
        self._event(key).set()

    async def wait(self, key: str, timeout_s: float) -> bool:
        import asyncio

        try:
            await asyncio.wait_for(self._event(key).wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


#: How long the first stage waits for an encoder before it starts anyway (slow weight downloads).
START_GATE_TIMEOUT_S = 600.0
_gates_passed: set[str] = set()  # per worker process: the passes whose gate it went through already
_driver_gate: dict[tuple[str, str], Any] = {}  # (Ray job, node) of this driver -> its StartGate actor


def start_gate_for_pass() -> tuple[Any, str]:
    """(this driver's :class:`StartGate`, a new pass key): what a pass's stages get as ``start_gate``.

    The actor is made on a driver's first gated pass and kept for the later ones; a new Ray session
    (a new job or node id) gets a new one."""
    import uuid

    import ray

    ctx = ray.get_runtime_context()
    session = (ctx.get_job_id(), ctx.get_node_id())
    if session not in _driver_gate:
        _driver_gate.clear()  # the actor of an earlier session died with it
        _driver_gate[session] = ray.remote(StartGate).options(num_cpus=0).remote()
    return _driver_gate[session], uuid.uuid4().hex


def pass_start_gate(gate: tuple[Any, str] | None) -> None:
    """In a ``wait`` stage: block until the pass's gate opens (once per worker process and pass)."""
    if gate is None or gate[1] in _gates_passed:
        return
    import ray

    actor, key = gate
    ray.get(actor.wait.remote(key, START_GATE_TIMEOUT_S))
    _gates_passed.add(key)


def open_start_gate(gate: tuple[Any, str] | None) -> None:
    """In an ``open`` stage's ``__init__``, once the model is loaded."""
    if gate is not None:
        actor, key = gate
        actor.open.remote(key)


@dataclass(frozen=True)
class Resources:
    """What a job asks the cluster for, decided from its settings.

    ``use_gpu``: encode actors (and the label-set task) take one GPU each. ``encoders``: encode
    actors. ``decoders``: the most decode+views tasks at once. ``torch_threads``: per CPU encoder.
    """

    use_gpu: bool
    encoders: int
    decoders: int
    torch_threads: int | None
    writers: int


def is_embedded() -> bool:
    """True when this process runs its own local Ray (no ``RAY_ADDRESS``: no cluster, no autoscaler)."""
    return not os.environ.get("RAY_ADDRESS")


def plan_resources(config: LabelConfig, cluster: dict[str, float], *, embedded: bool) -> Resources:
    """Resources for ``config``; ``cluster`` is ``ray.cluster_resources()`` (what is up right now).

    GPU plan when ``--device cuda…`` or ``--gpus N`` is given, or when ``--device auto`` and the
    cluster shows GPUs now. ``--num-encoders`` defaults to ``--gpus``, else one per visible GPU, else 1.
    """
    device = config.model.device
    gpus_now = int(cluster.get("GPU", 0))
    cpus_now = int(cluster.get("CPU", 0))
    if device == "cpu" and config.gpus:
        raise ConfigError(f"--gpus {config.gpus} asks for GPUs but --device cpu keeps the model on the CPU")
    use_gpu = device.startswith("cuda") or bool(config.gpus) or (device == "auto" and gpus_now > 0)
    if use_gpu:
        encoders = config.num_encoders or config.gpus or max(1, gpus_now)
    else:
        encoders = config.num_encoders or 1
    if embedded:
        # Nothing will ever add a node to an embedded Ray: a plan it cannot place would wait forever.
        if use_gpu and encoders > gpus_now:
            raise ConfigError(f"{encoders} GPU encoder(s) asked for, this machine's Ray has {gpus_now} GPU(s)"
                              + ("" if gpus_now else "; use --device cpu or run on a GPU machine"))
        if not use_gpu and encoders > max(1, cpus_now - 1):
            raise ConfigError(f"--num-encoders {encoders} needs {encoders} CPUs plus one for decoding, "
                              f"this machine's Ray has {cpus_now}")
    elif use_gpu and encoders > gpus_now:
        logger.info("asking the cluster for %d GPU encoder(s) (%d GPU(s) up now); the autoscaler adds nodes, "
                    "the job waits for them", encoders, gpus_now)
    free_cpus = cpus_now - (0 if use_gpu else encoders)
    # Decoding a batch is one core's work; on an autoscaling cluster allow several decoders per encoder.
    decoders = config.num_decoders or (max(1, free_cpus) if embedded else max(free_cpus, 4 * encoders, 1))
    threads = None if use_gpu else max(1, (os.cpu_count() or 1) // encoders)
    writers = max(1, min(8, (encoders + 1) // 2))
    return Resources(use_gpu=use_gpu, encoders=encoders, decoders=decoders, torch_threads=threads, writers=writers)


def cpu_only_env() -> dict[str, str]:
    """Environment of workers that reserved no GPU: they must not touch one by accident."""
    return {"CUDA_VISIBLE_DEVICES": ""}


def env_args(base_env: dict[str, str], *, gpu: bool) -> dict[str, Any]:
    """Ray remote args carrying ``base_env`` (the S3 settings); a task or actor that reserves no GPU
    also gets :func:`cpu_only_env`. The one place every stage, task and writer gets its environment."""
    env = dict(base_env) if gpu else {**base_env, **cpu_only_env()}
    if os.environ.get(QUIET_ENV):  # workers of a cluster do not inherit the driver's environment
        env[QUIET_ENV] = os.environ[QUIET_ENV]
    return {"runtime_env": {"env_vars": env}} if env else {}


#: Set (by ``set_verbosity``) when Ray's own output is hidden; workers read it in :func:`quiet_worker`.
QUIET_ENV = "BIFTA_QUIET"


def set_verbosity(verbose: bool) -> None:
    """Before Ray starts: show Ray's own output (``--verbose``) or only bifta's progress line and
    summary — no Ray Data progress blocks, executor INFO lines or the workers' repeated model
    warnings (the driver prints what matters once)."""
    if verbose:
        os.environ.pop(QUIET_ENV, None)
        return
    os.environ[QUIET_ENV] = "1"


def quiet_worker() -> None:
    """In a worker of a quiet run: only errors from Python logging (open_clip, bifta's per-actor
    warnings); ``print`` output such as the label-set stage's progress still reaches the driver."""
    if os.environ.get(QUIET_ENV):
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("bifta").setLevel(logging.ERROR)


def remote_args(base_env: dict[str, str], stage: Stage) -> dict[str, Any]:
    """Ray remote args of a stage: resources and its runtime environment."""
    args: dict[str, Any] = {"num_cpus": stage.num_cpus, **env_args(base_env, gpu=stage.gpu_visible or bool(stage.num_gpus))}
    if stage.num_gpus:
        args["num_gpus"] = stage.num_gpus
    return args


def configure_data_context() -> None:
    """Ray Data settings of every bifta plan; call before the first Dataset is created (a Dataset
    keeps the context it was created with)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = False  # nothing depends on order: shards are regrouped by the writers
    if os.environ.get(QUIET_ENV):  # bifta prints its own one-line progress
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        for name in ("ray.data", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # Ray's memory-issue detector misreads the shared torch import of worker processes as per-task
    # memory and prints multi-line warnings every 30 s; bifta bounds memory by batch sizes instead.
    ctx.issue_detectors_config.detectors = []
    # A stage task that fails on a transient storage error (an S3 503 storm that outlasted the
    # per-request retries) is retried whole; its batch is simply processed again.
    ctx.retried_map_errors = list(TRANSIENT_ERROR_PATTERNS)
    ctx.max_map_retries = 3


def build_dataset(ds: Any, stages: Sequence[Stage], *, env: dict[str, str] | None = None) -> Any:
    """Chain ``stages`` onto ``ds`` (a Ray Dataset made after :func:`configure_data_context`)."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    for stage in stages:
        kwargs: dict[str, Any] = dict(batch_size=stage.batch_size, batch_format=stage.batch_format,
                                      **remote_args(env or {}, stage))
        if stage.fn_kwargs:
            kwargs["fn_kwargs"] = stage.fn_kwargs
        fn = stage.fn
        if stage.actors:
            lo, hi = stage.actors
            kwargs["compute"] = ActorPoolStrategy(min_size=lo, max_size=hi)
            if stage.constructor_kwargs:
                kwargs["fn_constructor_kwargs"] = stage.constructor_kwargs
        elif stage.concurrency:
            kwargs["compute"] = TaskPoolStrategy(size=stage.concurrency)
        ds = ds.map_batches(fn, **kwargs)
    return ds


def describe(stages: Sequence[Stage]) -> list[dict[str, Any]]:
    """The plan as plain data (logged at start, inspected by tests)."""
    return [{"name": s.name, "batch_size": s.batch_size, "num_cpus": s.num_cpus, "num_gpus": s.num_gpus,
             "actors": s.actors, "concurrency": s.concurrency} for s in stages]


# ------------------------------------------------------------------------------------ running
#: Passes over unfinished shards before giving up (a writer actor lost mid-run leaves its shards open).
MAX_PASSES = 3
#: The first shards enter the plan one per block, so the first part file is published after one
#: shard's work rather than a whole block's (a stage task emits its output when its block is done).
EARLY_SHARDS = 8
#: The other shards share at most this many blocks: each block costs the driver one object-store put.
MAX_INPUT_BLOCKS = 512


def shard_blocks(todo: list[tuple[str, int]], early: int = EARLY_SHARDS,
                 max_blocks: int = MAX_INPUT_BLOCKS) -> list[list[tuple[str, int]]]:
    """Split ``todo`` (in order) into the plan's input blocks: ``early`` single-shard blocks, then
    the rest in at most ``max_blocks`` blocks of near-equal shard counts."""
    head = [[item] for item in todo[:early]]
    rest = todo[early:]
    if not rest:
        return head
    n = min(max_blocks, len(rest))
    step, extra = divmod(len(rest), n)
    blocks, start = [], 0
    for i in range(n):
        end = start + step + (1 if i < extra else 0)
        blocks.append(rest[start:end])
        start = end
    return head + blocks


class ShardTotals:
    """The driver's running counts, from the writers' shard statistics (never from rows)."""

    def __init__(self) -> None:
        self.images = self.ok = self.errors = self.rows = self.files = 0
        self.views_encoded = self.images_with_views = 0
        self.routed = 0.0
        self.reasons: Counter = Counter()
        self.first: tuple[float, float] | None = None  # (time, images) of the first routed batch

    def add_batch(self, batch: Any) -> None:
        n = float(sum(batch.column("images").to_pylist()))  # fractions when a batch splits an image's rows
        if self.first is None:
            self.first = (time.time(), n)
        self.routed += n
        for text in batch.column("published").to_pylist():
            for stats in json.loads(text):
                self.files += 1
                self.images += stats["images"]
                self.ok += stats["ok"]
                self.errors += stats["errors"]
                self.rows += stats["rows"]
                self.reasons.update(stats["error_reasons"])
                self.views_encoded += stats.get("views_encoded", 0)
                self.images_with_views += stats.get("images_with_views", 0)

    def steady_rate(self, finished: float) -> float:
        """Images/s after the first batch: excludes actor start-up and model loading."""
        if self.first and self.routed > self.first[1] and finished > self.first[0]:
            return (self.routed - self.first[1]) / (finished - self.first[0])
        return 0.0


def run_shards(out: str, todo: list[tuple[str, int]], stages: Sequence[Stage], *, writers: int, schema: Any,
               env: dict[str, str], file_metadata: dict[str, str] | None = None,
               on_progress: Callable[[dict], None] | None = None, total: int | None = None,
               finalize: Callable[[Any], Any] | None = None, rows_per_input: int = 1,
               embeddings: dict[str, Any] | None = None) -> ShardTotals:
    """Run ``stages`` over the shards ``todo`` (``[(name, inputs)]``) until each one's file is published.

    Each pass gets fresh writer actors; shards a pass leaves incomplete (a writer lost mid-run) are
    redone whole by the next, up to :data:`MAX_PASSES`, then the run fails with a line saying to rerun.
    """
    sizes = dict(todo)
    totals = ShardTotals()
    started = time.time()
    for attempt in range(MAX_PASSES):
        if not todo:
            return totals
        left = _run_pass(out, todo, stages, writers, schema, env, file_metadata or {}, totals, on_progress,
                         total if total is not None else sum(sizes.values()), started, finalize, rows_per_input,
                         embeddings)
        todo = [(s, sizes[s]) for s in sorted(left)]
        if todo and attempt + 1 < MAX_PASSES:
            logger.warning("%d shard(s) were left incomplete (a worker was lost); pass %d of %d redoes them",
                           len(todo), attempt + 2, MAX_PASSES)
    if todo:
        raise RuntimeError(f"{len(todo)} shard(s) could not be completed after {MAX_PASSES} passes; "
                           "rerun the same command to finish them")
    return totals


def _with_gate(stage: Stage, gate: Any) -> Stage:
    import dataclasses

    if stage.start_gate == "wait":
        return dataclasses.replace(stage, fn_kwargs={**stage.fn_kwargs, "start_gate": gate})
    if stage.start_gate == "open":
        return dataclasses.replace(stage, constructor_kwargs={**stage.constructor_kwargs, "start_gate": gate})
    return stage


def _run_pass(out: str, todo: list[tuple[str, int]], stages: Sequence[Stage], n_writers: int, schema: Any,
              env: dict[str, str], file_metadata: dict[str, str], totals: ShardTotals, on_progress,
              total: int, started: float, finalize: Callable[[Any], Any] | None, rows_per_input: int,
              embeddings: dict[str, Any] | None = None) -> set[str]:
    """One pass with fresh writers → shards left incomplete."""
    import ray

    from pipelines.write import PASS_FILE, ShardWriter, finished_shards, write_json, write_stage

    write_json(out, PASS_FILE, {"shards": dict(todo)}, compact=True)  # machine-read, up to ~10^5 shards
    # Writers reserve no CPU: they wait on batches and spend a moment per shard publishing it.
    actor = ray.remote(ShardWriter).options(num_cpus=0, max_restarts=2, max_task_retries=2,
                                            scheduling_strategy="SPREAD", **env_args(env, gpu=False))
    writers = [actor.remote(out, schema, writer=(w, n_writers), file_metadata=file_metadata, finalize=finalize,
                            rows_per_input=rows_per_input, embeddings=embeddings) for w in range(n_writers)]
    # An embedded run holds its first stage until an encoder is up (see StartGate); a cluster's
    # GPU nodes may take minutes to come up, and reading ahead meanwhile costs it nothing.
    gated = {"wait", "open"} <= {s.start_gate for s in stages}  # something waits, and something opens
    gate = start_gate_for_pass() if gated and is_embedded() else None
    stages = [_with_gate(stage, gate) for stage in stages]
    try:
        configure_data_context()
        import pyarrow as pa

        # from_blocks keeps the blocks as given (from_items/from_arrow re-chunk them or read their metadata remotely).
        items = ray.data.from_blocks([pa.table({"shard": [s for s, _ in block], "rows": [n for _, n in block]})
                                      for block in shard_blocks(todo)])
        ds = build_dataset(items, [*stages, write_stage(writers, max(n for _, n in todo), rows_per_input)], env=env)
        last_report = 0.0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            totals.add_batch(batch)
            now = time.time()
            if on_progress and now - last_report > 2.0:
                last_report = now
                on_progress({"done": int(totals.routed), "total": total, "errors": totals.errors,
                             "elapsed_s": now - started})
        left: set[str] = set()
        for pending in ray.get([w.open_shards.remote() for w in writers]):
            left.update(pending)
        published = finished_shards(out)
        left.update(s for s, _ in todo if s not in published)
        return left
    finally:
        for w in writers:
            ray.kill(w)
