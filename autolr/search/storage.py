"""Where Tune keeps the search: a local folder, or a URI checked writable up front."""

from __future__ import annotations

import os
import time
from pathlib import Path

from autolr._checks import one_line
from autolr.errors import ConfigError


def check_storage(storage_path: str) -> str:
    """Where Tune keeps the search: a local folder made absolute, or a URI checked writable.

    A URI is any that pyarrow resolves (``s3://bucket/prefix``, ``gs://``,
    ``abfs://``, ``hdfs://``), as Tune reads it on every node. An S3-compatible
    store (MinIO, Ceph, moto) is reached through the standard
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:9000``),
    which pyarrow reads wherever a trial runs. A small marker object is written
    and deleted first, so a missing bucket or credentials fail here, in one
    line, not in the first trial's checkpoint after the range test.

    Raises:
        ConfigError: no filesystem handles the URI's scheme, or it cannot be written.
    """
    if "://" not in storage_path:
        return str(Path(storage_path).expanduser().resolve())
    import pyarrow
    import pyarrow.fs

    where = f"search.storage_path {storage_path!r}"
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage_path)
    except (OSError, pyarrow.ArrowException) as exc:
        raise ConfigError(
            f"{where}: no filesystem handles it ({one_line(exc)[:500]}); expected a local folder "
            "or a URI that pyarrow reads: s3://, gs://, abfs://, hdfs://, file://"
        ) from None
    marker = f"{path.rstrip('/')}/.autolr-write-check-{os.getpid()}-{time.time_ns()}"
    try:
        with fs.open_output_stream(marker) as out:
            out.write(b"autolr checks that the search can write here\n")
        fs.delete_file(marker)
    except (OSError, pyarrow.ArrowException) as exc:
        raise ConfigError(
            f"{where} is not writable: {one_line(exc)[:500]}; expected an existing bucket or "
            f"folder that these credentials may write{_credentials_hint(storage_path)}"
        ) from None
    return storage_path


def _credentials_hint(uri: str) -> str:
    """Why an S3 write may have failed when no credentials are set where AWS looks first."""
    if not uri.startswith("s3://"):
        return ""
    sources = (
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",  # EKS service accounts
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",  # ECS tasks
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    )
    files = (
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
    )
    if any(os.environ.get(key) for key in sources) or any(
        Path(f).expanduser().is_file() for f in files
    ):
        return ""
    return (
        "; no AWS credentials are set (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "AWS_PROFILE or ~/.aws/credentials)"
    )
