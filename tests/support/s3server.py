"""A real S3-compatible server on loopback for the object-store tests: moto's server mode
(`moto_server`, from `moto[server]`) in a subprocess on a free port.

It speaks the S3 REST API over HTTP like MinIO or AWS would (signatures, multipart uploads,
bucket policies for anonymous reads), keeping objects in memory. Credentials are fake and only
ever set in the environment of the tests and the processes they start (AWS_* variables).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import requests

from tests.support.hubproc import free_port

MOTO_BIN = str(Path(sys.executable).parent / "moto_server")
REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "outpost-test",
    "AWS_SECRET_ACCESS_KEY": "outpost-test-secret",
    "AWS_DEFAULT_REGION": REGION,
    # Never let boto3's credential chain ask an instance-metadata address: loopback only.
    "AWS_EC2_METADATA_DISABLED": "true",
}


class S3Server:
    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> S3Server:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [MOTO_BIN, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=log,
            env={**os.environ, **CREDENTIALS},
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"moto_server exited: {self.log_path.read_text()}")
            try:
                requests.get(self.url + "/moto-api/", timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("moto_server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> Any:
        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
        ).client("s3", endpoint_url=self.url)

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def allow_anonymous_reads(self, bucket: str, prefix: str) -> None:
        """What an operator does for a static host or CDN origin: anyone may GET under prefix."""
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{bucket}/{prefix}*",
                }
            ],
        }
        self.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        c = self.client()
        out: dict[str, bytes] = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = c.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out


@contextmanager
def s3_environment() -> Iterator[None]:
    """The fake credentials in os.environ (so boto3 in this process and in the hub process
    started from it finds them), restored afterwards."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def running_s3(log_path: Path, *buckets: str) -> Iterator[S3Server]:
    """A started S3Server with `buckets` made, inside s3_environment() (the processes a test
    starts inherit the fake credentials); stopped afterwards."""
    with s3_environment():
        server = S3Server(log_path).start()
        try:
            for name in buckets:
                server.bucket(name)
            yield server
        finally:
            server.stop()
