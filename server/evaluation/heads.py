"""Identical classifier heads for every arm: same architecture, hyperparameters, seeds, imbalance handling.

Per epoch it records, on the training and validation sets (evaluated after the epoch, in eval
mode): the loss the head is trained on (class-weighted cross-entropy, unless
`evaluation.imbalance=none`; the same weighting on both sets, so the two are comparable),
accuracy, balanced accuracy (ISIC definition), and the overfitting gap in each of the three
(`gap_accuracy`, `gap_balanced_accuracy`: training minus validation; `gap_loss`: validation minus
training, so that a positive gap always means the head does better on its training images). The
best epoch is chosen on validation data only (`evaluation.select_on`: balanced accuracy by
default, the study's headline metric, or the loss); test data never influences training or
selection.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from common.config import EvaluationConfig
from server.evaluation.metrics import balanced_accuracy


def build_head(cfg: EvaluationConfig, in_features: int, num_classes: int) -> nn.Module:
    if cfg.head == "linear":
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Linear(in_features, cfg.mlp_hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                         nn.Linear(cfg.mlp_hidden, num_classes))


@dataclass
class HeadRun:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    head: Optional[nn.Module] = None
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None

    @torch.no_grad()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        assert self.head is not None
        self.head.eval()
        x = (torch.from_numpy(features).float() - self.mean) / self.std
        return torch.softmax(self.head(x), dim=1).numpy()


def _evaluate(head: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    head.eval()
    with torch.no_grad():
        logits = head(x)
        loss = float(F.cross_entropy(logits, y, weight=weights))
        pred = logits.argmax(dim=1).numpy()
    truth = y.numpy()
    return {"loss": loss, "accuracy": float((pred == truth).mean()),
            "balanced_accuracy": balanced_accuracy(truth, pred, len(weights))}


SELECTION_METRIC = {"val_balanced_accuracy": "balanced_accuracy", "val_loss": "loss"}


def gaps(train: dict[str, float], val: dict[str, float]) -> dict[str, float]:
    """How much better the head does on its training images than on validation ones, in each metric."""
    return {"gap_accuracy": train["accuracy"] - val["accuracy"],
            "gap_balanced_accuracy": train["balanced_accuracy"] - val["balanced_accuracy"],
            "gap_loss": val["loss"] - train["loss"]}


def objective_weights(cfg: EvaluationConfig, train_labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Per-class weights of the loss the head optimises (and is selected and reported on)."""
    weights = torch.ones(num_classes)
    if cfg.imbalance != "none":
        present = np.unique(train_labels)
        weights[present] = torch.from_numpy(compute_class_weight("balanced", classes=present, y=train_labels)).float()
    return weights


def train_head(cfg: EvaluationConfig, train_features: Callable[[int], np.ndarray], train_labels: np.ndarray,
               val_features: np.ndarray, val_labels: np.ndarray, num_classes: int, seed: int) -> HeadRun:
    """Train one head; `train_features(epoch)` returns cached features, or fresh augmented ones."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    first = train_features(0)
    mean = torch.from_numpy(first.mean(axis=0)).float()
    std = torch.from_numpy(first.std(axis=0) + 1e-6).float()  # standardise with training statistics only
    head = build_head(cfg, first.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    y_train = torch.from_numpy(train_labels).long()
    x_val = (torch.from_numpy(val_features).float() - mean) / std
    y_val = torch.from_numpy(val_labels).long()
    weights = objective_weights(cfg, train_labels, num_classes)
    # balanced sampling balances the batches themselves; the loss it optimises is then unweighted
    loss_weights = weights if cfg.imbalance == "class-weights" else None
    sample_weights = (1.0 / np.bincount(train_labels, minlength=num_classes)[train_labels]) if cfg.imbalance == "balanced-sampling" else None
    run, best_score, best_state = HeadRun(mean=mean, std=std), None, None
    for epoch in range(cfg.epochs):
        features = first if epoch == 0 else train_features(epoch)
        x_train = (torch.from_numpy(features).float() - mean) / std
        if sample_weights is not None:
            order = torch.multinomial(torch.from_numpy(sample_weights).double(), len(x_train), replacement=True, generator=generator)
        else:
            order = torch.randperm(len(x_train), generator=generator)
        head.train()
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(head(x_train[batch]), y_train[batch], weight=loss_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train = _evaluate(head, x_train, y_train, weights)
        val = _evaluate(head, x_val, y_val, weights)
        run.history.append({"epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()},
                            **{f"val_{k}": v for k, v in val.items()}, **gaps(train, val)})
        score = -val["loss"] if cfg.select_on == "val_loss" else val["balanced_accuracy"]
        if best_score is None or score > best_score:
            best_score, best_state, run.best_epoch = score, copy.deepcopy(head.state_dict()), epoch + 1
    head.load_state_dict(best_state)
    run.head = head
    return run
