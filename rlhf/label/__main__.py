"""``python -m rlhf.label ...`` = ``rlhf label ...``."""

import sys

from rlhf.label.cli import main

sys.exit(main())
