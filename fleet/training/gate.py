"""The accuracy gate of a retrained model: pure decisions over accuracies on one holdout.

The holdout is the reference rows the trainer never saw plus the held-out share of the
collected (drifted) rows; the parent model is scored on the same rows. The new model passes
when its accuracy on the whole holdout is at least `min_accuracy`, it beats the parent on the
collected rows by at least `min_gain_collected`, and it loses at most `max_reference_drop` on
the reference rows (a model that fits the drift by forgetting the rest is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet.training.policy import AccuracyGate


@dataclass(frozen=True)
class GateFigures:
    new_accuracy: float
    parent_accuracy: float
    new_collected: float
    parent_collected: float
    new_reference: float
    parent_reference: float
    rows_collected: int
    rows_reference: int

    def as_metrics(self) -> dict[str, float]:
        return {f"gate_{k}": float(v) for k, v in self.__dict__.items()}


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of class scores (rows x classes); NaN without rows."""
    if labels.shape[0] == 0:
        return float("nan")
    out = outputs.reshape(outputs.shape[0], -1)
    return float(np.mean(out.argmax(axis=1) == labels))


def figures(new_out: np.ndarray, parent_out: np.ndarray, labels: np.ndarray,
            collected: np.ndarray) -> GateFigures:
    """Accuracies of both models; `collected` marks the holdout rows that came from devices."""
    ref = ~collected
    return GateFigures(accuracy(new_out, labels), accuracy(parent_out, labels),
                       accuracy(new_out[collected], labels[collected]),
                       accuracy(parent_out[collected], labels[collected]),
                       accuracy(new_out[ref], labels[ref]), accuracy(parent_out[ref], labels[ref]),
                       int(collected.sum()), int(ref.sum()))


def judge(gate: AccuracyGate, f: GateFigures) -> list[str]:
    """The problems (empty: the model passes)."""
    problems = []
    if f.rows_collected == 0:
        problems.append("the holdout has no collected rows: nothing shows the new model fits the drift")
    elif not f.new_collected - f.parent_collected >= gate.min_gain_collected:
        problems.append(f"accuracy on collected rows {f.new_collected:.4f} vs parent "
                        f"{f.parent_collected:.4f}: "
                        f"gain below {gate.min_gain_collected}")
    if not f.new_accuracy >= gate.min_accuracy:
        problems.append(f"holdout accuracy {f.new_accuracy:.4f} < {gate.min_accuracy}")
    if f.rows_reference and not f.parent_reference - f.new_reference <= gate.max_reference_drop:
        problems.append(f"accuracy on reference rows fell from {f.parent_reference:.4f} to "
                        f"{f.new_reference:.4f} (more than {gate.max_reference_drop})")
    return problems
