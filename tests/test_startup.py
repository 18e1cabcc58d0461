"""TensorFlow's start-up chatter stays off the terminal unless asked for."""

import os
import subprocess
import sys

PROGRAM = (
    "import sys\n"
    "from dualenc.core.startup import import_tensorflow\n"
    "tf = import_tensorflow()\n"
    "tf.constant(1.0) + 1\n"
    "print('done', file=sys.stderr)\n"
)


def _stderr(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "DUALENC_TF_LOG")}
    env.update(env_extra)
    result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    return result.stderr


def test_quiet_import_leaves_only_our_own_output():
    assert _stderr({}) == "done\n"


def test_chatter_comes_back_when_asked_for():
    # The same program, with DUALENC_TF_LOG=1, shows TensorFlow's native start-up lines: proof that
    # the quiet run above had something to hide.
    loud = _stderr({"DUALENC_TF_LOG": "1", "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.endswith("done\n") and len(loud.splitlines()) > 1
