"""Per-round server-side checks of the global model (`federation.monitor`).

- `linear-probe`: freeze the global encoder, extract features of the labelled validation
  images, fit a logistic regression on half of the lesions and report balanced accuracy on
  the other half. Cheap, and it says whether the encoder is learning anything clinical.
- `reconstruction`: the global model's loss terms on the validation images (`val-<term>` for each
  of the objective's terms but the total), for an objective that declares it among its `monitors`
  and only when the whole model is shared (otherwise its decoders stay at the sites).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold

from common.config import DermFedConfig
from common.data.batches import read_batch, to_device_float
from common.data.pipeline import PreparedData, prepare_data
from common.data.splits import split_indices
from common.model import build_model, load_partial_state


class Monitor:
    def __init__(self, config: DermFedConfig, prepared: Optional[PreparedData] = None):
        self.config = config
        self.kind = config.federation.monitor
        self._prepared = prepared
        self._model = None
        self._validation: Optional[tuple[np.ndarray, torch.Tensor]] = None

    def _data(self) -> tuple[PreparedData, np.ndarray, torch.Tensor]:
        """The validation rows and their images, loaded once for all rounds."""
        if self._prepared is None:
            self._prepared = prepare_data(self.config)
        if self._validation is None:
            rows = split_indices(self._prepared.catalog, "val")
            if len(rows) < 4:
                rows = split_indices(self._prepared.catalog, "train")
            self._validation = rows, to_device_float(read_batch(self._prepared.store, rows), torch.device("cpu"))
        return self._prepared, *self._validation

    @torch.no_grad()
    def __call__(self, shared: Mapping[str, torch.Tensor]) -> dict[str, float]:
        if self.kind == "none":
            return {}
        if self._model is None:
            self._model = build_model(self.config.model, self.config.data.image_size).eval()
        load_partial_state(self._model, shared)
        prepared, rows, images = self._data()
        if self.kind == "reconstruction":
            terms = self._model.loss_terms(images, self._model(images), self._model.schedule(None))
            return {f"val-{key}": float(terms[key].mean()) for key in self._model.terms if key != "total"}
        return self._linear_probe(prepared, rows, images)

    def _linear_probe(self, prepared: PreparedData, rows: np.ndarray, images: torch.Tensor) -> dict[str, float]:
        if not prepared.catalog.labelled:
            return {}
        features = torch.cat([self._model.features(images[i:i + 64]) for i in range(0, len(images), 64)]).numpy()
        labels = prepared.catalog.label_indices().to_numpy()[rows]
        groups = prepared.catalog.frame["group"].to_numpy()[rows]
        if len(np.unique(labels)) < 2 or len(np.unique(groups)) < 2:
            return {}
        fit, score = next(GroupKFold(n_splits=2).split(features, labels, groups))
        probe = LogisticRegression(max_iter=2000, class_weight="balanced")
        probe.fit(features[fit], labels[fit])
        return {"probe-balanced-accuracy": float(balanced_accuracy_score(labels[score], probe.predict(features[score])))}
