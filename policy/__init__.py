"""Controller training (PPO), compute-saving inference and evaluation on top of a frozen AdaPerceiver."""

from policy.adaptive import AdaptiveClassifier, Prediction
from policy.config import PolicyConfig, build_policy_config
from policy.core_pool import CorePool
from policy.load_run import load_classifier
from policy.sequential_inference import SequentialClassifier
from policy.training import train_controller

__all__ = [
    "AdaptiveClassifier",
    "CorePool",
    "PolicyConfig",
    "Prediction",
    "SequentialClassifier",
    "build_policy_config",
    "load_classifier",
    "train_controller",
]
