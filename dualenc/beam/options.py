"""Beam pipeline options from the command line: ``--runner NAME [-- BEAM_OPTIONS]``.

The packers (``python -m tfrecords_tools ... --runner``) and ``search.py --build-index --runner``
run their work as Apache Beam pipelines. Everything after a bare ``--`` belongs to Beam
(``--direct_num_workers=2``, ``--project=...``, ``--flink_master=...``); it is checked here,
before a pipeline starts, so an unknown runner, an option no Beam runner knows or a bad value is
one line naming it, not a stack trace from the middle of a job. Beam itself only logs a warning
for options it does not know and drops them, which would run a Dataflow job without the
``--region`` the user meant to give.

`split_beam_args` imports nothing heavy; `pipeline_options` imports Beam.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os

from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError
from dualenc.core.startup import LOG_ENV, QUIET_TF_LOG_LEVEL

BEAM_SEPARATOR = "--"
# Beam's own loggers announce every bundle and worker at INFO; a packer prints its own summary.
BEAM_LOG_LEVEL = logging.WARNING
# The workers' log level, unless the user gives one: their start-up notices are not for users.
HARNESS_LOG_OPTION = "--default_sdk_harness_log_level"
# Read by Beam's option parser as JSON, like the values of --beam_services.
BEAM_SERVICES_ENV = "BEAM_SERVICE_OVERRIDES"


def split_beam_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(own arguments, Beam options)``: `argv` split at its first bare ``--``."""
    if BEAM_SEPARATOR not in argv:
        return list(argv), []
    cut = argv.index(BEAM_SEPARATOR)
    return list(argv[:cut]), list(argv[cut + 1:])


def has_runner_flag(argv: list[str]) -> bool:
    """Whether ``--runner`` comes before any bare ``--`` (so the ``--`` starts Beam's options,
    not, say, a search query that begins with a dash)."""
    own = argv[:argv.index(BEAM_SEPARATOR)] if BEAM_SEPARATOR in argv else argv
    return any(arg == "--runner" or arg.startswith("--runner=") for arg in own)


def check_runner_flags(runner: str | None, beam_args: list[str]) -> None:
    """Beam options make sense only with a runner: refuse ``-- OPTIONS`` without ``--runner``."""
    if runner is None and beam_args:
        raise DualEncError(f"Beam options after '--' ({' '.join(beam_args)}) need --runner NAME "
                           "(e.g. --runner DirectRunner)")


def _check_json_values(beam_args: list[str]) -> None:
    """Refuse JSON values nested too deeply for Python's parser before Beam's parser meets them.

    Beam reads some options as JSON (``--transform_name_mapping``, ``--beam_services``,
    ``--sdk_harness_log_level_overrides``, ...) with `json.loads`; a value nested thousands deep
    overflows its recursion, a traceback instead of the parser's one-line complaint (which it
    gives for any other bad value). Every value that starts like JSON is measured, whatever its
    option, so a new JSON option of Beam's is covered too.
    """
    given = [(f"${BEAM_SERVICES_ENV}", os.environ.get(BEAM_SERVICES_ENV, ""))]
    for arg in beam_args:
        name, equals, value = arg.partition("=")
        given.append((f"Beam option {name}", value) if equals and name.startswith("-") else ("a Beam option value", arg))
    for source, value in given:
        if value.lstrip()[:1] in ("[", "{"):
            jsonfiles.check_nesting(value, source)


def _check_runner(runner: str) -> None:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # Beam's BigQuery client warns on the root logger when imported without GCP extras
    try:
        from apache_beam.runners.runner import create_runner

        create_runner(runner)
    except (ValueError, ImportError, AttributeError) as error:
        known = "DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, PrismRunner, PortableRunner"
        reason = "unknown runner" if isinstance(error, (ValueError, AttributeError)) else str(error).split("\n")[0]
        raise DualEncError(f"--runner {runner!r}: {reason}; use one of {known}") from None
    finally:
        root.setLevel(level)


def pipeline_options(runner: str, beam_args: list[str]):
    """`PipelineOptions` for `runner` and `beam_args`, or `DualEncError` for an unknown runner,
    an option that no registered Beam option class defines, or a value Beam's parser rejects."""
    from apache_beam.options.pipeline_options import PipelineOptions

    for name in ("apache_beam", "absl"):
        logging.getLogger(name).setLevel(BEAM_LOG_LEVEL)
    if os.environ.get(LOG_ENV, "") in ("", "0"):
        # Local workers inherit it: TensorFlow's start-up notices stay off the terminal there too.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_LOG_LEVEL)
    # Unknown options are reported below as an error, not as Beam's "discarding" warning.
    logging.getLogger("apache_beam.options.pipeline_options").setLevel(logging.ERROR)
    _check_runner(runner)
    _check_json_values(beam_args)
    quiet_workers = [] if any(arg.startswith(HARNESS_LOG_OPTION) for arg in beam_args) else [f"{HARNESS_LOG_OPTION}=ERROR"]
    options = PipelineOptions([*quiet_workers, *beam_args, f"--runner={runner}"])
    messages = io.StringIO()
    try:
        # Beam's parser prints its usage and exits on a bad value; keep its last line.
        with contextlib.redirect_stderr(messages):
            known = options.get_all_options(display_warnings=False)
            every = options.get_all_options(display_warnings=False, retain_unknown_options=True)
    except SystemExit:
        lines = [line for line in messages.getvalue().splitlines() if line.strip()]
        reason = lines[-1].split("error: ", 1)[-1] if lines else "rejected"
        raise DualEncError(f"Beam options after '--': {reason}") from None
    unknown = sorted(set(every) - set(known))
    if unknown:
        raise DualEncError(f"Beam does not know the option(s) {', '.join('--' + name for name in unknown)} "
                           "given after '--'; check their spelling (Beam's options use underscores, "
                           "e.g. --direct_num_workers=2)")
    return options
