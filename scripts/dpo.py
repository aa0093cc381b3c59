"""The dpo stage as a script, for `accelerate launch` (same YAML as `rlhf dpo`).

    python scripts/dpo.py --config configs/dpo.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/dpo.py --config configs/dpo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["dpo", *sys.argv[1:]]))
