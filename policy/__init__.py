"""Controller training (PPO), compute-saving inference and evaluation on top of a frozen AdaPerceiver."""

from policy.adaptive import AdaptiveClassifier, Prediction
from policy.config import PolicyConfig, build_policy_config
from policy.training import train_controller

__all__ = ["AdaptiveClassifier", "PolicyConfig", "Prediction", "build_policy_config", "train_controller"]
