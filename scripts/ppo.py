"""The PPO stage as a script, for `accelerate launch` (same YAML as `rlhf ppo`).

    python scripts/ppo.py --config configs/ppo.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/ppo.py --config configs/ppo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ppo", *sys.argv[1:]]))
