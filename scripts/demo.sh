#!/usr/bin/env bash
# The main job on the embedded default model. Extended as compress/export/bench land.
set -euo pipefail
OUT=${1:-runs/demo}
DATA=${LOSA_DATA:-../shared/data}
LD=.venv/bin/losa-deploy
mkdir -p "$OUT"
WIKI="$DATA/wikitext-2-raw/wiki.test.raw"
[ -f "$WIKI" ] || WIKI=wikitext2
$LD evaluate smollm2-135m --data "$WIKI" --seqlen 2048 --max-tokens 20480 --json "$OUT/dense_ppl.json"
echo "report: $OUT/dense_ppl.json"
