"""The sft stage as a script, for `accelerate launch` (same YAML as `rlhf sft`).

    python scripts/sft.py --config configs/sft.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/sft.py --config configs/sft.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
