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
# The carried stubs (kvstore/_proto) are generated on the development machine with
# grpcio-tools 1.85.1 and refuse to import under an older grpcio (a version check at the top of
# kvstore_pb2_grpc.py); the GPU machine's image has grpcio 1.84.0 and no network to upgrade it.
# The stubs use no API newer than that, so here, on the GPU machine's own copy of the tree, the
# check is lowered to the installed version. Never run this on a checkout you commit from.
STUB=kvstore/_proto/kvstore_pb2_grpc.py
GRPC_INSTALLED=$($PY -c 'import grpc; print(grpc.__version__)' 2>/dev/null || true)
GRPC_STUBS=$(sed -n "s/^GRPC_GENERATED_VERSION = '\(.*\)'/\1/p" "$STUB" 2>/dev/null || true)
if [ -n "$GRPC_INSTALLED" ] && [ -n "$GRPC_STUBS" ] &&
  [ "$(printf '%s\n%s\n' "$GRPC_INSTALLED" "$GRPC_STUBS" | sort -V | head -n1)" != "$GRPC_STUBS" ]; then
  sed -i "s/^GRPC_GENERATED_VERSION = '.*'/GRPC_GENERATED_VERSION = '$GRPC_INSTALLED'/" "$STUB"
  echo "prepare.sh: grpcio $GRPC_INSTALLED is older than the stubs' $GRPC_STUBS: their version check lowered" >&2
fi
CFLAGS="-I$PWD/.devcarry/include" $PY setup.py -q build_ext --inplace >/tmp/kvstore-build.log 2>&1 || { cat /tmp/kvstore-build.log; exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
set +e
