"""``python -m shared.lab.topology up|down ...``: the same as ``splitllm topology up|down ...``."""

import sys

from shared.lab.topology.cli import main

sys.exit(main())
