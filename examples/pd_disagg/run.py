#!/usr/bin/env python3
"""Prefill/decode disaggregation with a real transformer, through kvstore (issue 7).

Same as ``kvstore demo pd`` (the code lives in kvstore/demo/pd.py; this is a
runnable front for machines where the ``kvstore`` script is not installed):

    python examples/pd_disagg/run.py --own-cluster                 # correctness demo, CPU, small model
    python examples/pd_disagg/run.py --master 127.0.0.1:50051      # against a running `kvstore up`
    python examples/pd_disagg/run.py --model 8b --device cuda --own-cluster --new-tokens 32
"""

import sys

from kvstore.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["demo", "pd", *sys.argv[1:]]))
