"""``python -m speculative_vlm.cli ...``: the same as the ``speculative-vlm`` command."""

import sys

from speculative_vlm.cli import main

sys.exit(main())
