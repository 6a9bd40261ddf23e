#!/usr/bin/env python3
"""Writes data/tokenizer_corpus.txt: the deterministic mixed-language text that
`ernie make-model` trains its small SentencePiece tokenizer on (English, Chinese, Japanese,
code, numbers, emoji, markup). Rerun only to change the corpus; the output is committed."""
import os
import random

rng = random.Random(20251125)

EN_SUBJ = ["the engine", "a request", "the scheduler", "every token", "the router", "our team",
           "the model", "a user", "the server", "this kernel", "the cache", "each expert",
           "the benchmark", "a client", "the tokenizer", "the GPU", "memory", "the batch"]
EN_VERB = ["serves", "measures", "routes", "streams", "reads", "writes", "schedules", "checks",
           "computes", "returns", "splits", "merges", "loads", "predicts", "samples", "caches"]
EN_OBJ = ["the prompt", "sixteen sequences", "every layer", "the logits", "a paged block",
          "the hidden state", "one thousand tokens", "the expert weights", "a JSON response",
          "the attention scores", "the next word", "its own output", "a long context",
          "the latency", "throughput numbers", "the first chunk"]
EN_TAIL = ["quickly", "exactly", "in order", "without waiting", "on the device", "again",
           "before the deadline", "with care", "at full bandwidth", "for the user", "today"]
ZH = ["模型", "专家", "注意力", "缓存", "服务", "请求", "调度", "推理", "速度", "内存", "文本", "语言",
      "百度", "文心", "大模型", "生成", "训练", "数据", "计算", "结果", "用户", "问题", "回答", "时间",
      "我们", "你好", "世界", "中国", "北京", "今天", "明天", "非常", "快速", "准确", "可以", "需要"]
ZH_PUNCT = ["，", "。", "！", "？", "：", "、"]
JA = ["こんにちは", "ありがとう", "東京", "言語", "モデル", "推論", "速い", "です", "ます", "トークン"]
CODE = [
    "def {f}(x, y):\n    return x * y + {n}\n",
    "for (int i = 0; i < {n}; ++i) {{ sum += a[i] * b[i]; }}\n",
    "if ({f} != nullptr && size > {n}) {{\n  return {f}->run();\n}}\n",
    "const auto {f} = std::make_unique<Engine>({n});\n",
    "{{\"model\": \"ernie\", \"max_tokens\": {n}, \"stream\": true}}\n",
    "curl -s http://localhost:8000/v1/completions -d '{{\"prompt\": \"{f}\"}}'\n",
    "import torch\nx = torch.randn({n}, {n})\nprint(x.sum())\n",
    "# {f}\n- item {n}\n- **bold** and `code`\n",
    "SELECT name, count(*) FROM requests WHERE id > {n} GROUP BY name;\n",
]
NAMES = ["forward", "route_token", "sample", "decode", "encode", "schedule", "prefill", "engine",
         "attention", "rms_norm", "gemm", "softmax", "tokenizer", "kv_cache", "block_table"]
EMOJI = ["😀", "🚀", "👍", "🎉", "🔥", "❤️", "✅", "🤖", "📈", "🌏"]


def english():
    s = f"{rng.choice(EN_SUBJ)} {rng.choice(EN_VERB)} {rng.choice(EN_OBJ)} {rng.choice(EN_TAIL)}"
    s = s[0].upper() + s[1:]
    return s + rng.choice([".", ".", ".", "!", "?", ";"])


def chinese():
    return "".join(rng.choice(ZH) for _ in range(rng.randint(3, 9))) + rng.choice(ZH_PUNCT)


def line():
    kind = rng.random()
    if kind < 0.45:
        return " ".join(english() for _ in range(rng.randint(1, 4)))
    if kind < 0.65:
        return "".join(chinese() for _ in range(rng.randint(1, 4)))
    if kind < 0.72:
        return "".join(rng.choice(JA) for _ in range(rng.randint(2, 6))) + "。"
    if kind < 0.87:
        return rng.choice(CODE).format(f=rng.choice(NAMES), n=rng.randint(0, 99999)).rstrip("\n")
    if kind < 0.95:
        return f"{rng.randint(1, 31)}/{rng.randint(1, 12)}/{rng.randint(1990, 2030)} " \
               f"{rng.randint(0, 10**6)} {rng.random():.4f} {english()} {rng.choice(EMOJI)}"
    return f"{english()} {chinese()} {rng.choice(EMOJI)}{rng.choice(EMOJI)}"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "..", "data", "tokenizer_corpus.txt")
    lines = [line() for _ in range(2500)]
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
