"""A real S3 API for tests: moto's standalone server on 127.0.0.1, in its own process group.

Use it from a test module with

    pytest_plugins = ("tests.s3_server",)

    def test_x(s3):                       # the server's environment is set in os.environ for the test
        uri = s3.bucket_uri("shards")     # s3://<a new bucket>/shards
        subprocess.run([...], env=os.environ)   # child processes (Ray's too) find the server the same way

Clients find it the way every AWS tool finds an endpoint: AWS_ENDPOINT_URL (pyarrow's S3FileSystem reads it), with
dummy credentials and a region in the environment. Nothing in the project knows about the test server.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mlflow_server import free_port, kill_group

STARTUP_TIMEOUT_S = 60.0


class S3Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.log_path = root / "moto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {STARTUP_TIMEOUT_S:.0f} s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        kill_group(self.proc)
        self.proc = None

    def bucket_uri(self, prefix: str = "") -> str:
        """A new, empty bucket (created through the S3 API), and a prefix in it."""
        import pyarrow.fs

        bucket = f"test-{uuid.uuid4().hex[:12]}"
        pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
                                region="us-east-1", allow_bucket_creation=True).create_dir(bucket)
        return f"s3://{bucket}/{prefix}".rstrip("/")


@pytest.fixture(scope="session")
def s3_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency: pip install -e '.[dev]'")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_server(s3_session_server: S3Server) -> S3Server:
    """The session's server (every test makes buckets of its own), started on first use or again after a module
    that stopped it."""
    if not s3_session_server.running:
        s3_session_server.start()
    return s3_session_server


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The module's S3 server, its endpoint and dummy credentials in this test's environment."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
