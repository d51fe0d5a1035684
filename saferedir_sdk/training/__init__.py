"""Redirector training: trajectory collection from a real pipeline, losses, fitting, bundles."""

from .fit import FitResult, classifier_ablation, evaluate_redirector, fit_redirector, redirector_losses
from .pairs import PairsError, PromptPairs, igmu_pairs, igmu_prompts, load_pairs
from .trainer import TrainConfig, collect, train_bundle
from .trajectories import Trajectories, record_trajectories

__all__ = [
    "FitResult",
    "PairsError",
    "PromptPairs",
    "TrainConfig",
    "Trajectories",
    "classifier_ablation",
    "collect",
    "evaluate_redirector",
    "fit_redirector",
    "igmu_pairs",
    "igmu_prompts",
    "load_pairs",
    "record_trajectories",
    "redirector_losses",
    "train_bundle",
]
