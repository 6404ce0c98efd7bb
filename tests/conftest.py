"""S3 fixtures: one moto server per test session, a fresh bucket per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from casengine.testing.s3server import DUMMY_CREDENTIALS, moto_server

REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of moto's S3 server, on 127.0.0.1 and a free port, for the whole session."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    """A plain boto3 client on the test endpoint, to set up and check behind a backend's back."""
    import boto3  # only for the tests that use S3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=REGION,
        aws_access_key_id=DUMMY_CREDENTIALS["key"],
        aws_secret_access_key=DUMMY_CREDENTIALS["secret"],
    )


@pytest.fixture
def s3_url_and_options(s3_endpoint: str, s3_client: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("s3://<fresh bucket>/root", storage options)``; the bucket is emptied and removed after."""
    bucket = f"cas-{uuid.uuid4().hex}"
    s3_client.create_bucket(Bucket=bucket)
    options = {
        "endpoint_url": s3_endpoint,
        **DUMMY_CREDENTIALS,
        "client_kwargs": {"region_name": REGION},
    }
    yield f"s3://{bucket}/root", options
    for upload in s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3_client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                         UploadId=upload["UploadId"])
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3_client.delete_object(Bucket=bucket, Key=obj["Key"])
    s3_client.delete_bucket(Bucket=bucket)
