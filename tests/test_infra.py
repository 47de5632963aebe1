"""Static checks of the deployment manifests in infra/ and docs/scaling.md.

Nothing here talks to a cluster: the manifests are parsed and every module, file and
flag they reference is checked against the repository, so a rename cannot silently break
deployment.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


def _yaml(name: str) -> Any:
    with open(INFRA / name, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def _pinned_ray_version() -> str:
    deps = _pyproject()["project"]["dependencies"]
    for dep in deps:
        match = re.match(r"ray(\[[^\]]*\])?==(\S+)$", dep)
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml does not pin ray with ==")


def _module_file(module: str) -> Path | None:
    """Path of the source for `python -m module`, or None if the repo has none."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def _python_m_module(command: str) -> str:
    """Module run by a `python -m MODULE ...` command line."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], f"entrypoint must be `python -m ...`: {command!r}"
    return words[2]


def _assert_pinned_image(image: str) -> None:
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"image {image!r} has no tag"
    assert tag != "latest" and "nightly" not in tag, f"image {image!r} is not pinned"


# ---------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (INFRA / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def test_dockerfile_base_image_matches_pinned_ray() -> None:
    froms = [args for kw, args in _dockerfile_instructions() if kw == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    _assert_pinned_image(image)
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray"
    assert tag.startswith(f"{_pinned_ray_version()}-py311-"), tag
    assert _pyproject()["project"]["requires-python"].startswith(">=3.11")


def test_dockerfile_copies_existing_paths_and_installs_project() -> None:
    instructions = _dockerfile_instructions()
    copies = [args for kw, args in instructions if kw == "COPY"]
    assert copies
    for args in copies:
        words = [w for w in args.split() if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies missing path {source}"
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert "pip install" in runs and re.search(r"pip install [^&]*\s\.(\s|$)", runs)
    # Every package the jobs import must be in the image.
    copied = " ".join(copies)
    for package in ("bifta_core", "pipelines", "jobs"):
        assert package in copied


# ----------------------------------------------------------- runtime env


def test_runtime_env_ships_code_only() -> None:
    env = _yaml("runtime_env.yaml")
    assert env["working_dir"] == "."
    excludes = env["excludes"]
    for required in (".venv/", ".git/"):
        assert required in excludes
    assert "pip" not in env and "conda" not in env, "deps come from the image, not per job"
    for name, value in env.get("env_vars", {}).items():
        assert isinstance(value, str), f"runtime_env env_vars must be strings: {name}"
        assert "SECRET" not in name and "AWS_ACCESS_KEY" not in name


# ------------------------------------------------------------------- KubeRay


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def _has_memory_dshm(pod_template: dict[str, Any]) -> bool:
    volumes = {v["name"]: v for v in pod_template["spec"].get("volumes", [])}
    for container in _containers(pod_template):
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            if mount["mountPath"] == "/dev/shm" and volume.get("emptyDir", {}).get("medium") == "Memory":
                return True
    return False


def test_kuberay_rayjob() -> None:
    job = _yaml("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    module = _python_m_module(spec["entrypoint"])
    assert module == "jobs.label"
    assert _module_file(module) is not None, "jobs/label.py is missing"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pinned_ray_version()
    head = cluster["headGroupSpec"]["template"]
    assert _has_memory_dshm(head)
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if any(c["resources"]["limits"].get("nvidia.com/gpu") == 1 for c in _containers(g["template"]))
    ]
    assert gpu_groups, "no worker group with nvidia.com/gpu: 1"
    for group in gpu_groups:
        assert _has_memory_dshm(group["template"])
    for template in [head] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        for container in _containers(template):
            _assert_pinned_image(container["image"])


# ------------------------------------------------------- cluster launcher


def test_cluster_launcher_aws() -> None:
    cfg = _yaml("cluster-aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    cpu_types = [name for name, t in types.items()
                 if name != cfg["head_node_type"] and not t.get("resources", {}).get("GPU")]
    assert gpu_types and cpu_types
    for t in gpu_types:
        assert t["node_config"]["InstanceType"].startswith(("g", "p"))
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    _assert_pinned_image(cfg["docker"]["image"])
    assert any("shm-size" in opt for opt in cfg["docker"].get("run_options", []))
    assert isinstance(cfg["setup_commands"], list)


# ---------------------------------------------------------------- submit.sh


def test_submit_script_references_existing_files() -> None:
    script = INFRA / "submit.sh"
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert script.stat().st_mode & stat.S_IXUSR, "submit.sh is not executable"
    for path in re.findall(r"--runtime-env\s+(\S+)", text):
        assert (ROOT / path).is_file(), f"submit.sh references missing {path}"
    module = re.search(r"python -m (\S+)", text)
    assert module and module.group(1) == "jobs.label"
    assert _module_file(module.group(1)) is not None, "jobs/label.py is missing"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_submit_script_builds_ray_command(tmp_path: Path) -> None:
    """Run submit.sh against a fake `ray` that prints its cwd and arguments."""
    fake = tmp_path / "ray"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$PWD" "$@"\n', encoding="utf-8")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "RAY_ADDRESS": "http://head:8265", "BIFTA_SUBMIT_FLAGS": "--no-wait"}
    result = subprocess.run(
        ["bash", str(INFRA / "submit.sh"), "s3://in/", "--labels", "my labels.yaml", "--out", "s3://out/"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == str(ROOT)  # always submits from the repository root
    assert lines[1:] == [
        "job", "submit", "--address", "http://head:8265", "--working-dir", ".",
        "--runtime-env", "infra/runtime_env.yaml", "--no-wait",
        "--", "python", "-m", "jobs.label", "s3://in/", "--labels", "my labels.yaml", "--out", "s3://out/",
    ]


def test_submit_script_usage() -> None:
    shown = subprocess.run(["bash", str(INFRA / "submit.sh"), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("usage:")
    missing = subprocess.run(["bash", str(INFRA / "submit.sh")], capture_output=True, text=True)
    assert missing.returncode == 2 and "usage:" in missing.stderr


# --------------------------------------------------------------------- docs


def test_scaling_doc_flags_exist() -> None:
    """Every `--flag` the scaling guide mentions is one jobs.label accepts."""
    doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    for flag in ("--batch-size", "--num-views", "--max-views", "--model", "--pretrained"):
        assert f"`{flag}" in doc or f" {flag} " in doc, f"docs/scaling.md does not mention {flag}"
    label = _module_file("jobs.label")
    if label is None:
        pytest.fail("jobs/label.py is missing")
    source = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "jobs").glob("*.py"))
    # Flags inside code spans; `ray job submit` flags and env examples are not ours.
    ours = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", " ".join(re.findall(r"`([^`]*)`", doc))))
    ray_flags = {"--no-wait", "--submission-id", "--shm-size", "--address", "--working-dir", "--runtime-env"}
    for flag in sorted(ours - ray_flags):
        assert f'"{flag}"' in source or f"'{flag}'" in source, f"docs/scaling.md mentions unknown flag {flag}"
