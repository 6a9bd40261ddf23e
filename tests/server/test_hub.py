"""Finding models: a Hugging Face id downloaded from a fake hub on loopback (HF_ENDPOINT, HF_TOKEN,
resumable after a dropped connection), then found in the cache offline."""
import hashlib
import http.server
import json
import os
import subprocess
import tempfile
import threading

import httpx
import pytest

from conftest import ERNIE, Server

SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token"


class FakeHub(http.server.ThreadingHTTPServer):
    def __init__(self, repo, root):
        self.repo, self.root, self.dropped = repo, root, set()
        self.files = sorted(f for f in os.listdir(root) if os.path.isfile(os.path.join(root, f)))
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        hub = self.server
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        if self.path == f"/api/models/{hub.repo}/revision/main":
            body = json.dumps({"sha": SHA, "siblings": [
                {"rfilename": f, "size": os.path.getsize(os.path.join(hub.root, f))} for f in hub.files]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        prefix = f"/{hub.repo}/resolve/{SHA}/"
        name = self.path[len(prefix):] if self.path.startswith(prefix) else None
        if name not in hub.files:
            self.send_response(404)
            self.end_headers()
            return
        data = open(os.path.join(hub.root, name), "rb").read()
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if name.endswith(".safetensors") and name not in hub.dropped and len(data) > 1 << 20:
            # Drop the first download of each large shard half way: the client must resume.
            hub.dropped.add(name)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(data[start:])


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_download_resume_cache_and_offline(model_dir):
    hub = FakeHub("acme/ernie-tiny", model_dir)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    home = tempfile.mkdtemp(prefix="ernie-hf-")
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{hub.server_address[1]}", HF_HOME=home)
    try:
        # Without the token the hub refuses, and the message says what to do.
        r = subprocess.run([ERNIE, "serve", "acme/ernie-tiny"], capture_output=True, text=True, timeout=60,
                           env=dict(env, HF_TOKEN=""))
        assert r.returncode != 0 and "HF_TOKEN" in r.stderr, r.stderr
        s = Server("acme/ernie-tiny", env=dict(env, HF_TOKEN=TOKEN))
        try:
            out = httpx.post(s.url + "/v1/completions", json={"prompt": "hub", "max_tokens": 3}).json()
            assert len(out["choices"]) == 1
        finally:
            s.stop()
        assert hub.dropped, "no download was interrupted: the resume path was not exercised"
        log = s.output()
        assert "resuming" in log and "%" in log  # progress and the resume were reported
        snap = os.path.join(home, "hub", "models--acme--ernie-tiny", "snapshots", SHA)
        for f in hub.files:
            assert digest(os.path.join(snap, f)) == digest(os.path.join(model_dir, f)), f
        assert open(os.path.join(home, "hub", "models--acme--ernie-tiny", "refs", "main")).read() == SHA
        # Offline: found in the cache without the hub.
        hub.shutdown()
        s = Server("acme/ernie-tiny", env=dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"))
        try:
            assert "Hugging Face cache" in s.output()
        finally:
            s.stop()
    finally:
        hub.server_close()
