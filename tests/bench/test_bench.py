"""`ernie bench serve` against a scripted mock (every metric equals its known value), against
`ernie serve` (the block prints completely, token counts match), and with bad arguments."""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))
from conftest import ERNIE, Server, model_dir, server  # noqa: E402,F401  (fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = ["Successful requests:", "Failed requests:", "Benchmark duration (s):", "Total input tokens:",
          "Total generated tokens:", "Request throughput (req/s):", "Output token throughput (tok/s):",
          "Peak output token throughput (tok/s):", "Peak concurrent requests:", "Total token throughput (tok/s):",
          "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):", "Mean TPOT (ms):", "Median TPOT (ms):",
          "P99 TPOT (ms):", "Mean ITL (ms):", "Median ITL (ms):", "P99 ITL (ms):"]


def parse_block(out):
    assert "============ Serving Benchmark Result ============" in out, out
    values = {}
    for line in out.splitlines():
        m = re.match(r"^(.{1,40}?:)\s+(\S+)\s*$", line)
        if m:
            try:
                values[m.group(1)] = float(m.group(2))
            except ValueError:
                values[m.group(1)] = m.group(2)
    return values


@pytest.fixture(scope="module")
def mock():
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "mock_server.py"), "0.2", "0.05"], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    yield port
    p.kill()


@pytest.fixture
def recording_mock():
    """A fast mock that writes each request body it gets to a file: (port, path)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bodies.jsonl")
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "mock_server.py"), "0.01", "0.001", path],
                             stdout=subprocess.PIPE, text=True)
        port = int(p.stdout.readline())
        yield port, path
        p.kill()


def bodies(path):
    return [json.loads(line) for line in open(path)]


def bench(port, *args, tokenizer=None):
    cmd = [ERNIE, "bench", "serve", "--port", str(port), "--disable-tqdm", *args]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_metrics_equal_known_values(mock, model_dir):
    with tempfile.TemporaryDirectory() as out_dir:
        r = bench(mock, "--random-input-len", "50", "--random-output-len", "5", "--num-prompts", "8",
                  "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                  "--save-result", "--save-detailed", "--result-dir", out_dir, "--result-filename", "r.json",
                  "--metadata", "run=mock", tokenizer=model_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        v = parse_block(r.stdout)
        result = json.load(open(os.path.join(out_dir, "r.json")))
    tol = 25.0  # ms of scheduling noise on a busy two-core machine
    assert v["Successful requests:"] == 8 and v["Failed requests:"] == 0
    assert v["Total input tokens:"] == 8 * 123       # from usage.prompt_tokens
    assert v["Total generated tokens:"] == 8 * 5      # from usage.completion_tokens
    assert abs(v["Mean TTFT (ms):"] - 200) < tol and abs(v["P99 TTFT (ms):"] - 200) < tol
    assert abs(v["Mean ITL (ms):"] - 50) < tol and abs(v["Median ITL (ms):"] - 50) < tol
    assert abs(v["Mean TPOT (ms):"] - 50) < tol      # (E2EL - TTFT) / (5 - 1)
    assert abs(v["Mean E2EL (ms):"] - 400) < 2 * tol  # 200 + 4 x 50
    assert abs(v["Benchmark duration (s):"] - 0.4) < 0.1  # rate inf: all at once
    assert abs(result["request_throughput"] * result["duration"] - 8) < 1e-9
    assert v["Peak concurrent requests:"] == 8 and result["max_concurrent_requests"] == 8
    assert result["run"] == "mock" and result["completed"] == 8 and len(result["itls"]) == 8
    assert all(len(itl) == 4 for itl in result["itls"])
    assert abs(result["p50_ttft_ms"] - 200) < tol
    # Chat backend, concurrency limit, a Poisson arrival rate and goodput.
    r = bench(mock, "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--random-input-len", "20",
              "--random-output-len", "3", "--num-prompts", "6", "--max-concurrency", "2", "--request-rate", "50",
              "--goodput", "ttft:500", "tpot:10", tokenizer=model_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    v = parse_block(r.stdout)
    assert v["Maximum request concurrency:"] == 2
    assert v["Request goodput (req/s):"] == 0  # every TPOT is ~50 ms > 10 ms
    assert v["Total generated tokens:"] == 18
    # Three rounds of two at 300 ms each.
    assert v["Benchmark duration (s):"] > 0.8


def test_requests_carry_sampling_parameters(recording_mock, model_dir):
    """As vllm bench serve: greedy (temperature 0) unless told, ignore_eos with the random
    dataset, the sampling options as given, --extra-body merged over them."""
    port, path = recording_mock
    r = bench(port, "--random-input-len", "10", "--random-output-len", "2", "--num-prompts", "3", tokenizer=model_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    sent = [b for b in bodies(path) if "prompt" in b]
    assert len(sent) == 4  # the initial test run, then the three prompts
    for b in sent:
        assert b["temperature"] == 0.0 and b["ignore_eos"] is True and b["max_tokens"] == 2
        assert b["repetition_penalty"] == 1.0 and b["stream"] is True
        assert "top_p" not in b and "top_k" not in b and "min_p" not in b
    open(path, "w").close()
    r = bench(port, "--random-input-len", "10", "--random-output-len", "2", "--num-prompts", "2",
              "--temperature", "0.7", "--top-p", "0.8", "--top-k", "20", "--min-p", "0.05",
              "--frequency-penalty", "0.5", "--presence-penalty", "0.25", "--repetition-penalty", "1.1",
              "--extra-body", '{"top_k": 5, "seed": 7}', tokenizer=model_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    sent = [b for b in bodies(path) if "prompt" in b]
    assert len(sent) == 3
    for b in sent:
        assert b["temperature"] == 0.7 and b["top_p"] == 0.8 and b["min_p"] == 0.05
        assert b["top_k"] == 5 and b["seed"] == 7  # --extra-body wins
        assert b["frequency_penalty"] == 0.5 and b["presence_penalty"] == 0.25
        assert b["repetition_penalty"] == 1.1
    open(path, "w").close()
    r = bench(port, "--backend", "openai-chat", "--random-input-len", "10", "--random-output-len", "2",
              "--num-prompts", "1", "--temperature", "1", tokenizer=model_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    sent = [b for b in bodies(path) if "messages" in b]
    assert len(sent) == 2
    for b in sent:
        assert b["temperature"] == 1.0 and b["max_completion_tokens"] == 2 and "repetition_penalty" not in b


def vllm_sharegpt(data, tok, num, seed, output_len=None, disable_shuffle=False, no_oversample=False):
    """vLLM's ShareGPTDataset.load_data and sample (with its is_valid_sequence defaults and
    maybe_oversample_requests), written out here with Python's own random module."""
    import random
    data = [e for e in data if "conversations" in e and len(e["conversations"]) >= 2]
    random.seed(seed)
    if not disable_shuffle:
        random.shuffle(data)
    samples = []
    for e in data:
        if len(samples) >= num:
            break
        prompt, completion = e["conversations"][0]["value"], e["conversations"][1]["value"]
        prompt_len = len(tok(prompt).input_ids)
        out_len = len(tok(completion).input_ids) if output_len is None else output_len
        if (prompt_len < 4 or (output_len is None and out_len < 4) or prompt_len > 1024
                or prompt_len + out_len > 2048):
            continue
        samples.append((prompt, out_len))
    if not no_oversample and len(samples) < num:
        random.seed(seed)
        samples += [random.choice(samples) for _ in range(num - len(samples))]
    return samples


def test_file_datasets_sample_as_vllm(recording_mock, model_dir):
    """The sharegpt and custom datasets give the requests vLLM's code gives for the same file and
    seed: the same prompts in the same order (Python's random, reproduced), the same lengths."""
    import random
    from collections import Counter
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    port, path = recording_mock
    words = ["alpha", "beta", "gamma", "delta", "模型", "数据", "engine", "token", "serve", "cache", "42", "!"]
    rng = random.Random(1)

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))
    data = [{"conversations": [{"from": "human", "value": text(rng.choice([1, 2, 5, 20, 80, 700]))},
                               {"from": "gpt", "value": text(rng.choice([1, 3, 30, 200, 1500]))}]}
            for _ in range(40)]
    data += [{"conversations": [{"from": "human", "value": "one turn only"}]}, {"id": "no conversations"}]
    rng.shuffle(data)

    def sent_requests(n_expected):
        got = [b for b in bodies(path) if "prompt" in b]
        assert len(got) == n_expected + 1, len(got)  # the initial test run first
        open(path, "w").close()
        return got[0], Counter((b["prompt"], b["max_tokens"]) for b in got[1:])

    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "sharegpt.json")
        json.dump(data, open(f, "w"), ensure_ascii=False)
        for extra, kw in [([], {}), (["--seed", "5", "--sharegpt-output-len", "7"], {"seed": 5, "output_len": 7}),
                          (["--disable-shuffle"], {"disable_shuffle": True})]:
            want = vllm_sharegpt(data, tok, 30, kw.pop("seed", 0), **kw)
            assert len(want) == 30 and len(set(want)) < 30  # too few usable: topped up by choice
            r = bench(port, "--dataset-name", "sharegpt", "--dataset-path", f, "--num-prompts", "30", *extra,
                      tokenizer=model_dir)
            assert r.returncode == 0, r.stdout + r.stderr
            first, got = sent_requests(30)
            assert (first["prompt"], first["max_tokens"]) == want[0]
            assert got == Counter(want), extra
            assert all("ignore_eos" not in b or b["ignore_eos"] is False for b in [first])
        r = bench(port, "--dataset-name", "sharegpt", "--dataset-path", f, "--num-prompts", "30", "--no-oversample",
                  tokenizer=model_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        want = vllm_sharegpt(data, tok, 30, 0, no_oversample=True)
        assert sent_requests(len(want))[1] == Counter(want)
        # custom: JSON lines, each prompt through the chat template unless skipped.
        f = os.path.join(d, "custom.jsonl")
        lines = [{"prompt": text(rng.choice([3, 9, 40])), "output_tokens": i + 1} for i in range(12)]
        open(f, "w").write("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
        for extra, templated, lens in [([], True, None), (["--skip-chat-template", "--custom-output-len", "-1"],
                                                          False, "file"), (["--custom-output-len", "9"], True, 9)]:
            shuffled = list(lines)
            random.seed(0)
            random.shuffle(shuffled)
            want = Counter()
            for x in shuffled[:10]:
                p = (tok.apply_chat_template([{"role": "user", "content": x["prompt"]}], add_generation_prompt=True,
                                             tokenize=False) if templated else x["prompt"])
                want[(p, x["output_tokens"] if lens == "file" else (lens or 256))] += 1
            r = bench(port, "--dataset-name", "custom", "--dataset-path", f, "--num-prompts", "10", *extra,
                      tokenizer=model_dir)
            assert r.returncode == 0, r.stdout + r.stderr
            assert sent_requests(10)[1] == want, extra


def test_against_ernie_serve(server):
    r = bench(server.port, "--model", "ernie-tiny", "--random-input-len", "60", "--random-output-len", "12",
              "--num-prompts", "10", "--ignore-eos", "--request-rate", "100", "--burstiness", "0.5",
              "--percentile-metrics", "ttft,tpot,itl,e2el")
    assert r.returncode == 0, r.stdout + r.stderr
    v = parse_block(r.stdout)
    for label in LABELS + ["Request rate configured (RPS):", "Mean E2EL (ms):", "P99 E2EL (ms):"]:
        assert label in v, label
    assert v["Successful requests:"] == 10
    assert v["Total input tokens:"] == 10 * 60
    assert v["Total generated tokens:"] == 10 * 12


def test_waits_for_the_server_as_vllm_does(model_dir):
    """With --model given, a server that is not up yet is retried every 5 s (vLLM's ready check);
    the recipes' --trust-remote-code is accepted."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [ERNIE, "bench", "serve", "--port", str(port), "--disable-tqdm", "--model", "m", "--tokenizer", model_dir,
           "--random-input-len", "10", "--random-output-len", "2", "--num-prompts", "2", "--trust-remote-code"]
    start = time.time()
    bench_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2)
    mock = subprocess.Popen([sys.executable, os.path.join(HERE, "mock_server.py"), "0.01", "0.001", "", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        out, _ = bench_proc.communicate(timeout=60)
    finally:
        mock.kill()
    assert bench_proc.returncode == 0, out
    assert "Waiting for endpoint to become up in 600 seconds" in out and "Initial test run completed." in out
    assert time.time() - start >= 4.5  # one retry interval
    assert parse_block(out)["Successful requests:"] == 2
    r = bench(port, "--model", "m", "--ready-check-timeout-sec", "0", tokenizer=model_dir)
    assert r.returncode != 0 and "Skipping endpoint ready check." in r.stdout, r.stdout + r.stderr


def test_tokenizer_from_the_hugging_face_cache(recording_mock, model_dir):
    """--model as a Hugging Face id whose files are in the local cache: the tokenizer is read
    there (as vLLM's client loads it), not asked of the server."""
    import shutil
    port, path = recording_mock
    with tempfile.TemporaryDirectory() as cache:
        repo = os.path.join(cache, "models--acme--tiny")
        snap = os.path.join(repo, "snapshots", "abc123")
        os.makedirs(os.path.join(repo, "refs"))
        shutil.copytree(model_dir, snap, ignore=shutil.ignore_patterns("*.safetensors*"))
        open(os.path.join(repo, "refs", "main"), "w").write("abc123")
        r = subprocess.run([ERNIE, "bench", "serve", "--port", str(port), "--disable-tqdm", "--model", "acme/tiny",
                            "--random-input-len", "10", "--random-output-len", "2", "--num-prompts", "2"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "from the Hugging Face cache" in out and "no local tokenizer" not in out, out


def test_bad_arguments_are_refused(mock, model_dir):
    for args, want in [(["--dataset-name", "sharegpt"], "needs --dataset-path"),
                       (["--dataset-path", "x.json"], "Cannot use 'random' dataset with --dataset-path"),
                       (["--dataset-name", "sonnet"], "dataset-name"),
                       (["--dataset-name", "sharegpt", "--dataset-path", "/nonexistent.json"], "cannot read"),
                       (["--dataset-name", "custom", "--dataset-path", "x.json"], "Only JSONL"),
                       (["--dataset-name", "custom", "--dataset-path", "x.jsonl", "--custom-output-len", "0"],
                        "custom-output-len"),
                       (["--random-range-ratio", "1.5"], "range-ratio"),
                       (["--request-rate", "0"], "request-rate"), (["--goodput", "latency:5"], "goodput"),
                       (["--percentile-metrics", "ttft,xyz"], "xyz"), (["--metric-percentiles", "150"], "150"),
                       (["--burstiness", "-1"], "burstiness"), (["--num-prompts", "0"], "num-prompts"),
                       (["--extra-body", "[1, 2]"], "extra-body"), (["--extra-body", "{bad"], "extra-body"),
                       (["--temperature", "warm"], "temperature")]:
        r = bench(mock, *args, tokenizer=model_dir)
        assert r.returncode != 0 and want in (r.stdout + r.stderr), (args, r.stdout, r.stderr)
    r = subprocess.run([ERNIE, "bench", "serve", "--port", "9", "--disable-tqdm"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "refused" in (r.stdout + r.stderr).lower(), r.stderr
