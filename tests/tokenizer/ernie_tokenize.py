"""A client for `ernie tokenize` (JSON lines on stdin/stdout), shared by the comparison tests."""
import json
import subprocess


class Ernie:
    def __init__(self, binary, model):
        self.p = subprocess.Popen([binary, "tokenize", "--model", model], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, encoding="utf-8")

    def ask(self, check=True, **req):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        out = json.loads(self.p.stdout.readline())
        if check and "error" in out:
            raise RuntimeError(out["error"])
        return out
