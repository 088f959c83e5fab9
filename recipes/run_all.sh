#!/usr/bin/env bash
# Regenerate every recipe's full results (tables, JSON, PNG) under results/ — see README "Results".
set -euo pipefail
cd "$(dirname "$0")/.."
for r in compactness robustness gamma_scaling pah universality transformer; do
  echo "== $r"; python "recipes/$r.py"
done
