#!/usr/bin/env bash
# Submit a bifta labelling job to a running Ray cluster, shipping this checkout's code.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: infra/submit.sh INPUT --labels LABELSET --out OUT [bifta label flags...]

Runs `python -m jobs.label INPUT --labels ... --out ...` on a Ray cluster through the Ray
Jobs API. The code of this checkout is uploaded with infra/runtime_env.yaml; the cluster
image must already have the dependencies (infra/Dockerfile).

environment:
  RAY_ADDRESS         Ray dashboard address (default http://127.0.0.1:8265, e.g. after
                      `ray dashboard infra/cluster-aws.yaml` or a kubectl port-forward)
  BIFTA_SUBMIT_FLAGS  extra `ray job submit` flags, e.g. "--no-wait --submission-id run-001"
  RAY_AUTH_MODE       "token" when the cluster uses Ray token authentication; the token
                      comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
                      (without RAY_AUTH_MODE=token the ray CLI sends no token: HTTP 401)

example:
  RAY_ADDRESS=http://127.0.0.1:8265 infra/submit.sh s3://my-images/raw/ \
      --labels s3://my-bifta/labelsets/products/ --out s3://my-bifta/labels/run-001/ \
      --model ViT-B-32 --pretrained openai --batch-size 8
USAGE
}

if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    exit 0
fi

# Run from the repository root so `--working-dir .` uploads the project, wherever the
# script is called from.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if ! command -v ray >/dev/null 2>&1; then
    echo "submit.sh: the 'ray' command was not found; activate the environment that has ray installed" >&2
    exit 2
fi

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
# Word-split on purpose: the variable holds several flags. The ${a[@]+...} form below
# keeps an empty array legal under `set -u` on bash 3.2 (macOS) as well.
read -r -a extra_flags <<< "${BIFTA_SUBMIT_FLAGS:-}"

exec ray job submit \
    --address "$address" \
    --working-dir . \
    --runtime-env infra/runtime_env.yaml \
    ${extra_flags[@]+"${extra_flags[@]}"} \
    -- python -m jobs.label "$@"
