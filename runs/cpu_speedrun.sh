#!/usr/bin/env bash
# The CPU speedrun: from nothing to a ChatGPT of your own on a 2-core CPU in about 30 minutes.
#
#   bash runs/cpu_speedrun.sh [OUT]          # default OUT: runs/speedrun
#
# 1. fetch the corpora (Shakespeare + King James Bible for pre-training, chitchat dialogues for fine-tuning)
# 2. train a byte-level BPE tokenizer on them
# 3. pre-train a small GPT (4 layers, width 256, 4 heads, context 256: ~6M parameters) on the classics
# 4. fine-tune it on the dialogues (loss on the assistant's turns only)
# 5. evaluate it: losses before/after, sample chats, a Markdown report with the loss curve
# then: gptchat chat --model OUT/sft/model
#
# The step counts are set for ~30 minutes on 2 cores; override them through the environment, e.g.
# PRETRAIN_STEPS=50 SFT_STEPS=20 bash runs/cpu_speedrun.sh /tmp/quick   (a smoke test).
set -euo pipefail
OUT=${1:-runs/speedrun}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-360}
SFT_STEPS=${SFT_STEPS:-100}
VOCAB=${VOCAB:-8192}
mkdir -p "$OUT"
DATA="$OUT/data"
started=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - started ))s] $*"; }

stamp "1/5 data"
gptchat data fetch classics --out "$DATA/classics"
gptchat data fetch chitchat --out "$DATA/chitchat"

stamp "2/5 tokenizer"
gptchat tokenizer train --vocab-size "$VOCAB" --out "$OUT/tokenizer" "$DATA/classics"

stamp "3/5 pre-training"
gptchat pretrain --data "$DATA/classics" --tokenizer "$OUT/tokenizer" --out "$OUT/base" \
    --depth 4 --width 256 --heads 4 --seq-len 256 --batch-size 16 --val-fraction 0.02 \
    --steps "$PRETRAIN_STEPS" --lr 3e-3 --warmup 30 --eval-every 120 --save-every 120 --log-every 20

stamp "4/5 fine-tuning on dialogues"
gptchat sft --model "$OUT/base/model" --data "$DATA/chitchat/chitchat.jsonl" --out "$OUT/sft" \
    --seq-len 256 --batch-size 16 --steps "$SFT_STEPS" --lr 5e-4 --warmup 10 --eval-every 50 --log-every 10

stamp "5/5 evaluation"
gptchat eval --model "$OUT/sft/model" --chats --run "$OUT/base" --report "$OUT/report"
gptchat eval --run "$OUT/sft" --report "$OUT/report-sft"

stamp "done: chat with it:  gptchat chat --model $OUT/sft/model"
