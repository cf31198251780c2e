#!/usr/bin/env bash
# Sourced at the start of a device call (bench/auto_session.py, the GPU tests): bubblewrap from carried
# .debs (apt-get download bubblewrap libcap2, into .whl/), and carried wheels (rustbpe, nvidia-cudnn-frontend
# 1.16.0) installed into the interpreter's own site-packages: the autoresearch runs start python -I, which
# ignores PYTHONPATH, so wheels unpacked elsewhere would be invisible to them.
#   source bench/gpu_setup.sh     (from the repository root, with .whl/ carried)
mkdir -p /tmp/bwx && for f in .whl/*.deb; do dpkg -x "$f" /tmp/bwx; done
export PATH=/tmp/bwx/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/bwx/lib/x86_64-linux-gnu:/tmp/bwx/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl 2>&1 | tail -1
# the image's packages ship without .pyc, and the sandboxed runs (python -I under a read-only /) cannot
# write them, so every run would compile torch's Python again at import: compile the big ones once here
python3 -m compileall -q -j 0 $(python3 -c 'import importlib.util as u; print(*(u.find_spec(m).submodule_search_locations[0] for m in ("torch", "triton", "numpy", "scipy", "torchao") if u.find_spec(m)))') >/dev/null 2>&1
bwrap --ro-bind / / --dev /dev --proc /proc --unshare-pid true && echo "bwrap ok" || echo "bwrap NOT usable"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
