#!/usr/bin/env bash
# Prepares a bare GPU machine (the device tool's H100) to run kvstore from this
# checkout without network access: builds the native extension in place for the
# machine's Python and puts the checkout on PYTHONPATH. The generated stubs
# (kvstore/_proto) and the xxhash header (.devcarry/include) travel as carried
# paths. Source it: `source bench/gpu/prepare.sh`.
set -e
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
CFLAGS="-I$PWD/.devcarry/include" $PY setup.py -q build_ext --inplace >/tmp/kvstore-build.log 2>&1 || { cat /tmp/kvstore-build.log; exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
set +e
