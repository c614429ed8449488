"""LoLDU's options and defaults (the method: `personalize/adapters/loldu.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import AdapterConfig, Declaration, TrainDefaults, declare

INITS = ("ldu", "uniform")
UNIFORM_NOTE = (
    "init='uniform' starts away from W0 by design (loldu.txt Table V): the untrained adapter already "
    "changes the model's output; init='ldu' (default) starts exactly at W0"
)


@dataclass
class LoLDUConfig(AdapterConfig):
    rank: int = 32  # paper SD setting (Table X): rank 32
    alpha: float = 32.0  # paper SD setting: alpha 32, so sigma0 = alpha / rank = 1
    # "ldu" (default): z0 = diag(D), exact start at W0. "uniform": z ~ U(-1, 1) re-drawn after the
    # residual was built (paper Table V's best): by design the model does NOT start at W0 (the untrained
    # adapter already changes the output); `personalize methods loldu` says so and attach warns.
    init: str = "ldu"


LOLDU = declare(
    Declaration(
        name="loldu",
        description="LoLDU: trains a diagonal scaling between frozen LDU factors of each attention projection",
        config_cls=LoLDUConfig,
        train_defaults=TrainDefaults(lr=5e-4, steps=1000, source="loldu.txt Table X: rank 32, alpha 32, lr 5e-4, constant, 1000 steps"),
        notes=(UNIFORM_NOTE,),
    )
)
