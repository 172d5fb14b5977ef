#!/usr/bin/env bash
# The SmolLM2 GGUF in three parts for the GPU machine, when the checkout plus two halves (../shared/device/stage.sh)
# would pass a call's 64 MiB: run after stage.sh, from the project root. Makes the git-ignored .device/g0, g1, g2
# and .device/bin/gguf.sh. Each call carries one part (g0 with .device/site; g2 with the data), and starts with
#   source .device/bin/setup.sh && source .device/bin/gguf.sh
# which sets MODEL_GGUF once all three parts have arrived (calls back to back: the machine keeps /tmp for 30 s).
# G0_BYTES (default 25,000,000) and G1_BYTES (45,000,000) set the first two parts' sizes (a call carries 64 MiB
# with the checkout, about 17 MiB).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
full=$(mktemp)
cat .device/model-a/part.0 .device/model-b/part.1 > "$full"
g0=${G0_BYTES:-25000000} g1=${G1_BYTES:-45000000}
mkdir -p .device/g0 .device/g1 .device/g2
head -c "$g0" "$full" > .device/g0/g.0
tail -c +$((g0 + 1)) "$full" | head -c "$g1" > .device/g1/g.1 || true  # tail stops on a closed pipe; cmp checks below
tail -c +$((g0 + g1 + 1)) "$full" > .device/g2/g.2
cat .device/g?/g.? | cmp - "$full"
rm -f "$full"
cat > .device/bin/gguf.sh <<'SH'
# Source after setup.sh: gathers the GGUF parts carried in .device/g0..g2 (in separate calls) into MODEL_GGUF.
d="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p /tmp/gparts /tmp/models
for p in "$d"/g?/g.?; do [ -s "$p" ] && cp "$p" /tmp/gparts/; done
g=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$g" ] && [ -s /tmp/gparts/g.0 ] && [ -s /tmp/gparts/g.1 ] && [ -s /tmp/gparts/g.2 ]; then
  cat /tmp/gparts/g.0 /tmp/gparts/g.1 /tmp/gparts/g.2 > "$g"
fi
[ -s "$g" ] && export MODEL_GGUF="$g"
echo "gguf parts: $(ls /tmp/gparts | tr '\n' ' ') model=${MODEL_GGUF:-incomplete}"
SH
du -b .device/g?/g.? .device/site/site.tgz
echo "tree: $(git ls-files -co --exclude-standard | xargs du -cb 2>/dev/null | tail -1 | cut -f1) bytes; a call may carry 67108864 in all"
