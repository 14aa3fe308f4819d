#!/bin/bash
# The GPU-only checks, as one script for a machine with an NVIDIA GPU:
# tests/gpu/ (the real libcuda path, the verify kernel, NVML minors against
# /dev), bench/gpu_wipe.py on the real driver, bench/gpu_remanence.py.
# Run from the repository root after `make install`.
set -u
PY=.venv/bin/python
nvidia-smi -L || true
$PY -m pytest -q -p no:cacheprovider -s tests/gpu; echo "tests/gpu rc=$?"
$PY bench/gpu_wipe.py --runs 5; echo "gpu_wipe rc=$?"
$PY bench/gpu_remanence.py; echo "gpu_remanence rc=$?"
