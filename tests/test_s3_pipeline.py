"""``bifta label`` end to end against S3 (a moto server in its own process).

Every run here is the real CLI in a subprocess (``python -m jobs.label``), which starts its own
embedded Ray: the Ray workers that read images, load the checkpoint and write nothing but rows are
separate processes and must reach the same S3 through the ordinary AWS environment. Inputs,
label set, checkpoint and output all live on S3.

The credentials handed to the CLI are distinctive values, so a test can assert they never show
up in anything the job prints.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.s3_server import S3Server, aws_env, moto_server

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 240
N_IMAGES = 6

LABELSET = {
    "classes.json": ["cat", "dog", "car"],
    "cupl.json": {
        "cat": ["a small furry pet with whiskers.", "a cat curled up asleep."],
        "dog": ["a loyal pet that barks.", "a dog with floppy ears."],
        "car": ["a vehicle with four wheels.", "a car parked on a street."],
    },
}


def _fake_credentials() -> dict[str, str]:
    """Distinctive credentials (moto accepts any) whose leaking would be easy to spot."""
    return {
        "AWS_ACCESS_KEY_ID": "AKIABIFTA" + secrets.token_hex(6).upper(),
        "AWS_SECRET_ACCESS_KEY": "bifta-secret-" + secrets.token_hex(16),
    }


def _run_cli(args: list[str], env: dict[str, str], timeout: float = RUN_TIMEOUT_S,
             job: str = "jobs.label") -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    run_env.update(env)
    return subprocess.run([sys.executable, "-m", job, *args], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_no_secrets(result: subprocess.CompletedProcess, creds: dict[str, str]) -> None:
    printed = result.stdout + result.stderr
    assert creds["AWS_SECRET_ACCESS_KEY"] not in printed
    assert creds["AWS_ACCESS_KEY_ID"] not in printed


def _read_output(uri: str):
    from bifta_core.io import storage
    from pipelines.write import part_files

    files = part_files(uri)
    assert files, f"no part files under {uri}"
    tables = []
    for path in files:
        fs, p = storage.get_arrow_fs(path)
        tables.append(pq.read_table(p, filesystem=fs))
    import pyarrow as pa

    return pa.concat_tables(tables), files


def _summary(uri: str) -> dict:
    from bifta_core.io import storage

    return json.loads(storage.read_bytes(uri.rstrip("/") + "/_bifta_summary.json"))


@pytest.fixture
def s3_data(s3_server: S3Server, imagenet_sample: Path, tiny_vit_checkpoint: Path) -> dict[str, object]:
    """Images, a label-set folder and a checkpoint on S3; an empty output bucket."""
    s3_server.create_bucket("bifta-in")
    s3_server.create_bucket("bifta-out")
    images = sorted((imagenet_sample / "images").iterdir())[:N_IMAGES]
    uris = []
    for path in images:
        uri = f"s3://bifta-in/images/{path.name}"
        s3_server.put(uri, path.read_bytes())
        uris.append(uri)
    s3_server.put("s3://bifta-in/images/README.txt", b"not an image")  # filtered out by extension
    for name, payload in LABELSET.items():
        s3_server.put(f"s3://bifta-in/labelsets/pets/{name}", json.dumps(payload).encode())
    s3_server.put("s3://bifta-in/models/tiny.pt", tiny_vit_checkpoint.read_bytes())
    return {"uris": uris, "names": [p.name for p in images]}


def _common(tmp_path: Path) -> list[str]:
    return ["--model", "bifta-tiny-vit", "--num-views", "4", "--labelset-cache", str(tmp_path / "labelsets"),
            "--quiet"]


@pytest.mark.slow
def test_s3_prefix_to_s3_output_resumes(s3_server: S3Server, s3_data: dict, tmp_path: Path) -> None:
    creds = _fake_credentials()
    cache = tmp_path / "bifta-cache"
    env = {**s3_server.env, **creds, "BIFTA_CACHE_DIR": str(cache)}
    out = "s3://bifta-out/runs/prefix"
    args = ["s3://bifta-in/images/", "--labels", "s3://bifta-in/labelsets/pets", "--out", out,
            "--pretrained", "s3://bifta-in/models/tiny.pt", "--save-embeddings", *_common(tmp_path)]

    first = _run_cli([*args, "--shard-size", "2"], env)
    _assert_no_secrets(first, creds)
    assert first.returncode == 0, first.stderr[-4000:]
    table, files = _read_output(out)
    assert table.num_rows == N_IMAGES and len(files) == 3
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("label_set").to_pylist()) == {"pets"}
    assert set(table.column("label").to_pylist()) <= {"cat", "dog", "car"}
    assert set(table.column("pretrained").to_pylist()) == {"s3://bifta-in/models/tiny.pt"}

    # The checkpoint was downloaded once for the node (driver, label-set task and encode actor
    # share it): exactly one file in the download cache.
    downloads = [p for p in (cache / "downloads").iterdir() if not p.name.endswith(".lock")]
    assert len(downloads) == 1 and downloads[0].name.endswith("-tiny.pt"), downloads
    # Remove the object: the resumed run can only succeed from the cached copy.
    s3_server.client().delete_object(Bucket="bifta-in", Key="models/tiny.pt")
    # An interrupted run: one shard's file never got published. The rerun redoes that shard only.
    lost = sorted(files)[1]
    s3_server.client().delete_object(Bucket="bifta-out", Key=lost.removeprefix("s3://bifta-out/"))

    second = _run_cli(args, env)  # the saved listing fixes the shards: no --shard-size needed
    _assert_no_secrets(second, creds)
    assert second.returncode == 0, second.stderr[-4000:]
    table, files = _read_output(out)
    assert len(files) == 3
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(s3_data["names"])  # exactly one row per input, no duplicates
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("uri").to_pylist()) == set(s3_data["uris"])
    summary = _summary(out)
    assert summary["inputs"] == N_IMAGES and summary["skipped_already_done"] == 4
    assert summary["processed"] == 2
    assert len({p.name for p in (cache / "downloads").iterdir() if not p.name.endswith(".lock")}) == 1
    # No write probes or temporary objects are left behind in the output prefix.
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="bifta-out")["Contents"]]
    assert all(k.removeprefix("runs/prefix/").startswith(("part-", "_bifta_", "_embeddings/part-")) for k in keys), keys
    assert sum(k.startswith("runs/prefix/_embeddings/part-") for k in keys) == 3  # the lost shard's too

    # The kept embeddings relabel from S3 to S3 with a whole-image method: no image is read (the
    # images are gone), the rows are those `label --method cupl` would write.
    for key in [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="bifta-in", Prefix="images/")["Contents"]]:
        s3_server.client().delete_object(Bucket="bifta-in", Key=key)
    relabelled = "s3://bifta-out/runs/relabel"
    third = _run_cli([out, "--labels", "s3://bifta-in/labelsets/pets", "--out", relabelled, "--method", "cupl",
                      "--labelset-cache", str(tmp_path / "labelsets"), "--quiet"], env, job="jobs.relabel")
    _assert_no_secrets(third, creds)
    assert third.returncode == 0, third.stderr[-4000:]
    table, files = _read_output(relabelled)
    assert len(files) == 3 and sorted(table.column("image_id").to_pylist()) == sorted(s3_data["names"])
    assert set(table.column("status").to_pylist()) == {"ok"} and set(table.column("method").to_pylist()) == {"cupl"}


@pytest.mark.slow
def test_s3_manifest_missing_key_becomes_error_row(s3_server: S3Server, s3_data: dict, tmp_path: Path) -> None:
    """A manifest row whose object is missing is an error row; once the object exists, ``--retry-errors``
    (given ``--s3-endpoint-url``/``--s3-region`` instead of the AWS environment) redoes its shard."""
    creds = _fake_credentials()
    env = {**s3_server.env, **creds, "BIFTA_CACHE_DIR": str(tmp_path / "bifta-cache")}
    missing = "s3://bifta-in/images/does-not-exist.jpg"
    rows = [s3_data["uris"][0], missing, s3_data["uris"][1]]
    s3_server.put("s3://bifta-in/manifests/run.csv", ("uri\n" + "\n".join(rows) + "\n").encode())
    out = "s3://bifta-out/runs/manifest"

    result = _run_cli(["s3://bifta-in/manifests/run.csv", "--labels", "s3://bifta-in/labelsets/pets",
                       "--out", out, "--pretrained", "random", *_common(tmp_path)], env)
    _assert_no_secrets(result, creds)
    assert result.returncode == 0, result.stderr[-4000:]
    table, _ = _read_output(out)
    by_uri = {r["uri"]: r for r in table.to_pylist()}
    assert set(by_uri) == set(rows)
    assert by_uri[missing]["status"] == "error"
    assert any(reason in by_uri[missing]["error"] for reason in ("not found", "no such key"))
    assert by_uri[missing]["label"] is None
    assert [by_uri[u]["status"] for u in rows if u != missing] == ["ok", "ok"]
    summary = _summary(out)
    assert summary["ok"] == 2 and summary["errors"] == 1
    assert "errors" in result.stdout  # the summary printed the error count

    # The object shows up later: --retry-errors redoes the shard holding the error row, replacing its
    # file in one PUT; exactly one row per input remains.
    s3_server.put(missing, s3_server.client().get_object(Bucket="bifta-in", Key="images/" + s3_data["names"][2])
                  ["Body"].read())
    # This time the endpoint and region come as flags, with the AWS endpoint variables blanked: the driver
    # lists and the Ray workers read through the same endpoint; credentials still come only from the environment.
    retried = _run_cli(["s3://bifta-in/manifests/run.csv", "--labels", "s3://bifta-in/labelsets/pets",
                        "--out", out, "--pretrained", "random", "--retry-errors", "--s3-endpoint-url",
                        s3_server.endpoint, "--s3-region", "us-east-1", *_common(tmp_path)],
                       {**env, "AWS_ENDPOINT_URL": "", "AWS_ENDPOINT_URL_S3": ""})
    _assert_no_secrets(retried, creds)
    assert retried.returncode == 0, retried.stderr[-4000:]
    table, files = _read_output(out)
    assert sorted(table.column("uri").to_pylist()) == sorted(rows) and len(files) == 1
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert _summary(out)["processed"] == 3


@pytest.mark.slow
def test_s3_error_storm_loses_and_duplicates_nothing(s3_server: S3Server, s3_data: dict, tmp_path: Path) -> None:
    """A fifth of all S3 requests answered 503 SlowDown / 500 InternalError: retried with backoff where
    that suffices; what still fails is an error row or a failed run, and reruns (plain, then
    --retry-errors) finish the job with exactly one ok row per input."""
    from tests.s3_server import fault_proxy

    creds = _fake_credentials()
    out = "s3://bifta-out/runs/storm"
    with fault_proxy(s3_server.endpoint, share=0.2, seed=7) as proxy:
        env = {**s3_server.env, **creds, "AWS_ENDPOINT_URL": proxy.endpoint,
               "BIFTA_CACHE_DIR": str(tmp_path / "bifta-cache")}
        args = ["s3://bifta-in/images/", "--labels", "s3://bifta-in/labelsets/pets", "--out", out,
                "--pretrained", "random", "--shard-size", "2", *_common(tmp_path)]
        results: list[tuple[int, int | None]] = []
        errors = None
        for _ in range(6):
            result = _run_cli([*args, *(["--retry-errors"] if errors else [])], env)
            _assert_no_secrets(result, creds)
            errors = None
            if result.returncode == 0:
                errors = json.loads(s3_server.client().get_object(
                    Bucket="bifta-out", Key="runs/storm/_bifta_summary.json")["Body"].read())["errors"]
            results.append((result.returncode, errors))
            if errors == 0:
                break
        assert results[-1] == (0, 0), results
        assert proxy.counts["failed"] > 10, proxy.counts  # the storm really happened
    table, files = _read_output(out)
    assert sorted(table.column("image_id").to_pylist()) == sorted(s3_data["names"]), results
    assert set(table.column("status").to_pylist()) == {"ok"}, table.column("error").to_pylist()
    assert len(files) == 3


def _assert_fails_fast(result: subprocess.CompletedProcess, elapsed: float, creds: dict[str, str], why: str) -> None:
    _assert_no_secrets(result, creds)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    assert "not writable" in errors[0] and why in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    # Failed before any work: no Ray was started, nothing was labelled.
    assert "Ray" not in result.stderr and "bifta label — summary" not in result.stdout
    assert elapsed < 60


@pytest.mark.slow
def test_nonexistent_output_bucket_fails_fast(s3_server: S3Server, imagenet_sample: Path, tmp_path: Path) -> None:
    creds = _fake_credentials()
    env = {**s3_server.env, **creds}
    start = time.monotonic()
    result = _run_cli([str(imagenet_sample / "images"), "--labels", "cat,dog", "--out",
                       "s3://no-such-bucket-bifta/out", "--pretrained", "random", "--limit", "2",
                       *_common(tmp_path)], env, timeout=120)
    _assert_fails_fast(result, time.monotonic() - start, creds, "no such bucket")
    assert "s3://no-such-bucket-bifta/out" in result.stderr


@pytest.mark.slow
def test_forbidden_output_bucket_fails_fast(imagenet_sample: Path, tmp_path: Path) -> None:
    """A real 403: a private moto server enforcing IAM; the user may write one bucket only."""
    import boto3

    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*",
                       "Resource": ["arn:aws:s3:::mine", "arn:aws:s3:::mine/*"]}],
    }
    with moto_server() as server, aws_env(server.endpoint) as admin_env:
        admin = S3Server(server.endpoint, env=dict(admin_env))
        admin.create_bucket("mine")
        admin.create_bucket("theirs")
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
        iam.create_user(UserName="labeller")
        iam.put_user_policy(UserName="labeller", PolicyName="own-bucket", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="labeller")["AccessKey"]
        urllib.request.urlopen(urllib.request.Request(
            server.endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "application/octet-stream"}), timeout=10).close()
        creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

        start = time.monotonic()
        result = _run_cli([str(imagenet_sample / "images"), "--labels", "cat,dog", "--out", "s3://theirs/out",
                           "--pretrained", "random", "--limit", "2", *_common(tmp_path)],
                          {**admin_env, **creds}, timeout=120)
        _assert_fails_fast(result, time.monotonic() - start, creds, "access denied")
        assert "s3://theirs/out" in result.stderr
