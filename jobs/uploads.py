"""Streaming uploads: request body → S3 as it arrives, with sha256 and size computed on the way.

The web process holds at most one multipart part (8 MiB) of a file, whatever its size. If the
upload is interrupted, too large or rejected, ``discard()`` leaves no object behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, StopFutureHandlers, StopUpload

from loft import storage

PART_BYTES = 8 * 2**20  # S3 parts must be at least 5 MiB, except the last


class StoredUpload(UploadedFile):
    """What ``request.FILES`` holds for a streamed upload: where it went and what it was."""

    def __init__(self, name: str, key: str, size: int, sha256: str, content_type: str | None):
        super().__init__(file=None, name=name, content_type=content_type, size=size)
        self.key = key
        self.sha256 = sha256

    def close(self):
        return None


class S3StreamingUploadHandler(FileUploadHandler):
    """Takes the one file field named ``file`` and streams it to ``key_for(file name)``."""

    chunk_size = 2**20

    def __init__(self, key_for: Callable[[str], str | None], max_bytes: int, request=None):
        super().__init__(request)
        self.key_for = key_for
        self.max_bytes = max_bytes
        self.too_large = False
        self.key: str | None = None
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._buffer = bytearray()
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._completed = False

    def new_file(
        self,
        field_name,
        file_name,
        content_type,
        content_length,
        charset=None,
        content_type_extra=None,
    ):
        super().new_file(
            field_name, file_name, content_type, content_length, charset, content_type_extra
        )
        if field_name != "file" or self.key is not None:
            raise StopFutureHandlers  # one file per upload; other fields are ignored
        key = self.key_for(file_name)
        if key is None:
            raise StopUpload(connection_reset=False)
        self.key = key
        raise StopFutureHandlers

    def receive_data_chunk(self, raw_data: bytes, start: int):
        if self.key is None or self._completed:
            return None
        self._size += len(raw_data)
        if self._size > self.max_bytes:
            self.too_large = True
            self.discard()
            raise StopUpload(connection_reset=False)
        self._sha256.update(raw_data)
        self._buffer += raw_data
        if len(self._buffer) >= PART_BYTES:
            self._send_part()
        return None

    def file_complete(self, file_size: int):
        if self.key is None or self._completed:
            return None
        client, bucket = storage.client(), storage.bucket()
        try:
            if self._upload_id is None:
                # Small file: one request.
                client.put_object(Bucket=bucket, Key=self.key, Body=bytes(self._buffer))
            else:
                if self._buffer:
                    self._send_part()
                client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        except storage.BOTO_ERRORS as error:
            self.discard()
            raise storage.StorageError(
                f"Object storage could not store the upload: {error}"
            ) from error
        self._buffer = bytearray()
        self._completed = True
        return StoredUpload(
            self.file_name, self.key, self._size, self._sha256.hexdigest(), self.content_type
        )

    def upload_interrupted(self):
        self.discard()

    def discard(self) -> None:
        """Remove whatever this upload wrote: an open multipart upload or the finished object."""
        self._buffer = bytearray()
        if self.key is None:
            return
        client, bucket = storage.client(), storage.bucket()
        try:
            if self._upload_id is not None and not self._completed:
                client.abort_multipart_upload(Bucket=bucket, Key=self.key, UploadId=self._upload_id)
            client.delete_object(Bucket=bucket, Key=self.key)
        except storage.BOTO_ERRORS as error:
            raise storage.StorageError(
                f"Object storage could not remove a discarded upload: {error}"
            ) from error
        finally:
            self._upload_id = None
            self._completed = False

    def _send_part(self) -> None:
        client, bucket = storage.client(), storage.bucket()
        try:
            if self._upload_id is None:
                self._upload_id = client.create_multipart_upload(Bucket=bucket, Key=self.key)[
                    "UploadId"
                ]
            number = len(self._parts) + 1
            response = client.upload_part(
                Bucket=bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=bytes(self._buffer),
            )
        except storage.BOTO_ERRORS as error:
            self.discard()
            raise storage.StorageError(
                f"Object storage could not store the upload: {error}"
            ) from error
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})
        self._buffer = bytearray()
