"""A toy self-supervised objective, defined outside `common/objectives/` and registered by whoever imports it
under a name of their choosing (tests/toy_extensions.py as a plugin, tests/test_objectives.py in a fixture)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from common.objectives import Objective, ObjectiveSettings, create_encoder


class ColourSettings(ObjectiveSettings):
    weight: float = Field(1.0, gt=0.0)


class ColourObjective(Objective):
    """Predict each image's mean colour from the encoder's features: a whole objective in one class."""

    Settings = ColourSettings
    terms = ("colour", "total")
    locked = ()

    def __init__(self, encoder: str, weight: float):
        super().__init__()
        self.encoder = create_encoder(encoder)
        self._normalisation()
        self.head = nn.Linear(self.encoder.num_features, 3)
        self.weight = weight

    @classmethod
    def from_config(cls, model_config, image_size):
        return cls(model_config.encoder, model_config.settings(cls.name).weight)

    def forward(self, images, draws=None):
        return self.head(self.features(images))

    def loss_terms(self, images, output, schedule):
        colour = (output - images.mean(dim=(2, 3))).pow(2).sum(dim=1)  # per sample: DP-SGD clips each
        return {"colour": colour, "total": self.weight * colour}
