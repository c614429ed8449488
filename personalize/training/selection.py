"""Which validation step to keep: a selection rule over the metric curve a tracker reports.

A curve is a list of points `{"step": s, "fidelity": f, "alignment": a, "drift": d, ...}`, one per
validation, step 0 being the base model before training (the reference). Rules:

- `fidelity`: the highest fidelity (DINO / CLIP-I to the instance images);
- `alignment`: the highest prompt alignment (CLIP-T of the validation prompts, token removed);
- `balanced` (default): `fidelity * min(1, alignment / alignment_0)`, fidelity discounted by the share
  of the base model's prompt alignment lost. A step that keeps the base's alignment is ranked by its
  fidelity alone; one that lost a fifth of it pays a fifth of its fidelity. The ratio makes the rule
  independent of the embedder's cosine scale (CLIP-T cosines sit near 0.3, DINO's near 0.6);
- `last`: the last validated step.

Every rule passes over step 0 (nothing is learned there) and steps whose `drift` (how far the class
prompt's images moved from the base model's) exceeds the limit; if every trained step exceeds it,
the one with the least drift is chosen. A missing number falls back: balanced without alignment is
fidelity, without fidelity it is alignment. Ties go to the earlier step (fewer steps, less overfit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Point = dict[str, Any]


def selection_score(point: Point, rule: str, base: Point | None) -> float | None:
    """The number `rule` ranks `point` by (higher is better), or None if the point lacks it."""
    fidelity, alignment = point.get("fidelity"), point.get("alignment")
    if rule == "fidelity":
        return fidelity
    if rule == "alignment":
        return alignment
    if rule == "last":
        return float(point["step"])
    if fidelity is None or alignment is None:
        return fidelity if fidelity is not None else alignment
    reference = (base or {}).get("alignment")
    kept = min(1.0, alignment / reference) if reference and reference > 0 else 1.0
    return fidelity * kept


def best_step(curve: Sequence[Point], rule: str, drift_limit: float) -> int | None:
    """The step `rule` chooses among the trained steps of `curve` (None when nothing can be ranked)."""
    base = next((p for p in curve if p["step"] == 0), None)
    trained = [p for p in curve if p["step"] > 0 and selection_score(p, rule, base) is not None]
    if not trained:
        return None
    within = [p for p in trained if p.get("drift") is None or p["drift"] <= drift_limit]
    if not within:
        return min(trained, key=lambda p: (p["drift"], p["step"]))["step"]
    return max(within, key=lambda p: (selection_score(p, rule, base), -p["step"]))["step"]
