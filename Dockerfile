# autolr image for a Ray cluster's head and workers (ray up, KubeRay).
# CPU by default; for GPU workers build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the chosen index: a bare `torch` pulls a multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY autolr ./autolr
COPY pipelines ./pipelines
# ray[default] brings the job server and dashboard that `ray job submit` needs; boto3
# lets the same image run an `mlflow server` with its artifacts in S3 (pyarrow, which Tune's
# s3:// storage uses, brings its own S3 client). The package pins its own dependencies'
# ranges in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[search]" "boto3>=1.28"

# Ray's node processes run as this user; MLflow's default store is ./mlruns.
RUN useradd --create-home --uid 1000 ray && mkdir -p /app/mlruns && chown -R ray /app
USER 1000

CMD ["python", "-m", "autolr.pipeline"]
