# Sourced by the lab scripts. pack_dir DIR TGZ: DIR packed into TGZ (written whole, then renamed), without
# checkpoints and weights: what comes back from the GPU machine is results, logs and predictions. Each packer
# writes its own temporary file (a periodic pack may run beside a stage's).
pack_dir() {
  local partial="$2.$BASHPID.tmp"
  tar czf "$partial" -C "$1" --exclude=checkpoints --exclude=adapter --exclude='*.safetensors' . && mv "$partial" "$2"
}
