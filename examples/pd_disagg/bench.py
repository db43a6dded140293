#!/usr/bin/env python3
"""Time to first token at the decode side, three ways (recompute, load, stream): ``kvstore demo pd --bench``.

python examples/pd_disagg/bench.py --own-cluster --threads 1 --runs 5 --out pd-bench.json
python examples/pd_disagg/bench.py --model 8b --device cuda --own-cluster --lengths 2048,8192,32768
"""

import sys

from kvstore.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["demo", "pd", "--bench", *sys.argv[1:]]))
