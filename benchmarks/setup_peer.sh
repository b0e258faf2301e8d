#!/usr/bin/env bash
# Builds what benchmarks/run.py needs for the peer library (imagen-pytorch 2.1.0):
#   benchmarks/.peer-venv   a virtual environment from benchmarks/requirements.txt
#   benchmarks/.hf-cache    a Hugging Face cache holding only google/t5-v1_1-base's config.json
# Both folders are git-ignored. Safe to re-run. Usage: bash benchmarks/setup_peer.sh [PYTHON]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${1:-python3}"
venv="$here/.peer-venv"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet -r "$here/requirements.txt"

# imagen-pytorch evaluates T5Config.from_pretrained("google/t5-v1_1-base") at import (a default argument),
# which needs the hub. The harness feeds precomputed text embeddings, so only the config is read: write it
# in the hub cache layout and run the peer with HF_HOME pointing here and HF_HUB_OFFLINE=1.
# The values are the published T5 v1.1 base hyper-parameters.
snapshot_id="0000000000000000000000000000000000000001"   # any 40-hex name works as a local snapshot id
model_dir="$here/.hf-cache/hub/models--google--t5-v1_1-base"
mkdir -p "$model_dir/snapshots/$snapshot_id" "$model_dir/refs"
printf '%s' "$snapshot_id" > "$model_dir/refs/main"
cat > "$model_dir/snapshots/$snapshot_id/config.json" <<'JSON'
{
  "architectures": ["T5ForConditionalGeneration"],
  "d_ff": 2048,
  "d_kv": 64,
  "d_model": 768,
  "decoder_start_token_id": 0,
  "dense_act_fn": "gelu_new",
  "dropout_rate": 0.1,
  "eos_token_id": 1,
  "feed_forward_proj": "gated-gelu",
  "initializer_factor": 1.0,
  "is_encoder_decoder": true,
  "is_gated_act": true,
  "layer_norm_epsilon": 1e-06,
  "model_type": "t5",
  "num_decoder_layers": 12,
  "num_heads": 12,
  "num_layers": 12,
  "output_past": true,
  "pad_token_id": 0,
  "relative_attention_max_distance": 128,
  "relative_attention_num_buckets": 32,
  "tie_word_embeddings": false,
  "vocab_size": 32128
}
JSON

# Check: the peer imports offline (run.py's peer worker applies the same torchvision guard, see peer_side.py).
HF_HOME="$here/.hf-cache" HF_HUB_OFFLINE=1 PYTHONPATH="$here" "$venv/bin/python" -c \
    "import peer_side; peer_side.import_peer(); import imagen_pytorch, torch; print('imagen-pytorch', imagen_pytorch.__version__ if hasattr(imagen_pytorch, '__version__') else '2.1.0', 'torch', torch.__version__, 'ready')"
