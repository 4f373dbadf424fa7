#!/usr/bin/env bash
# The GPU checks in one run of under 6 minutes on one H100 or H200 (the device tool; see docs/BENCHMARKS.md):
#
#   tools/gpu_check.sh wheels    here, once: the lock's peft as a wheel in .whl/ (git ignores it)
#   tools/gpu_check.sh run       there (run's command, carry [".whl"]): CUDA tests, then Fig. 2 with kernel counts
#
# The device image's own libraries stay (when last read: torch 2.11+cu130, transformers 5.17, accelerate 1.15,
# within paca's ranges but for torch's lower bound, which is what this run is the first to try); the wheel brings
# the lock's peft, which the image may lack; paca runs from src/. Results go to $OUT (the tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."

wheels() {
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # transformers' newer releases need a newer huggingface-hub (and it httpx2, hf-xet) than the image has: only peft.
    rm -rf .whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl "$(grep '^peft==' constraints.txt)"
    ls -la .whl
}

run() {
    local out=${OUT:-/tmp/gpu-check}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 PYTHONPATH=src
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:src
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers',
        transformers.__version__, '| peft', peft.__version__)" | tee -a "$out/device.txt"
    # The layers in fp32 and bf16 against the float64 reference, the experts, the kernel budget: ~1 min.
    timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/test_cuda.py 2>&1 \
        | tee "$out/test_cuda.log"
    # Fig. 2 on the LLaMA3-8B shape cut to 8 blocks, bf16, batch 2 x 512: step times, memory, ops and kernels, with
    # PEFT's own PaCA (peft >= 0.22, the wheel's) on the same columns beside paca's.
    timeout 240 python3 -m paca bench --preset llama3-8b --layers 8 --device cuda --dtype bf16 \
        --methods floor,paca,peft-paca,lora,full --batch 2 --seq 512 --repeats 10 --warmup 2 --parts fig2 \
        --json "$out/fig2.json" --markdown "$out/fig2.md" 2>&1 | tee "$out/fig2.log"
}

case "${1:-}" in
    wheels) wheels ;;
    run) run ;;
    *) echo "usage: tools/gpu_check.sh wheels|run" >&2; exit 2 ;;
esac
