#!/usr/bin/env bash
# Run HERE (the dev machine, which reaches PyPI) before a GPU lease: the GPU image has
# torch, transformers, accelerate, peft and safetensors but no diffusers, and cannot fetch.
# The wheels land in .whl/ (git-ignored); pass carry=[".whl"] to the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
ls .whl
