#!/usr/bin/env bash
# Device-memory checks on a CUDA machine, after bench/gpu_full.py wrote the random
# full-size SDXL base to /tmp/sdxl-random: the server with libtorch's allocator capped at
# 11 GiB (engine.cuda_memory_fraction) answers a 2048x2048 job RESOURCE_EXHAUSTED
# (DEVICE_OUT_OF_MEMORY) after its own recovery, keeps serving, and reports the
# allocator's peak for a 1024x1024 job.
set -uo pipefail
sdxld="${SDXLD:-.gpu/sdxld}"
model="${MODEL:-/tmp/sdxl-random}"
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
fraction=$(python3 -c "print(min(1.0, 11 * 1024 / $total_mib))")
echo "capping the allocator at 11 GiB of $total_mib MiB (fraction $fraction)"
SDXLD__ENGINE__DTYPE=bfloat16 SDXLD__ENGINE__CUDA_MEMORY_FRACTION="$fraction" \
  SDXLD__SERVER__LISTEN=127.0.0.1:50151 SDXLD__SERVER__METRICS_LISTEN= \
  "$sdxld" serve --model "$model" > /tmp/serve.log 2>&1 &
server=$!
for _ in $(seq 1 180); do
  grep -q '"ready"\|ready$\| ready' /tmp/serve.log && break
  kill -0 "$server" 2>/dev/null || break
  sleep 1
done
grep -i "warn\|error\|ready" /tmp/serve.log | tail -3
request() { "$sdxld" request --server 127.0.0.1:50151 --spec "$1"; }
echo "2048x2048, 2 steps (expected: ResourceExhausted, DEVICE_OUT_OF_MEMORY):"
request '{"prompt": "a lighthouse", "width": 2048, "height": 2048, "steps": 2, "seed": 1}'
echo "1024x1024, 30 steps, after it (expected: OK):"
request '{"prompt": "a lighthouse", "width": 1024, "height": 1024, "steps": 30, "seed": 1}'
echo "1024x1024 again:"
request '{"prompt": "a lighthouse", "width": 1024, "height": 1024, "steps": 30, "seed": 2}'
grep -c "out of memory" /tmp/serve.log | sed 's/^/log lines mentioning out of memory: /'
kill -TERM "$server"; wait "$server"; echo "server exit status $?"
