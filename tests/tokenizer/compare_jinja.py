#!/usr/bin/env python3
"""Our chat-template renderer against jinja2 as transformers configures it
(transformers.utils.chat_template_utils): real chat templates (tests/data/chat_templates) on
system, multi-turn and tool conversations, and feature snippets covering the Jinja subset.
Both must produce the same text, or both must fail.
Usage: compare_jinja.py --ernie build/ernie"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from ernie_tokenize import Ernie

try:
    from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template
except ImportError:
    print("SKIP: transformers/jinja2 are not installed (scripts/setup-python.sh installs them)")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "..", "data", "chat_templates")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather for a city.  ",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. \"北京\""},
            "unit": {"type": "string", "enum": ["c", "f"], "description": "Unit"},
            "days": {"type": "integer", "description": "Forecast days"},
            "hourly": {"type": ["boolean", "null"], "description": "Hourly?"},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "Tags"},
            "extra": {"type": "object", "additionalProperties": {"type": "number"}, "description": "x"}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "noop", "description": "Does nothing.",
        "parameters": {"type": "object", "properties": {}}}},
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "multi": [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? \"quoted\" \\ back\\slash"},
    ],
    "unicode": [
        {"role": "user", "content": "你好，世界 😀 — ünïcödé\ttab\nnewline"},
        {"role": "assistant", "content": "こんにちは"},
        {"role": "user", "content": "<|begin_of_sentence|> special-looking text </s>"},
    ],
    "tools": [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Beijing", "unit": "c", "days": 3, "ratio": 0.5,
                                                 "flags": [True, False, None]}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21.5}"},
        {"role": "user", "content": "Thanks"},
    ],
    "two_tool_calls": [
        {"role": "user", "content": "Two things"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "noop", "arguments": {}}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "X"}}}]},
    ],
    "empty": [],
}

# Feature snippets: (template, context).
CTX = {"xs": [3, 1, 2], "s": "  Hello World  ", "d": {"b": 2, "a": 1}, "n": None, "f": 2.5,
       "users": [{"name": "ann", "age": 31}, {"name": "bob", "age": 25}, {"name": "cy"}],
       "nested": {"k": [1, {"z": "deep"}]}, "big": 12345678901234, "t": True, "e": ""}
SNIPPETS = [
    "{{ xs|length }} {{ s|trim }} {{ s|lower }} {{ s|upper }} {{ s|title }}",
    "{% for x in xs %}{{ loop.index }}:{{ x }}{% if not loop.last %},{% endif %}{% endfor %}",
    "{% for x in xs|sort %}{{ x }}{% endfor %}|{% for x in xs|sort(reverse=true) %}{{ x }}{% endfor %}",
    "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}",
    "{% for k, v in d|dictsort %}{{ k }}{{ v }}{% endfor %}",
    "{{ d|tojson }} {{ xs|tojson }} {{ nested|tojson(indent=2) }} {{ 'a\"b\\\\c\\n'|tojson }}",
    "{{ {'x': 1.0, 'y': 1e-7, 'z': 123456789.125, 'w': 1e20, 'u': '中文'}|tojson }}",
    "{{ n }} {{ t }} {{ f }} {{ big }} {{ 7 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }}",
    "{{ 'abc'[1:] }} {{ 'abc'[::-1] }} {{ xs[-1] }} {{ xs[1:] }} {{ '中文字'[1] }}",
    "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}",
    "{{ 'Hello'.startswith('He') }} {{ 'Hello'.endswith('lo') }} {{ 'x-y'.replace('-', '+') }} {{ 'ab'.upper() }}",
    "{% set ns = namespace(c=0, items=[]) %}{% for x in xs %}{% set ns.c = ns.c + x %}{% endfor %}{{ ns.c }}",
    "{% set x = 1 %}{% for i in xs %}{% set x = i %}{% endfor %}{{ x }}",
    "{% if n is none %}none{% elif n %}t{% else %}f{% endif %} {{ n is not none }} {{ q is defined }} {{ xs is iterable }}",
    "{{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 'x' is string }} {{ d is mapping }} {{ f is number }}",
    "{{ users|map(attribute='name')|join(', ') }} {{ users|selectattr('age')|list|length }} {{ users|rejectattr('age')|map(attribute='name')|first }}",
    "{{ users|selectattr('name', 'equalto', 'bob')|map(attribute='age')|first }} {{ xs|select('odd')|list }} {{ xs|reject('odd')|list }}",
    "{{ q|default('dflt') }} {{ e|default('empty', true) }} {{ e|default('kept') }} {{ xs|first }} {{ xs|last }}",
    "{{ xs|max }} {{ xs|min }} {{ xs|sum }} {{ xs|reverse|list }} {{ [1,2,2,3,1]|unique|list }} {{ f|round }} {{ 2.567|round(2) }}",
    "{{ 'a' ~ 1 ~ none }} {{ 'ab' * 3 }} {{ [1] + [2] }} {{ 'x' if t else 'y' }} {{ 'x' if not t }}",
    "{{ 1 in xs }} {{ 5 not in xs }} {{ 'ell' in 'hello' }} {{ 'a' in d }} {{ not t and n or 'z' }}",
    "{%- for x in xs -%}\n  {{ x }}\n{%- endfor %}\n  <-lstrip\n{% if t %}\n    trim\n{% endif %}\nend",
    "{% macro greet(name, p='Hi') %}{{ p }} {{ name }}!{% endmacro %}{{ greet('a') }} {{ greet('b', p='Yo') }} {{ greet(name='c') }}",
    "{% for x in xs if x > 1 %}{{ loop.index }}/{{ loop.length }}:{{ x }} {% else %}none{% endfor %}",
    "{% for x in [] %}x{% else %}empty{% endfor %} {% for i in range(3) %}{{ i }}{% endfor %} {{ range(1, 10, 3)|list }}",
    "{% for x in xs %}{% if x == 1 %}{% continue %}{% endif %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}",
    "{% set block %}inner {{ xs|length }}{% endset %}[{{ block }}]",
    "{# comment #}a {#- trimmed -#} b\n{# line comment #}\nc",
    "{{ '%s' }} {{ \"it's\" }} {{ 'tab\\there' }} {{ '\\u00e9' }} {{ 'a' 'b' }}",
    "{{ xs|string }} {{ d|string }} {{ users[0] }} {{ [none, true, 1.5, 'q'] }}",
    "{{ nested.k[1].z }} {{ nested['k'][0] }} {{ d.get('a') }} {{ d.get('zz', 'no') }} {{ d.keys()|list }} {{ d.values()|list }}",
    "{{ s|replace('l', 'L') }} {{ s|wordcount }} {{ 'a b'|capitalize }} {{ 'x\ny'|indent(2) }} {{ 'x\ny'|indent(2, true) }}",
    "{{ '5'|int + 1 }} {{ '2.5'|float }} {{ 3|float }} {{ 'x'|int }} {{ -3|abs }} {{ users|map(attribute='age', default=0)|list }}",
    "{{ loop }}{% for a in [[1, 2], [3, 4]] %}{% for b in a %}{{ loop.index0 }}{{ b }}{% endfor %}|{% endfor %}",
    "{% for x in xs %}{{ loop.previtem }}-{{ loop.nextitem }}-{{ loop.cycle('a', 'b') }} {% endfor %}",
    "{{ raise_exception('boom ' ~ xs|length) }}",
    "{{ undefined_var.attr }}",
    "{% for x in 5 %}{% endfor %}",
    "{{ xs + 1 }}",
    "{% if %}",
    "{% for %}",
    "{{ 1 +* 2 }}",
    "{% endif %}",
    "{{ 'unterminated }}",
    "{% unknowntag %}",
    "text {% raw %}{{ not rendered }}{% endraw %} after",
    "  {%+ if t %}keep{% endif %}\n    {%- if t %} dash{% endif %}",
    "{% if t %}\n  a\n{% endif %}\n\n{% if t -%}\n  b\n{%- endif %}",
]


def reference(fn):
    try:
        return fn(), None
    except Exception as e:  # jinja2 errors of every kind
        return None, f"{type(e).__name__}: {e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ernie", required=True)
    a = ap.parse_args()
    failures = 0
    checked = 0

    def compare(label, want, err, got):
        nonlocal failures, checked
        checked += 1
        if err is not None:
            if "error" not in got:
                failures += 1
                print(f"MISMATCH {label}: jinja2 failed ({err}) but ours rendered {got.get('text')!r}")
            return
        if got.get("text") != want:
            failures += 1
            print(f"MISMATCH {label}:\n  jinja2: {want!r}\n  ours:   {got!r}")

    with tempfile.TemporaryDirectory() as tmp:
        model = tmp + "/m"
        subprocess.run([a.ernie, "make-model", "--preset", "tiny", "--no-weights", "--out", model],
                       check=True, stderr=subprocess.DEVNULL)
        ours = Ernie(a.ernie, model)
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                   "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>",
                   "mask_token": "<mask:1>"}
        for fname in sorted(os.listdir(TEMPLATES)):
            if not fname.endswith(".jinja"):
                continue
            src = open(os.path.join(TEMPLATES, fname), encoding="utf-8").read()
            for conv_name, messages in CONVERSATIONS.items():
                for tools in (None, TOOLS):
                    for gen in (True, False):
                        for extra in ({}, {"date_string": "01 Jan 2025", "tools_in_user_message": False}):
                            ctx = dict(special)
                            ctx.update(extra)
                            want, err = reference(lambda: render_jinja_template(
                                conversations=[messages], tools=tools, chat_template=src,
                                add_generation_prompt=gen, **ctx)[0][0])
                            req = {"template": src, "context": {**ctx, "messages": messages,
                                                                 "add_generation_prompt": gen}}
                            if tools is not None:
                                req["context"]["tools"] = tools
                            got = ours.ask(check=False, op="render", **req)
                            compare(f"{fname} {conv_name} tools={tools is not None} gen={gen} {extra}", want, err, got)
        for i, src in enumerate(SNIPPETS):
            want, err = reference(lambda: _compile_jinja_template(src).render(**CTX))
            got = ours.ask(check=False, op="render", template=src, context=CTX)
            compare(f"snippet {i} {src[:60]!r}", want, err, got)
        # The model's own template through the chat op.
        for conv_name, messages in CONVERSATIONS.items():
            if not messages:
                continue
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(model)
            for gen in (True, False):
                want, err = reference(lambda: hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))
                got = ours.ask(check=False, op="chat", messages=messages, add_generation_prompt=gen)
                compare(f"apply_chat_template {conv_name} gen={gen}", want, err, got)
    print(f"{checked} renders compared: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
