#!/usr/bin/env bash
# The GPU check, one prepared script (under 5 minutes on one H100/H200): pretraining MFU of the GPT-2 small shape
# (~124M parameters) at sequence 1024, generation tokens/s at 1 and 64 concurrent requests, and one PPO
# iteration's breakdown (rollout share). Run it whenever a GPU is lent and record the output in BENCHMARKS.md
# with the GPU's name and the date:
#
#     bash benchmarks/gpu.sh 2>&1 | tee gpu.txt
#
# Each part has its own time limit, so one slow part cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== pretraining: GPT-2 small shape (12 x 768, vocab 50304, tied), seq 1024, batch 16, bf16 autocast"
timeout 150 python benchmarks/pretrain_throughput.py --device cuda --compile --layers 12 --width 768 --heads 12 \
    --seq 1024 --vocab 50304 --tie --batch-size 16 --steps 10 --warmup 3
echo "== the same, eager (no torch.compile)"
timeout 60 python benchmarks/pretrain_throughput.py --device cuda --layers 12 --width 768 --heads 12 \
    --seq 1024 --vocab 50304 --tie --batch-size 16 --steps 5 --warmup 2

echo "== generation (continuous-batching engine), 12 x 768 random model, 1 and 64 concurrent requests"
timeout 60 python benchmarks/engine_throughput.py --device cuda --layers 12 --width 768 --concurrency 1 64 \
    --max-new-tokens 128 --repeats 2

echo "== one PPO iteration at the gpt2 size (64 rollouts x 128 new tokens): rollout share of the iteration"
timeout 90 python benchmarks/ppo_iteration.py --size gpt2 --device cuda --iterations 2
