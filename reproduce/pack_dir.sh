# Sourced by the lab scripts. pack_dir DIR TGZ: DIR packed into TGZ (written whole, then renamed), without
# checkpoints and weights: what comes back from the GPU machine is results, logs and predictions.
pack_dir() {
  tar czf "$2.tmp" -C "$1" --exclude=checkpoints --exclude=adapter --exclude='*.safetensors' . && mv "$2.tmp" "$2"
}
