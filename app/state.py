"""What every tab of one running app shares: the workspace, the loaded base model and the training jobs."""

from __future__ import annotations

from dataclasses import dataclass

from .base_model import BaseModel
from .jobs import TrainingJobs
from .workspace import Workspace


@dataclass
class AppState:
    workspace: Workspace
    base: BaseModel
    jobs: TrainingJobs

    @classmethod
    def open(cls, workspace: str, base_model: str) -> "AppState":
        """Open (and tidy) the workspace and load the base model, falling back to `shapes` offline."""
        space = Workspace(workspace)
        space.recover()
        return cls(space, BaseModel(base_model).load(), TrainingJobs(space))
