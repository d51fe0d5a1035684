"""Redirector training: trajectory collection from a real pipeline, losses, fitting."""

from .fit import FitResult, fit_redirector, redirector_losses
from .trajectories import Trajectories, record_trajectories

__all__ = ["FitResult", "Trajectories", "fit_redirector", "record_trajectories", "redirector_losses"]
