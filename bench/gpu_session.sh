#!/usr/bin/env bash
# What one lent-GPU session runs, step by step (each step bounded by `timeout`, logs under $OUT):
#
#   bash bench/gpu_session.sh env kernels speech parity
#
#   env      devices and versions
#   kernels  bench/kernels.py: the Pallas kernels vs ragged_dot / XLA attention at the model's shapes
#   speech   bench/speech_gpu.py at full size (TTFA, RTF); falls back to XLA attention + ragged_dot if
#            the Pallas path fails, and says so
#   parity   the fp32 parity tests against the PyTorch reference, run on the GPU (so through the
#            Pallas kernels), with full-precision matmuls (JAX_DEFAULT_MATMUL_PRECISION=highest)
#
# The GPU image has JAX/CUDA, torch and transformers but not transformers 5.23.0; carry it as a wheel
# in .whl/ (see the device tool's README).
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

for step in "$@"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
      python3 -c "import jax, jaxlib, torch, transformers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| transformers', transformers.__version__)"
      ;;
    kernels)
      timeout ${KERNELS_TIMEOUT:-200} python3 bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
      ;;
    speech)
      SPEECH_ARGS=${SPEECH_ARGS:-}
      export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
      if ! timeout 330 python3 bench/speech_gpu.py --json "$OUT/speech.json" $SPEECH_ARGS 2>&1 | tee "$OUT/speech.log"; then
        echo "!!! the default (Pallas) path failed; retrying with XLA attention and ragged_dot"
        timeout 300 python3 bench/speech_gpu.py --json "$OUT/speech.json" --attention-impl xla \
          --grouped-matmul-impl ragged_dot $SPEECH_ARGS 2>&1 | tee "$OUT/speech_xla.log"
      fi
      ;;
    parity)
      XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout ${PARITY_TIMEOUT:-280} \
        python3 -m pytest -q -p no:cacheprovider -n ${PARITY_WORKERS:-6} --durations=10 \
        tests/parity/test_thinker_parity.py tests/parity/test_audio_encoder_parity.py \
        tests/parity/test_vision_encoder_parity.py tests/parity/test_talker_parity.py \
        tests/parity/test_code_predictor_parity.py tests/parity/test_code2wav_parity.py \
        tests/parity/test_speech_pipeline.py tests/nn 2>&1 | tee "$OUT/parity.log"
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
