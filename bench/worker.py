"""Child-process entry: ``python -m bench.worker BENCHMARK VARIANT PARAMS_JSON``.

Imports ``bench.<BENCHMARK>``, calls its ``measure(VARIANT, params)`` and prints the result
with the process's peak memory on one line prefixed with `RESULT_MARKER`. Nothing heavy is
imported at module level: the packer's spawned workers re-import this module.
"""

import importlib
import json
import sys

from bench.common import RESULT_MARKER, peak_rss_mb


def main(argv: list[str]) -> int:
    """Run one measurement and print its result line."""
    benchmark, variant, params = argv[0], argv[1], json.loads(argv[2])
    module = importlib.import_module(f"bench.{benchmark}")
    result = module.measure(variant, params)
    result["rss_mb"] = {"self": peak_rss_mb(), "workers": result.pop("workers_mb", 0.0)}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
