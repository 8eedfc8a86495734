"""Where a real hospital reads and writes is the hospital's: the coordinator's run config (the signed manifest, or a
bare `flwr run --run-config`) names no path the hospital's ClientApp uses. Written from the coordinator's side,
through the real ClientApp of a deployed hospital (node config `data-root`)."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.client_app import _RUNNERS, train
from common.config import load_config
from common.model import build_model, shared_state
from tests.flower_helpers import run_config_of, set_identity


def _train(folder, tmp_path, overrides, **node_config):
    config = load_config("smoke", ["train.max_steps=1", *overrides])
    node = {"data-root": str(folder), "state-dir": str(tmp_path / "state"), **node_config}
    torch.manual_seed(0)
    shared = shared_state(build_model(config.model, config.data.image_size), config.federation.share)
    set_identity(run_id=6, node_id=3)
    message = Message(content=RecordDict({"arrays": ArrayRecord(shared), "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=3, message_type=MessageType.TRAIN)
    context = Context(run_id=6, node_id=3, node_config=node, state=RecordDict(), run_config=run_config_of(config))
    _RUNNERS.clear()
    return train(message, context)


def test_the_coordinator_does_not_choose_where_a_hospital_writes_the_decoded_copy_of_its_images(hospital_images,
                                                                                             tmp_path):
    """Attack (wave 3): `data.cache_dir` came from the coordinator's config, so a hospital wrote a decoded copy of all
    its images (the preprocessing cache) wherever the coordinator said: a shared or unencrypted volume, a full disk.
    The hospital's cache now lives in its own state folder, unless its own node config (`dermfed-overrides`) says."""
    chosen = tmp_path / "coordinators-choice"
    reply = _train(hospital_images, tmp_path, [f"data.cache_dir={chosen}"])
    assert not reply.has_error(), reply.error.reason
    assert not chosen.exists(), sorted(p.name for p in chosen.rglob("*"))
    assert any((tmp_path / "state" / "clinic_x" / "cache").iterdir())  # the hospital's own state folder
    own = tmp_path / "hospitals-choice"
    reply = _train(hospital_images, tmp_path, [f"data.cache_dir={chosen}"], **{"dermfed-overrides": f"data.cache_dir={own}"})
    assert not reply.has_error(), reply.error.reason
    assert any(own.iterdir()) and not chosen.exists()
