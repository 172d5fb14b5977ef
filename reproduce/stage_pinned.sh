#!/usr/bin/env bash
# The versions of requirements.txt that the GPU machine's image lacks, for measuring what a user installs: its
# image has transformers 5.17 and peft 0.21.0, requirements.txt pins newer ones (transformers 5.23 packs the query
# heads of grouped-query attention for one-token decode steps where 5.17 repeats every key and value head).
# Run here, from the project root, after ../shared/device/stage.sh: makes the git-ignored .device/pinned
# (about 12 MB: transformers and peft as requirements.txt pins them, and huggingface_hub 1.31, the oldest that
# transformers 5.23 accepts, used only where the image's is older) and .device/bin/pinned.sh. There, after setup.sh:
#   source .device/bin/setup.sh && source .device/bin/pinned.sh
# puts them first on PYTHONPATH and prints the versions Python then imports.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
pin() { grep -E "^$1==" requirements.txt | head -1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp/whl" "$(pin transformers)" "$(pin peft)" "huggingface_hub==1.31.0"
mkdir -p "$tmp/pinned/packages" "$tmp/pinned/hub" .device/pinned
for wheel in "$tmp"/whl/*.whl; do
  case "$(basename "$wheel")" in
    huggingface_hub-*) into=hub ;;
    *) into=packages ;;
  esac
  (cd "$tmp/pinned/$into" && python3 -m zipfile -e "$wheel" .)
done
tar czf .device/pinned/pinned.tgz -C "$tmp" pinned
cat > .device/bin/pinned.sh <<'SH'
# Source after setup.sh: requirements.txt's transformers and peft (carried in .device/pinned) ahead of the image's.
d="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -s "$d/pinned/pinned.tgz" ] && [ ! -d /tmp/pinned ] && tar xzf "$d/pinned/pinned.tgz" -C /tmp
if [ -d /tmp/pinned ]; then
  export PYTHONPATH=/tmp/pinned/packages${PYTHONPATH:+:$PYTHONPATH}
  # the image's huggingface_hub, unless older than the carried one
  python3 - <<'PY' || export PYTHONPATH=/tmp/pinned/hub:$PYTHONPATH
import sys
from importlib.metadata import version
sys.exit(tuple(int(part) for part in version("huggingface_hub").split(".")[:2]) < (1, 31))
PY
fi
python3 -c "import transformers, peft, huggingface_hub; print('pinned:', 'transformers', transformers.__version__, 'peft', peft.__version__, 'huggingface_hub', huggingface_hub.__version__)"
SH
ls -la .device/pinned/pinned.tgz
