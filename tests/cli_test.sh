#!/usr/bin/env bash
# End to end through the binary: make a model, generate from it, and refuse bad input clearly.
set -euo pipefail
: "${ERNIE:?set ERNIE to the ernie binary}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$ERNIE" make-model --preset tiny --seed 4 --out "$dir/m" --set num_hidden_layers=2 2>/dev/null
out=$("$ERNIE" generate --model "$dir/m" --prompt-token-ids 5,6,7 --prompt-token-ids 9 \
      --max-tokens 6 --temperature 0 --logprobs 3 --json --ignore-eos 2>/dev/null)
python3 - "$out" <<'PY'
import json, sys
lines = sys.argv[1].strip().split("\n")
assert len(lines) == 2, lines
for line in lines:
    o = json.loads(line)
    assert len(o["token_ids"]) == 6, o
    assert len(o["logprobs"]) == 6 and all(len(s) == 3 for s in o["logprobs"]), o
    for step, tok in zip(o["logprobs"], o["token_ids"]):
        assert step[0]["id"] == tok, (step, tok)           # greedy = most likely
        assert step[0]["logprob"] >= step[1]["logprob"] >= step[2]["logprob"]
        assert all(s["logprob"] <= 0 for s in step)
PY

# Prompt logprobs by teacher forcing: the prompt followed by its greedy continuation scores each
# continuation token as generation drew it.
gen=$("$ERNIE" generate --model "$dir/m" --prompt-token-ids 5,6,7 --max-tokens 6 --temperature 0 \
      --logprobs 2 --json --ignore-eos 2>/dev/null)
ids=$(python3 -c 'import json,sys; print(",".join(map(str, [5,6,7] + json.loads(sys.argv[1])["token_ids"])))' "$gen")
forced=$("$ERNIE" generate --model "$dir/m" --prompt-token-ids "$ids" --max-tokens 1 --temperature 0 \
         --prompt-logprobs 2 --json 2>/dev/null)
python3 - "$gen" "$forced" <<'PY'
import json, sys
gen, forced = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pl = forced["prompt_logprobs"]
assert len(pl) == 3 + 6 and pl[0] is None, pl
for t, (tok, step) in enumerate(zip(gen["token_ids"], gen["logprobs"])):
    e = pl[3 + t]
    assert e["id"] == tok and e["rank"] == 1 and e["top"][0]["id"] == tok, (t, e)
    assert abs(e["logprob"] - step[0]["logprob"]) < 1e-4, (t, e, step)
PY
expect_error() {  # expect_error "message part" args...
  local want=$1; shift
  if msg=$("$ERNIE" "$@" 2>&1); then fail "expected failure: $*"; fi
  grep -q -- "$want" <<<"$msg" || fail "message for '$*' lacks '$want': $msg"
}
# Text in, text out through the tokenizer and the chat template.
out=$("$ERNIE" generate --model "$dir/m" --chat "Hello" --prompt "The engine" --max-tokens 5 \
      --temperature 0 --json 2>/dev/null)
python3 - "$out" <<'PY'
import json, sys
lines = [json.loads(l) for l in sys.argv[1].strip().split("\n")]
assert len(lines) == 2, lines
for o in lines:
    assert isinstance(o["text"], str) and 1 <= len(o["token_ids"]) <= 5, o
PY
mkdir -p "$dir/notok" && cp "$dir/m"/config.json "$dir/m"/*.safetensors* "$dir/notok/"
expect_error "tokenizer.model" generate --model "$dir/notok" --prompt "hello"
expect_error "JSON object" generate --model "$dir/m" --chat hi --chat-template-kwargs '[1]'
expect_error "cannot open" generate --model "$dir/m" --chat hi --chat-template "$dir/missing.jinja"
printf '{{ raise_exception("no system messages here") }}' > "$dir/bad.jinja"
expect_error "no system messages here" generate --model "$dir/m" --chat hi --chat-template "$dir/bad.jinja"
expect_error "not an integer" generate --model "$dir/m" --prompt-token-ids 1,x,3
expect_error "out of vocabulary" generate --model "$dir/m" --prompt-token-ids 1,999999
expect_error "config.json" generate --model "$dir/nothing" --prompt-token-ids 1
expect_error "moe_k" make-model --preset tiny --out "$dir/bad" --set moe_k=100
expect_error "preset" make-model --preset 7b --out "$dir/bad"
expect_error "max_tokens must be at least 1" generate --model "$dir/m" --prompt-token-ids 1 --max-tokens 0
expect_error "maximum context length" generate --model "$dir/m" --prompt-token-ids 1,2,3 --max-tokens 100 --max-model-len 64
# The decode floor of the 21B model at the seed benchmark's batch (docs/performance.md: 43.0 GB,
# 13.9 ms at 3.1 TB/s).
"$ERNIE" make-model --preset 21b-a3b --no-weights --out "$dir/m21" 2>/dev/null
floor=$("$ERNIE" roofline --model "$dir/m21" --batch 16 --context 8500)
python3 - "$floor" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
assert abs(d["bytes"] / 1e9 - 43.0) < 0.9 and abs(d["floor_ms"] - 13.9) < 0.3, d
assert d["stages"]["moe_experts"]["bytes"] > d["stages"]["attention"]["bytes"] > 0, d
PY
expect_error "batch" roofline --model "$dir/m21" --batch 0
echo "cli end to end: ok"
