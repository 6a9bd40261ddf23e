"""The server through the official openai SDK and raw HTTP, as a vLLM client would use it."""
import json
import os
import socket
import threading
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import Server


def metric(server, name):
    text = httpx.get(server.url + "/metrics").text
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + ("" if name.endswith('"') else "{")) or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} missing from /metrics"
    return total


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["ernie-tiny"]
    assert models.data[0].max_model_len == 512
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ping").status_code == 200 and httpx.post(server.url + "/ping").status_code == 200
    assert "version" in httpx.get(server.url + "/version").json()


def test_completion_and_usage(client):
    r = client.completions.create(model="ernie-tiny", prompt="The engine", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 7 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.completions.create(model="ernie-tiny", prompt="The engine", max_tokens=7, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_chat_and_streaming(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    full = client.chat.completions.create(model="ernie-tiny", messages=msgs, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="ernie-tiny", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == full.choices[0].message.content
    assert usage.completion_tokens == full.usage.completion_tokens == 12
    assert finish == "length"
    # Completions streaming too.
    chunks = list(client.completions.create(model="ernie-tiny", prompt=[1, 2, 3], max_tokens=5, stream=True,
                                            temperature=0, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_n_seed_and_stop(client):
    r = client.completions.create(model="ernie-tiny", prompt="abc", max_tokens=4, logprobs=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) >= 3 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    c = client.chat.completions.create(model="ernie-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       logprobs=True, top_logprobs=2, temperature=0, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    n = client.completions.create(model="ernie-tiny", prompt="x", max_tokens=6, n=3, temperature=1.0, seed=11,
                                  extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in n.choices) == [0, 1, 2]
    n2 = client.completions.create(model="ernie-tiny", prompt="x", max_tokens=6, n=3, temperature=1.0, seed=11,
                                   extra_body={"ignore_eos": True})
    assert [ch.text for ch in n.choices] == [ch.text for ch in n2.choices]
    # A stop string taken from a greedy output ends generation before it.
    full = client.completions.create(model="ernie-tiny", prompt="stop test", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    r = client.completions.create(model="ernie-tiny", prompt="stop test", max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.find(stop)]
    echo = client.completions.create(model="ernie-tiny", prompt="echo me", max_tokens=2, echo=True, temperature=0)
    assert echo.choices[0].text.startswith("echo me")


def test_prompt_logprobs_and_echo(server, client):
    url = server.url + "/v1/completions"
    base = {"model": "ernie-tiny", "temperature": 0, "ignore_eos": True}
    prompt = "The quick brown fox"
    gen = httpx.post(url, json={**base, "prompt": prompt, "max_tokens": 3, "logprobs": 2}).json()
    gen_lp = gen["choices"][0]["logprobs"]
    n_prompt = gen["usage"]["prompt_tokens"]
    # echo + logprobs: the prompt's tokens then the output's, the first without a logprob.
    r = httpx.post(url, json={**base, "prompt": prompt, "max_tokens": 3, "logprobs": 2, "echo": True}).json()
    ch = r["choices"][0]
    lp = ch["logprobs"]
    assert ch["text"] == prompt + gen["choices"][0]["text"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"][1:])
    assert lp["token_logprobs"][n_prompt:] == gen_lp["token_logprobs"]
    assert lp["text_offset"][0] == 0
    for i in range(1, len(lp["tokens"])):
        assert lp["text_offset"][i] == lp["text_offset"][i - 1] + len(lp["tokens"][i - 1])
    # vLLM's prompt_logprobs field: null, then {id: {logprob, rank, decoded_token}}, own token first.
    pl = ch["prompt_logprobs"]
    assert len(pl) == n_prompt and pl[0] is None
    for i, entry in enumerate(pl[1:], start=1):
        own_id, own = next(iter(entry.items()))
        assert own["logprob"] == lp["token_logprobs"][i] and own["decoded_token"] == lp["tokens"][i]
        others = sorted(v["rank"] for k, v in entry.items() if k != own_id)
        if len(entry) == 3:  # the prompt's token outside the top 2
            assert others == [1, 2] and own["rank"] >= 3
        else:
            assert len(entry) == 2 and sorted(others + [own["rank"]]) == [1, 2]
    # max_tokens 0 with echo: the prompt alone comes back, scored (one token is drawn, unsent).
    only = httpx.post(url, json={**base, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    och = only["choices"][0]
    assert och["text"] == prompt and och["finish_reason"] == "length"
    assert only["usage"]["completion_tokens"] == 1
    assert och["logprobs"]["tokens"] == lp["tokens"][:n_prompt]
    for a, b in zip(och["logprobs"]["token_logprobs"][1:], lp["token_logprobs"][1:n_prompt]):
        assert abs(a - b) < 1e-5
    only = httpx.post(url, json={**base, "prompt": prompt, "max_tokens": 0, "echo": True}).json()
    assert only["choices"][0]["text"] == prompt and only["choices"][0]["prompt_logprobs"] is None
    # Streaming: the echo with its logprobs comes with the first output; the same in all.
    for n in (1, 2):
        body = {**base, "prompt": prompt, "max_tokens": 3, "logprobs": 2, "echo": True, "n": n}
        whole = httpx.post(url, json=body).json()
        got = {}
        with httpx.stream("POST", url, json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for c in json.loads(line[6:])["choices"]:
                    g = got.setdefault(c["index"], {"text": "", "tokens": [], "lps": []})
                    g["text"] += c["text"]
                    if c["logprobs"]:
                        g["tokens"] += c["logprobs"]["tokens"]
                        g["lps"] += c["logprobs"]["token_logprobs"]
        assert sorted(got) == list(range(n))
        for c in whole["choices"]:
            g = got[c["index"]]
            assert g["text"] == c["text"] and g["tokens"] == c["logprobs"]["tokens"]
            assert g["lps"] == c["logprobs"]["token_logprobs"]
            assert c["prompt_logprobs"] == whole["choices"][0]["prompt_logprobs"]
    # Chat: the prompt's logprobs at the response's top level.
    chat = httpx.post(server.url + "/v1/chat/completions",
                      json={**base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                            "prompt_logprobs": 1}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    plain = client.completions.create(model="ernie-tiny", prompt="x", max_tokens=1)
    assert plain.choices[0].model_extra.get("prompt_logprobs") is None
    # Refused as vLLM refuses them.
    for extra, words in [({"prompt_logprobs": 1, "stream": True}, "not available when `stream=True`"),
                         ({"prompt_logprobs": -2}, "must be a positive value or -1"),
                         ({"prompt_logprobs": 21}, "Requested prompt logprobs of 21"),
                         ({"prompt_logprobs": -1}, "which is greater than max allowed: 20"),
                         ({"max_tokens": 0}, "max_tokens")]:
        r = httpx.post(url, json={**base, "prompt": prompt, "max_tokens": 2, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert words in r.json()["error"]["message"], (extra, r.text)


def test_truncation_token_ids_and_unbuilt_fields(server, client):
    r = client.completions.create(model="ernie-tiny", prompt="one two three four five six", max_tokens=2,
                                  temperature=0, extra_body={"truncate_prompt_tokens": 3, "ignore_eos": True})
    assert r.usage.prompt_tokens == 3
    e = client.completions.create(model="ernie-tiny", prompt="one two three four five six", max_tokens=2,
                                  temperature=0, echo=True, extra_body={"truncate_prompt_tokens": 3})
    tail = httpx.post(server.url + "/tokenize", json={"prompt": "one two three four five six"}).json()["tokens"][-3:]
    assert e.choices[0].text.startswith(httpx.post(server.url + "/detokenize", json={"tokens": tail}).json()["prompt"])
    c = client.chat.completions.create(model="ernie-tiny", messages=[{"role": "user", "content": "hello there"}],
                                       max_tokens=1, extra_body={"truncate_prompt_tokens": 2})
    assert c.usage.prompt_tokens == 2
    ids = client.completions.create(model="ernie-tiny", prompt="abc", max_tokens=2, logprobs=1, temperature=0,
                                    extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    assert all(t.startswith("token_id:") for t in ids.choices[0].logprobs.tokens)
    assert all(k.startswith("token_id:") for d in ids.choices[0].logprobs.top_logprobs for k in d)
    # What is not built is refused, never ignored; what needs nothing is served.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "user", "content": "hi"}]
    chat_url = server.url + "/v1/chat/completions"
    ok = httpx.post(chat_url, json={"messages": msgs, "max_tokens": 1, "tools": tools, "tool_choice": "none",
                                    "response_format": {"type": "text"}})
    assert ok.status_code == 200, ok.text
    assert httpx.post(server.url + "/tokenize", json={"messages": msgs, "tools": tools}).status_code == 200
    for url, extra, words in [
            (chat_url, {"tools": tools}, '"auto" tool choice requires --enable-auto-tool-choice'),
            (chat_url, {"tools": tools, "tool_choice": "required"}, "not built yet"),
            (chat_url, {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}},
             "not built yet"),
            (chat_url, {"response_format": {"type": "json_object"}}, "structured outputs"),
            (chat_url, {"guided_choice": ["a", "b"]}, "structured outputs"),
            (server.url + "/v1/completions", {"response_format": {"type": "json_schema"}}, "structured outputs"),
            (server.url + "/v1/completions", {"use_beam_search": True}, "Beam search"),
            (server.url + "/v1/completions", {"priority": 3}, "Priority scheduling is not enabled"),
            (server.url + "/v1/completions", {"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
            (server.url + "/v1/completions", {"truncate_prompt_tokens": 100000}, "greater than max_model_len"),
            (server.url + "/v1/completions", {"truncate_prompt_tokens": -5}, "truncate_prompt_tokens")]:
        body = {"messages": msgs} if url == chat_url else {"prompt": "x"}
        r = httpx.post(url, json={**body, "max_tokens": 1, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert words in r.json()["error"]["message"], (extra, r.text)


def test_chat_echo_continues_the_assistant(client):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello th"}]
    extra = {"add_generation_prompt": False, "continue_final_message": True, "ignore_eos": True}
    kw = dict(model="ernie-tiny", messages=msgs, max_tokens=4, temperature=0)
    full = client.chat.completions.create(**kw, extra_body={**extra, "echo": True}).choices[0].message.content
    plain = client.chat.completions.create(**kw, extra_body=extra).choices[0].message.content
    assert full == "Hello th" + plain
    stream = client.chat.completions.create(**kw, stream=True, extra_body={**extra, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full
    # The last message is the user's: nothing to echo.
    kw["messages"] = msgs[:1]
    assert (client.chat.completions.create(**kw, extra_body={"echo": True, "ignore_eos": True}).choices[0].message.content
            == client.chat.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].message.content)


def test_return_token_ids(server):
    """vLLM's return_token_ids: the prompt's ids and the output's beside the text (streamed: the
    prompt's in the first chunk, each chunk's new ids)."""
    url = server.url + "/v1/completions"
    body = {"model": "ernie-tiny", "prompt": "token ids please", "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "token ids please"}).json()["tokens"]
    r = httpx.post(url, json=body).json()
    ch = r["choices"][0]
    assert ch["prompt_token_ids"] == ids and len(ch["token_ids"]) == 5
    assert httpx.post(server.url + "/detokenize", json={"tokens": ch["token_ids"]}).json()["prompt"] == ch["text"]
    got_prompt, got_ids = None, []
    with httpx.stream("POST", url, json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    if c.get("prompt_token_ids") is not None:
                        assert got_prompt is None
                        got_prompt = c["prompt_token_ids"]
                    got_ids += c["token_ids"]
    assert got_prompt == ids and got_ids == ch["token_ids"]
    plain = httpx.post(url, json={**body, "return_token_ids": False}).json()["choices"][0]
    assert plain["token_ids"] is None and plain["prompt_token_ids"] is None
    chat = httpx.post(server.url + "/v1/chat/completions",
                      json={"model": "ernie-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                            "temperature": 0, "ignore_eos": True, "return_token_ids": True}).json()
    assert len(chat["prompt_token_ids"]) == chat["usage"]["prompt_tokens"]
    assert len(chat["choices"][0]["token_ids"]) == 3


def test_prompt_tokens_details(model_dir, server):
    """--enable-prompt-tokens-details: usage names the prompt's tokens found in the prefix cache."""
    prompt = list(range(10, 110))  # 100 tokens: six full blocks of 16
    body = {"model": "ernie-tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    s = Server(model_dir, "--enable-prompt-tokens-details")
    try:
        first = httpx.post(s.url + "/v1/completions", json=body).json()["usage"]
        second = httpx.post(s.url + "/v1/completions", json=body).json()["usage"]
        chunks = [json.loads(line[6:]) for line in httpx.post(
            s.url + "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        ).text.splitlines() if line.startswith("data: {")]
    finally:
        s.stop()
    assert first["prompt_tokens_details"] is None  # nothing cached yet
    assert second["prompt_tokens_details"] == {"cached_tokens": 96}
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 96}
    httpx.post(server.url + "/v1/completions", json=body)  # cached there too, but not reported
    assert httpx.post(server.url + "/v1/completions", json=body).json()["usage"]["prompt_tokens_details"] is None


def test_tokenize_detokenize(server):
    t = httpx.post(server.url + "/tokenize", json={"prompt": "hello 世界"}).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 512
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == "hello 世界"
    m = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert m["count"] > t["count"] - 10


def test_errors_have_vllm_shape(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert "does not exist" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ernie-tiny", prompt="x", max_tokens=1, temperature=-1)
    assert e.value.body["param"] == "temperature" if isinstance(e.value.body, dict) and "param" in e.value.body else True
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ernie-tiny", prompt="x", max_tokens=100000)
    assert "maximum context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="ernie-tiny", prompt=[5] * 600, max_tokens=1)
    bad = [
        b"{not json", b"\xff\xfe{}", b"[]", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": "ten"}',
        b'{"prompt": "x", "n": 100000}', b'{"prompt": "x", "max_tokens": -3}', b'{"prompt": "x", "top_p": 0}',
        b'{"prompt": "x", "logprobs": 1000}', b'{"prompt": "x", "stop": [1]}', b'{"prompt": "x", "logit_bias": {"abc": 1}}',
        b'{"prompt": [[]]}', b'{"prompt": [-1]}', b'{"prompt": "x", "stream_options": {"include_usage": true}}',
    ]
    for body in bad:
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400 and err["type"] == "BadRequestError"
    chat_bad = [b'{"messages": []}', b'{"messages": [{"content": "no role"}]}',
                b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
                b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
                b'{"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}']
    for body in chat_bad:
        r = httpx.post(server.url + "/v1/chat/completions", content=body)
        assert r.status_code == 400, (body, r.text)
    assert httpx.get(server.url + "/nope").status_code == 404
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    big = b'{"prompt": "' + b"a" * (65 << 20) + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=big, timeout=60)
    assert r.status_code == 413


def test_abort_mid_stream_frees_blocks(server):
    body = {"model": "ernie-tiny", "prompt": "long", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break
    # The connection is closed: the request must be aborted and its blocks freed.
    deadline = time.time() + 20
    while time.time() < deadline:
        if metric(server, "vllm:num_requests_running") == 0 and metric(server, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.1)
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, "vllm:kv_cache_usage_perc") == 0
    assert metric(server, "vllm:request_success_total") > 0


def test_client_gone_before_a_non_streaming_answer_is_aborted(server):
    before = metric(server, 'vllm:request_success_total{model_name="ernie-tiny",finished_reason="abort"')
    body = json.dumps({"prompt": "bye", "max_tokens": 480, "n": 64, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    # Hang up as soon as it runs (a GPU finishes the whole request in a fraction of a second).
    deadline = time.time() + 10
    while time.time() < deadline and metric(server, "vllm:num_requests_running") == 0:
        time.sleep(0.005)
    s.close()
    deadline = time.time() + 20
    while time.time() < deadline and metric(server, "vllm:num_requests_running") > 0:
        time.sleep(0.1)
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, 'vllm:request_success_total{model_name="ernie-tiny",finished_reason="abort"') > before


def test_slow_and_broken_clients_do_not_block_others(server, client):
    # A client that sends half a request and stalls, and one that sends garbage.
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    garbage = socket.create_connection(("127.0.0.1", server.port))
    garbage.sendall(b"\x00\x01\x02 not http at all\r\n\r\n")
    r = client.completions.create(model="ernie-tiny", prompt="still here?", max_tokens=3)
    assert r.choices[0].text is not None
    garbage.settimeout(5)
    assert garbage.recv(100).startswith(b"HTTP/1.1 400")
    stalled.close()
    garbage.close()


def test_metrics_counters(server, client):
    before = metric(server, "vllm:generation_tokens_total")
    client.completions.create(model="ernie-tiny", prompt="count me", max_tokens=5, extra_body={"ignore_eos": True})
    assert metric(server, "vllm:generation_tokens_total") >= before + 5
    for name in ["vllm:num_requests_waiting", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:prompt_tokens_total", "vllm:time_to_first_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:inter_token_latency_seconds_count"]:
        metric(server, name)


def test_200_concurrent_streams(server):
    def one(i):
        body = {"model": "ernie-tiny", "prompt": f"client {i}", "max_tokens": 16, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        usage, done = None, False
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    usage = data.get("usage") or usage
        return done, usage["completion_tokens"] if usage else None

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    assert all(done for done, _ in results)
    bad = [(i, n) for i, (_, n) in enumerate(results) if n != 16]
    assert not bad, (bad[:10], server.output()[-4000:])


def test_api_key_and_shutdown(model_dir):
    s = Server(model_dir, "--api-key", "sekret")
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models").json() == {"error": "Unauthorized"}
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
        # SIGTERM while a stream is running: the stream ends, the process exits cleanly.
        body = {"prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30,
                          headers={"Authorization": "Bearer sekret"}) as r:
            it = r.iter_lines()
            next(it)
            s.proc.terminate()
            for _ in it:
                pass
        assert s.proc.wait(timeout=20) == 0
    finally:
        s.stop()


def test_dummy_weights_serve(model_dir):
    """--load-format dummy: random weights of the model's shapes, nothing read from the checkpoint."""
    import httpx
    from conftest import Server
    s = Server(model_dir, "--load-format", "dummy")
    try:
        r = httpx.post(s.url + "/v1/completions", json={"model": "ernie-tiny", "prompt": [5, 6, 7],
                                                         "max_tokens": 8, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        assert "dummy" in s.output()
    finally:
        s.stop()


def test_generation_config_gives_request_defaults(model_dir):
    """As vLLM's --generation-config auto: the model's generation_config.json values that differ
    from transformers' defaults fill the sampling fields a request leaves unset, max_new_tokens
    caps max_tokens; `vllm` ignores the file; --override-generation-config goes on top."""
    import shutil
    with tempfile.TemporaryDirectory() as d:
        model = os.path.join(d, "m")
        shutil.copytree(model_dir, model)
        path = os.path.join(model, "generation_config.json")
        gen = json.load(open(path))
        gen.update({"top_k": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 5})  # top_k 1: greedy
        json.dump(gen, open(path, "w"))
        body = {"model": "ernie-tiny", "prompt": "The engine serves", "max_tokens": 12, "seed": 3,
                "temperature": 0.9, "ignore_eos": True}
        chat = {"model": "ernie-tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True,
                "temperature": 0.9, "seed": 3}
        outs = {}
        for name, args in [("auto", []), ("vllm", ["--generation-config", "vllm"]),
                           ("override", ["--override-generation-config", '{"max_new_tokens": 2, "top_k": 50}'])]:
            s = Server(model, *args)
            try:
                r = httpx.post(s.url + "/v1/completions", json=body).json()
                greedy = httpx.post(s.url + "/v1/completions", json={**body, "temperature": 0}).json()
                c = httpx.post(s.url + "/v1/chat/completions", json=chat).json()
                outs[name] = (r, greedy, c, s.output())
            finally:
                s.stop()
        r, greedy, c, log = outs["auto"]
        assert r["usage"]["completion_tokens"] == 5 and c["usage"]["completion_tokens"] == 5
        assert "generation config" in log and "--generation-config vllm" in log
        # top_k 1 from the file: the seeded draw at temperature 0.9 is the greedy token each time
        # (the file's temperature 1.0 and top_p 1.0 are transformers' defaults: not taken).
        assert r["choices"][0]["text"] == greedy["choices"][0]["text"]
        r, greedy, c, log = outs["vllm"]
        assert r["usage"]["completion_tokens"] == 12 and c["usage"]["completion_tokens"] > 5
        assert "generation config" not in log
        assert r["choices"][0]["text"] != greedy["choices"][0]["text"]  # without top_k 1: a real draw
        r, greedy, c, log = outs["override"]
        assert r["usage"]["completion_tokens"] == 2 and c["usage"]["completion_tokens"] == 2
        assert '"top_k":50' in log  # an override is taken even at transformers' default value


def test_refuses_unbuilt_features_and_bad_flags(model_dir):
    import subprocess
    from conftest import ERNIE
    for args, want in [(["--tensor-parallel-size", "2"], "not built"), (["--quantization", "fp8"], "not built"),
                       (["--quantization", "awq"], "not supported"), (["--speculative-config", "{"], "JSON"),
                       (["--device", "tpu"], "--device"), (["--port", "99999"], "99999"),
                       (["--gpu-memory-utilization", "1.5"], "gpu-memory-utilization"),
                       (["--max-num-seqs", "0"], "max-num-seqs"),
                       (["--override-generation-config", "[1]"], "JSON object"),
                       (["--override-generation-config", '{"temperature": -1}'], "temperature"),
                       (["--generation-config", "/no/such/folder"], "not a directory"),
                       (["--cpu-offload-gb", "50"], "not built"), (["--pipeline-parallel-size", "2"], "not built"),
                       (["--kv-cache-dtype", "fp8"], "not built"),
                       (["--enable-auto-tool-choice", "--tool-call-parser", "ernie45"], "not built"),
                       (["--reasoning-parser", "ernie45"], "not built")]:
        r = subprocess.run([ERNIE, "serve", model_dir, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and want in (r.stdout + r.stderr), (args, r.stdout, r.stderr)
    if not os.path.exists("/dev/nvidiactl"):  # no GPU: --device cuda must say so and stop
        r = subprocess.run([ERNIE, "serve", model_dir, "--device", "cuda"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode != 0 and "CUDA" in r.stderr, r.stderr
    r = subprocess.run([ERNIE, "serve", "not/a-model-anywhere"], capture_output=True, text=True, timeout=60,
                       env={"HF_HUB_OFFLINE": "1", "HOME": "/tmp", "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "not in the Hugging Face cache" in r.stderr
