"""schemathesis fuzzes every endpoint of /openapi.json for a bounded time: no request may crash
the server or get a 5xx, and the server keeps answering afterwards."""
import os
import subprocess
import sys

import httpx


def test_schemathesis_finds_no_server_errors(server):
    exe = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    r = subprocess.run(
        [exe, "run", server.url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "40",
         "--request-timeout", "300", "--generation-deterministic", "--phases", "examples,coverage,fuzzing",
         "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=900)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.proc.poll() is None
