"""Streaming uploads: request body → S3 as it arrives, with sha256 and size computed on the way.

The web process holds at most a few multipart parts (8 MiB each) of a file, whatever its size:
one filling while up to two are being sent by a background thread, so that reading the request
and writing to S3 overlap. If the upload is interrupted, too large or rejected, ``discard()``
leaves no object behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, StopFutureHandlers, StopUpload

from loft import storage

PART_BYTES = 8 * 2**20  # S3 parts must be at least 5 MiB, except the last
PARTS_IN_FLIGHT = 2


class StoredUpload(UploadedFile):
    """What ``request.FILES`` holds for a streamed upload: where it went and what it was."""

    def __init__(self, name: str, key: str, size: int, sha256: str, content_type: str | None):
        super().__init__(file=None, name=name, content_type=content_type, size=size)
        self.key = key
        self.sha256 = sha256

    def close(self):
        return None


def _storage_failure(error: Exception) -> storage.StorageError:
    return storage.StorageError(f"Object storage could not store the upload: {error}")


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
        self._in_flight: list[Future] = []
        self._parts: list[dict] = []
        self._buffer = bytearray()
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._completed = False
        self._sender: ThreadPoolExecutor | None = None

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
                self._wait_for_parts(0)
                self._parts.sort(key=lambda part: part["PartNumber"])
                client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        except storage.BOTO_ERRORS as error:
            self.discard()
            raise _storage_failure(error) from error
        except storage.StorageError:
            self.discard()
            raise
        finally:
            self._shutdown_sender()
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
        for future in self._in_flight:
            future.cancel()
        self._shutdown_sender()
        self._in_flight = []
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
        """Hand the buffer to the sender thread; wait first if enough parts are on their way."""
        client, bucket = storage.client(), storage.bucket()
        if self._upload_id is None:
            try:
                self._upload_id = client.create_multipart_upload(Bucket=bucket, Key=self.key)[
                    "UploadId"
                ]
            except storage.BOTO_ERRORS as error:
                self.discard()
                raise _storage_failure(error) from error
            self._sender = ThreadPoolExecutor(
                max_workers=PARTS_IN_FLIGHT, thread_name_prefix="s3-part"
            )
        self._wait_for_parts(PARTS_IN_FLIGHT - 1)
        number = len(self._parts) + len(self._in_flight) + 1
        body, self._buffer = bytes(self._buffer), bytearray()
        self._in_flight.append(self._sender.submit(self._upload_part, client, bucket, number, body))

    def _upload_part(self, client, bucket: str, number: int, body: bytes) -> dict:
        response = client.upload_part(
            Bucket=bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _wait_for_parts(self, at_most_in_flight: int) -> None:
        while len(self._in_flight) > at_most_in_flight:
            future = self._in_flight.pop(0)
            try:
                self._parts.append(future.result())
            except storage.BOTO_ERRORS as error:
                self.discard()
                raise _storage_failure(error) from error

    def _shutdown_sender(self) -> None:
        if self._sender is not None:
            self._sender.shutdown(wait=True, cancel_futures=True)
            self._sender = None
