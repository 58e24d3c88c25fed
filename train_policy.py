"""Train a PPO controller for the frozen AdaPerceiver backbone: ``python train_policy.py --flops-penalty 0.3``.

Thin entry point; the logic lives in ``policy/`` (see ``python train_policy.py --help``).
"""

from policy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
