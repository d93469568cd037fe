"""Object storage: the one place Loft talks to S3.

The client is built lazily with short timeouts and bounded retries; every botocore failure is
raised as ``StorageError`` so callers handle one exception and can answer 503 with a sentence.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings


class StorageError(Exception):
    """Object storage failed or is unreachable."""


# What botocore, and boto3's transfers (upload_file: S3UploadFailedError), raise when S3 fails;
# callers outside this module re-raise it as StorageError.
BOTO_ERRORS = (BotoCoreError, ClientError, Boto3Error)


def bucket() -> str:
    return settings.S3_BUCKET


def client_config(connect_timeout: float, read_timeout: float, attempts: int) -> Config:
    return Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": attempts, "mode": "standard"},
        # Path-style URLs work with every S3 implementation, including local gateways.
        # Over plain HTTP botocore would hash every body into the signature and add a CRC:
        # measured here, that caps uploads at 15 MB/s against 97 MB/s without. Loft records
        # each upload's sha256 itself, and HTTPS endpoints are unsigned-payload anyway.
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        signature_version="s3v4",
    )


def _make_client(connect_timeout: float, read_timeout: float, attempts: int):
    return boto3.client(
        "s3",
        endpoint_url=settings.S3_ENDPOINT_URL,
        region_name=settings.S3_REGION,
        aws_access_key_id=settings.S3_ACCESS_KEY_ID,
        aws_secret_access_key=settings.S3_SECRET_ACCESS_KEY,
        config=client_config(connect_timeout, read_timeout, attempts),
    )


@functools.cache
def client():
    return _make_client(connect_timeout=3, read_timeout=60, attempts=3)


@functools.cache
def _probe_client():
    # A health check answers fast: one attempt, short timeouts.
    return _make_client(connect_timeout=1, read_timeout=2, attempts=1)


def _fail(action: str, error: Exception) -> StorageError:
    return StorageError(f"Object storage could not {action}: {error}")


def ensure_bucket() -> bool:
    """Create the bucket if it is missing; True when it was created."""
    bucket = settings.S3_BUCKET
    try:
        client().head_bucket(Bucket=bucket)
        return False
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
            raise _fail(f"reach bucket {bucket}", error) from error
    except BotoCoreError as error:
        raise _fail(f"reach bucket {bucket}", error) from error
    try:
        client().create_bucket(Bucket=bucket)
    except BOTO_ERRORS as error:
        raise _fail(f"create bucket {bucket}", error) from error
    return True


def check() -> None:
    """Raise StorageError unless the bucket answers."""
    try:
        _probe_client().head_bucket(Bucket=settings.S3_BUCKET)
    except BOTO_ERRORS as error:
        raise _fail(f"reach bucket {settings.S3_BUCKET}", error) from error


def put_bytes(key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    try:
        client().put_object(Bucket=settings.S3_BUCKET, Key=key, Body=data, ContentType=content_type)
    except BOTO_ERRORS as error:
        raise _fail(f"write {key}", error) from error


def iter_object(key: str, chunk_bytes: int = 2**20, first_bytes: int | None = None):
    """An object's bytes (or only its first bytes) as a stream of chunks, never all in memory."""
    extra = {"Range": f"bytes=0-{first_bytes - 1}"} if first_bytes else {}
    try:
        body = client().get_object(Bucket=settings.S3_BUCKET, Key=key, **extra)["Body"]
        yield from body.iter_chunks(chunk_bytes)
    except BOTO_ERRORS as error:
        raise _fail(f"read {key}", error) from error


def delete_object(key: str) -> None:
    try:
        client().delete_object(Bucket=settings.S3_BUCKET, Key=key)
    except BOTO_ERRORS as error:
        raise _fail(f"delete {key}", error) from error


def list_keys(prefix: str) -> list[str]:
    try:
        paginator = client().get_paginator("list_objects_v2")
        return [
            item["Key"]
            for page in paginator.paginate(Bucket=settings.S3_BUCKET, Prefix=prefix)
            for item in page.get("Contents", [])
        ]
    except BOTO_ERRORS as error:
        raise _fail(f"list {prefix}", error) from error


def list_objects(prefix: str):
    """(key, last modified) of every object under ``prefix``, page by page."""
    try:
        paginator = client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=settings.S3_BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"], item["LastModified"]
    except BOTO_ERRORS as error:
        raise _fail(f"list {prefix}", error) from error


def open_multipart_uploads():
    """(key, upload id, initiated) of every multipart upload begun and not yet finished."""
    try:
        paginator = client().get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=settings.S3_BUCKET):
            for item in page.get("Uploads", []):
                yield item["Key"], item["UploadId"], item["Initiated"]
    except BOTO_ERRORS as error:
        raise _fail("list multipart uploads", error) from error


def abort_multipart_upload(key: str, upload_id: str) -> None:
    try:
        client().abort_multipart_upload(Bucket=settings.S3_BUCKET, Key=key, UploadId=upload_id)
    except BOTO_ERRORS as error:
        raise _fail(f"abort the upload of {key}", error) from error


def is_missing(error: StorageError) -> bool:
    """True when S3 answered that an object is not there, as opposed to not answering."""
    cause = error.__cause__
    code = cause.response.get("Error", {}).get("Code") if isinstance(cause, ClientError) else None
    return code in {"NoSuchKey", "404", "NotFound"}


def get_bytes(key: str) -> bytes:
    try:
        return client().get_object(Bucket=settings.S3_BUCKET, Key=key)["Body"].read()
    except BOTO_ERRORS as error:
        raise _fail(f"read {key}", error) from error


def copy_object(source_key: str, key: str) -> None:
    """A copy made by the storage itself: the bytes never pass through this process."""
    try:
        client().copy_object(
            Bucket=settings.S3_BUCKET,
            Key=key,
            CopySource={"Bucket": settings.S3_BUCKET, "Key": source_key},
        )
    except BOTO_ERRORS as error:
        raise _fail(f"copy {source_key}", error) from error


def delete_prefix(prefix: str) -> int:
    """Delete every object under a prefix; returns how many were deleted."""
    deleted = 0
    try:
        paginator = client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=settings.S3_BUCKET, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client().delete_objects(Bucket=settings.S3_BUCKET, Delete={"Objects": keys})
                deleted += len(keys)
    except BOTO_ERRORS as error:
        raise _fail(f"delete {prefix}", error) from error
    return deleted


def upload_folder(folder, prefix: str, manifest: dict) -> None:
    """Upload every file of a local folder under ``prefix``, then ``manifest.json`` last: until
    the manifest is there, readers treat the prefix as not existing."""
    folder = Path(folder)
    try:
        for name in manifest["files"]:
            client().upload_file(str(folder / name), settings.S3_BUCKET, f"{prefix}{name}")
        client().put_object(
            Bucket=settings.S3_BUCKET,
            Key=f"{prefix}manifest.json",
            Body=json.dumps(manifest, indent=2).encode(),
            ContentType="application/json",
        )
    except BOTO_ERRORS as error:
        raise _fail(f"upload {prefix}", error) from error


def download_folder(prefix: str, folder) -> dict:
    """Download an artifact by its manifest into a local folder; returns the manifest.
    Raises StorageError when the manifest is missing (the artifact is incomplete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        manifest = json.loads(get_bytes(f"{prefix}manifest.json"))
        for name in manifest["files"]:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            client().download_file(settings.S3_BUCKET, f"{prefix}{name}", str(target))
    except BOTO_ERRORS as error:
        raise _fail(f"download {prefix}", error) from error
    return manifest
