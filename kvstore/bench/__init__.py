"""``kvstore bench``: put/get throughput per data path and segment size, beside the machine's physical limits."""
