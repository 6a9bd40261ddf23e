#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages ernie needs to build and test, when missing.
# Safe to run repeatedly: it does nothing when everything is present.
set -euo pipefail

packages=(
  build-essential cmake ninja-build git python3 python3-venv
  nlohmann-json3-dev libcli11-dev libgtest-dev libsentencepiece-dev
  libboost-dev libcurl4-openssl-dev curl
  clang libclang-rt-dev   # libFuzzer for the safetensors fuzz pass
)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
