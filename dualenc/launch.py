"""``python -m dualenc.launch``: the launcher's command-line name (see `dualenc.distribute.launch`)."""

import sys

from dualenc.distribute.launch import main

if __name__ == "__main__":
    sys.exit(main())
