"""Starts `ernie serve` on a synthetic model for the server tests."""
import os
import socket
import subprocess
import tempfile
import time

import httpx
import pytest

ERNIE = os.environ.get("ERNIE", os.path.join(os.path.dirname(__file__), "..", "..", "build", "ernie"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="ernie-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [ERNIE, "serve", model, "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "512",
             "--kv-cache-memory", str(256 << 20), "--served-model-name", "ernie-tiny", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + open(self.log.name).read())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start:\n" + open(self.log.name).read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise

    def output(self):
        return open(self.log.name).read()


@pytest.fixture(scope="session")
def model_dir():
    d = tempfile.mkdtemp(prefix="ernie-model-")
    subprocess.run([ERNIE, "make-model", "--preset", "tiny", "--seed", "5", "--out", d], check=True,
                   stderr=subprocess.DEVNULL)
    return d


@pytest.fixture(scope="session")
def server(model_dir):
    s = Server(model_dir)
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.output()


@pytest.fixture(scope="session")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
