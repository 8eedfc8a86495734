"""A hospital's `min-batch-size` against a coordinator that sizes the data splits (`data.*`) itself.

Written from the coordinator's side, through the real ClientApp of a deployed hospital (node config
`data-root`): the coordinator keeps `train.batch_size` at the hospital's minimum, which the verifying
process accepts, and instead shrinks the validation or the training set, or relies on the short last
batch of an epoch, to get values computed from fewer images than the minimum.
"""

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.client_app import _RUNNERS, evaluate, train
from client.trusted_app import check_limits
from common.config import load_config
from common.model import build_model, shared_state
from tests.flower_helpers import run_config_of, set_identity

MINIMUM = 16


def _ask(folder, tmp_path, overrides, kind=MessageType.TRAIN, **node_config):
    """What the coordinator sends (a config the hospital's limits accept) and what comes back."""
    config = load_config("smoke", [f"train.batch_size={MINIMUM}", f"data.cache_dir={tmp_path / 'cache'}",
                                   *overrides])
    node = {"data-root": str(folder), "state-dir": str(tmp_path / "state"), "min-batch-size": MINIMUM, **node_config}
    check_limits(config.model_dump(mode="json"), node)  # what the verifying process applies: it passes
    torch.manual_seed(0)
    shared = shared_state(build_model(config.model, config.data.image_size), config.federation.share)
    set_identity(run_id=5, node_id=3)
    content = RecordDict({"arrays": ArrayRecord(shared),
                          "config": ConfigRecord({"server-round": 1})})
    message = Message(content=content, dst_node_id=3, message_type=kind)
    context = Context(run_id=5, node_id=3, node_config=node, state=RecordDict(), run_config=run_config_of(config))
    _RUNNERS.clear()
    return (train if kind == MessageType.TRAIN else evaluate)(message, context)


def _refused(reply, split: str) -> None:
    assert reply.has_error(), f"answered with {dict(reply.content['metrics'])}"
    reason = reply.error.reason
    assert reason.startswith("min-batch-size:") and f"fewer {split} images" in reason, reason
    assert f"min-batch-size={MINIMUM}" in reason


def test_a_validation_set_below_the_minimum_is_not_evaluated(hospital_images, tmp_path):
    _refused(_ask(hospital_images, tmp_path, ["data.val_fraction=0.001", "data.test_fraction=0"],
                  kind=MessageType.EVALUATE), "validation")


def test_a_training_set_below_the_minimum_is_not_trained_on(hospital_images, tmp_path):
    one_image = ["data.val_fraction=0.001", "data.test_fraction=0", "data.pretrain_splits=[val]"]
    _refused(_ask(hospital_images, tmp_path, one_image), "training")
    _refused(_ask(hospital_images, tmp_path, ["data.val_fraction=0.4", "data.test_fraction=0.4"]), "training")
    # under DP the batch size is random (DP protects it), but a training set below the minimum is still refused;
    # the reply is the DP site's one fixed reason for data-dependent failures (which one would reveal N < minimum)
    from client.policy import DP_SITE_FAILED

    dp = _ask(hospital_images, tmp_path, [*one_image, "dp.enabled=true", "dp.noise_multiplier=1.0"])
    assert dp.has_error() and dp.error.reason == DP_SITE_FAILED, dp.error.reason


def test_no_plain_step_sees_fewer_images_than_the_minimum(hospital_images, tmp_path, monkeypatch):
    """The epoch's short last batch is dropped, and images-seen counts only what was trained on."""
    import common.training as training

    sizes = []
    step = training.LocalTrainer._step
    monkeypatch.setattr(training.LocalTrainer, "_step",
                        lambda self, model, optimizer, scaler, batch, *rest: (sizes.append(len(batch)),
                                                                              step(self, model, optimizer, scaler,
                                                                                   batch, *rest))[1])
    reply = _ask(hospital_images, tmp_path, ["data.val_fraction=0", "data.test_fraction=0", "train.max_steps=1000",
                                             "train.epochs=1"])
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    images = int(metrics["num-examples"])
    assert images % MINIMUM, f"the synthetic set ({images}) must leave a short last batch for this test"
    assert sizes and min(sizes) >= MINIMUM, sizes
    assert metrics["images-seen"] == MINIMUM * (images // MINIMUM) == sum(sizes)
    assert metrics["steps"] == math.floor(images / MINIMUM)
