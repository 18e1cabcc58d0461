"""Child-process entry: ``python -m bench.worker BENCHMARK VARIANT PARAMS_JSON``, or
``python -m bench.worker --serve`` for `bench.common.SharedWorker`.

Imports ``bench.<BENCHMARK>``, calls its ``measure(VARIANT, params)`` and prints the result
with the process's peak memory on one line prefixed with `RESULT_MARKER`. With ``--serve`` it
does so for each ``[BENCHMARK, VARIANT, PARAMS]`` JSON line of stdin, in turn, until stdin
closes. Nothing heavy is imported at module level: the packer's spawned workers re-import this
module.
"""

import importlib
import json
import sys

from bench.common import RESULT_MARKER, peak_rss_mb

SERVE = "--serve"


def measure(benchmark: str, variant: str, params: dict) -> None:
    """Run one measurement and print its result line."""
    module = importlib.import_module(f"bench.{benchmark}")
    result = module.measure(variant, params)
    result["rss_mb"] = {"self": peak_rss_mb(), "workers": result.pop("workers_mb", 0.0)}
    print(RESULT_MARKER + json.dumps(result), flush=True)


def main(argv: list[str]) -> int:
    """One measurement from the arguments, or (``--serve``) one per line of stdin."""
    if argv == [SERVE]:
        for line in sys.stdin:
            measure(*json.loads(line))
        return 0
    measure(argv[0], argv[1], json.loads(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
