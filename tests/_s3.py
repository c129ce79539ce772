"""A real S3 API server for the tests: ``moto`` in server mode, a subprocess on a loopback port.

The result store then talks plain HTTP S3 to it through boto3, exactly as it would to AWS or
MinIO (multipart uploads, server-side copies, presigned URLs). :func:`start_server` raises
:class:`Unavailable` (the fixtures turn it into a skip that says why) when boto3 or moto
cannot be imported.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from typing import Any

from _net import free_port

#: boto3's own settings, which the result store reads (never the URL): what a test sets.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class Unavailable(RuntimeError):
    """No S3 server can be had here (the message says why)."""


class Server:
    """``python -m moto.server`` on 127.0.0.1; ``env(bucket)`` is what a process needs to use it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise Unavailable(f"moto.server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable("moto.server did not listen within 30 s") from None
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"mm-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server() -> Server:
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"boto3 and moto[server] are needed (pip install -e '.[dev]'): {exc}") from exc
    return Server()
