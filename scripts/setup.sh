#!/usr/bin/env bash
# Install Aviary for development. torch comes first from the pinned CPU wheel, so pip never pulls a
# multi-GB CUDA build as a dependency; then the package (building its C extension) with test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0
python3 -m pip install --quiet -e ".[test]"
