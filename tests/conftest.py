"""Shared fixtures: tiny CLIP checkpoints and the read-only reference data in ``../shared``.

The tiny architectures (``bifta-tiny-vit``, ``bifta-tiny-rn``) are built with seeded random weights,
saved as plain state dicts and loaded back through the same code path as a real checkpoint, so no
test needs network access or pretrained weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# The moto S3 server fixture `s3_server` (a real S3-compatible server on 127.0.0.1).
pytest_plugins = ["tests.s3_server"]

#: ``../shared`` relative to the repository root (read-only data every developer and CI run has).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


#: Test modules taking a minute or more, longest first (``pytest --durations``). pyproject runs the
#: suite on two pytest-xdist workers that take whole modules in collection order; starting with the
#: longest keeps one worker from running a long module alone at the end. The rest follow in file order.
LONGEST_FIRST = ("test_train.py", "test_pipeline.py", "test_model_families.py", "test_bench.py", "test_s3_pipeline.py",
                 "test_data_plane.py", "test_relabel.py", "test_cascade.py", "test_evaluate.py",
                 "test_cluster_submit.py", "test_jobs.py", "test_review.py", "test_report.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: test order within a module kept


@pytest.fixture(autouse=True)
def _bifta_logging_from_scratch():
    """Each test starts with Python's default logging levels (root WARNING, bifta's loggers inheriting
    it): an in-process command (``--quiet``) or a stage built in this process
    (``pipelines.plan.quiet_worker``) changes them process-wide, and a ``caplog`` test that ran after
    one would miss bifta's warnings."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("bifta").setLevel(logging.NOTSET)
    yield


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down, at the end of the session, the local Ray the modules share."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_ray_session):
    """A local Ray (2 CPUs) for a module's in-process runs, shared with the next modules (starting
    Ray costs seconds per module); a module asks for it with ``pytest.mark.usefixtures("local_ray")``
    or as an argument. A module that needs another Ray (test_train: 3 CPUs) shuts it down and
    starts its own; the next module asking for this one starts it again."""
    import ray

    # The embedded Ray's settings: a run's tasks reuse the idle workers (and their torch import) of the
    # run before; Ray's default (idle workers killed after 1 s) costs ~3 s a run.
    from pipelines.pipeline import EMBEDDED_RAY_SYSTEM_CONFIG

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 _system_config=EMBEDDED_RAY_SYSTEM_CONFIG)
    yield


def _build_checkpoint(tmp_path_factory: pytest.TempPathFactory, arch: str) -> Path:
    from bifta_core.io.models import load_model, save_checkpoint

    model = load_model(arch, "random", device="cpu")
    path = tmp_path_factory.mktemp("checkpoints") / f"{arch}.pt"
    save_checkpoint(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a saved ``bifta-tiny-vit`` checkpoint (seeded random weights)."""
    return _build_checkpoint(tmp_path_factory, "bifta-tiny-vit")


@pytest.fixture(scope="session")
def tiny_rn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a saved ``bifta-tiny-rn`` checkpoint (seeded random weights)."""
    return _build_checkpoint(tmp_path_factory, "bifta-tiny-rn")


@pytest.fixture(scope="session")
def tiny_vit_model(tiny_vit_checkpoint: Path):
    """``bifta-tiny-vit`` loaded from :func:`tiny_vit_checkpoint` on CPU (shared, do not mutate)."""
    from bifta_core.io.models import load_model

    return load_model("bifta-tiny-vit", str(tiny_vit_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared``; skips the test when this checkout has no such folder next to it."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"../shared not found: expected the shared reference data at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def descriptions_dir(shared_dir: Path) -> Path:
    """``../shared/descriptions`` (one folder per dataset)."""
    path = shared_dir / "descriptions"
    if not path.is_dir():
        pytest.skip(f"../shared/descriptions not found: expected the published label sets at {path}")
    return path


@pytest.fixture(scope="session")
def imagenet_sample(shared_dir: Path) -> Path:
    """``../shared/datasets/imagenet-sample`` (``images/`` and ``labels.csv``)."""
    path = shared_dir / "datasets" / "imagenet-sample"
    if not (path / "images").is_dir():
        pytest.skip(f"../shared/datasets/imagenet-sample not found: expected real photos at {path}")
    return path
