"""``python -m label ...`` = ``rlhf label ...``."""

import sys

from label.cli import main

sys.exit(main())
