"""What a hospital's verifying ClientApp process checks before it installs a run's bundle
(`client.trusted_app.approve_task`), with real Flower Messages and Contexts, a real signed manifest and
the hospital's own folder: each case is something the coordinator controls. tests/test_deployment.py
runs the same checks through real processes."""

import base64
import json
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.node import approve
from client.trusted_app import RunRefused, approve_task
from common.config import config_to_json, load_config
from common.deployment.layout import HospitalLayout
from common.deployment.pki import make_signing_key
from common.run_manifest import (MANIFEST_KEY, SIGNATURE_KEY, RunManifest, UntrustedApp, bundle_sha256,
                                 load_signing_key, read_approved_bundles, sign_manifest)
from tests.flower_helpers import set_identity

BUNDLE = b"the app bundle's bytes"
FEDERATION = "f" * 32


@pytest.fixture()
def hospital(tmp_path) -> HospitalLayout:
    folder = tmp_path / "hospital"
    folder.mkdir()
    make_signing_key(tmp_path / "operator.key", folder / "trusted-app-keys.pub", "operator")
    (folder / "hospital.json").write_text(json.dumps({"site": "clinic_a", "index": 0, "federation_id": FEDERATION}))
    (folder / "auth_key").write_text("")  # as `dermfed node keygen` leaves it (only its presence matters here)
    approve(folder, bundle_sha256(BUNDLE))
    return HospitalLayout(folder)


def _manifest(overrides=(), **fields) -> RunManifest:
    config = json.loads(config_to_json(load_config("smoke", list(overrides))))
    run_config = {"config-preset": "smoke", "run-dir": "/srv/runs/r1", "resume": False, "site-registry": "/srv/reg.json",
                  "fault-injection": "", "stop-after-round": 0}
    values = dict(federation=FEDERATION, run="a" * 32, expires=int(time.time()) + 3600,
                  bundle_sha256=bundle_sha256(BUNDLE), run_config=run_config, dermfed_config=config)
    return RunManifest(**{**values, **fields})


def _task(hospital: HospitalLayout, manifest: RunManifest, *, run_config=None, instruction=None, node_config=None,
          flower_run_id: int = 7, key_path: Path | None = None, kind: str = MessageType.TRAIN):
    encoded, signature = sign_manifest(manifest, load_signing_key(key_path or hospital.root.parent / "operator.key"))
    config = {**manifest.run_config, MANIFEST_KEY: encoded, SIGNATURE_KEY: signature, **(run_config or {})}
    set_identity(run_id=flower_run_id)
    sent = {"server-round": 1, **(instruction or {})}  # the DermFed config is the manifest's: never in the instruction
    message = Message(content=RecordDict({"config": ConfigRecord(sent)}), dst_node_id=5, message_type=kind)
    context = Context(run_id=flower_run_id, node_id=5, node_config=node_config or {}, state=RecordDict(),
                      run_config=config)
    return message, context


def _task_of(hospital, manifest, round_number=1, kind=MessageType.TRAIN, **options):
    return _task(hospital, manifest, instruction={"server-round": round_number}, kind=kind, **options)


def test_the_signed_run_is_accepted_and_its_later_rounds_too(hospital):
    manifest = _manifest()
    approve_task(*_task(hospital, manifest), BUNDLE, hospital)
    # round 2 of the same Flower run, after the manifest expired: the run continues
    later = _task(hospital, manifest, instruction={"server-round": 2})
    approve_task(*later, BUNDLE, hospital, now=manifest.expires + 10)
    accepted = json.loads(hospital.accepted_runs.read_text())
    assert accepted[manifest.run]["flower_run_id"] == 7
    assert accepted[manifest.run]["tasks"] == {"train-1": "started", "train-2": "started"}
    assert oct(hospital.accepted_runs.stat().st_mode & 0o777) == "0o600"


def test_a_round_is_answered_once(hospital):
    """The coordinator asks for round 1 of the same Flower run again and again (reviewer: 5 times, all accepted)."""
    manifest = _manifest()
    approve_task(*_task_of(hospital, manifest), BUNDLE, hospital)
    approve_task(*_task_of(hospital, manifest), BUNDLE, hospital)  # the first try died before its reply: one retry
    with pytest.raises(UntrustedApp, match="tried twice train round 1"):
        approve_task(*_task_of(hospital, manifest), BUNDLE, hospital)
    approve_task(*_task_of(hospital, manifest, kind=MessageType.EVALUATE), BUNDLE, hospital)  # another task
    from client.trusted_app import record_answer

    message, context = _task_of(hospital, manifest, kind=MessageType.EVALUATE)
    record_answer(message, manifest, hospital)
    with pytest.raises(UntrustedApp, match="already answered evaluate round 1"):
        approve_task(message, context, BUNDLE, hospital)
    approve_task(*_task_of(hospital, manifest, round_number=2), BUNDLE, hospital)  # the next round is new
    with pytest.raises(UntrustedApp, match="a signed run sends only"):
        approve_task(*_task_of(hospital, manifest, round_number=2, kind=MessageType.QUERY), BUNDLE, hospital)


def test_a_started_run_ends_with_its_rounds(hospital):
    """Once started, a run is not open forever: after expiry + rounds x (train + evaluate) x round_timeout, refused."""
    manifest = _manifest(["federation.num_rounds=2", "federation.round_timeout=600"])
    approve_task(*_task_of(hospital, manifest), BUNDLE, hospital)
    end = manifest.expires + 2 * 2 * 600
    approve_task(*_task_of(hospital, manifest, round_number=2), BUNDLE, hospital, now=end - 1)
    for late in (end, manifest.expires + 30 * 86400):  # reviewer: 30 days after expiry, accepted
        with pytest.raises(UntrustedApp, match="the signed run ended"):
            approve_task(*_task_of(hospital, manifest, kind=MessageType.EVALUATE), BUNDLE, hospital, now=late)


def test_a_manifest_edited_after_signing_is_refused(hospital):
    message, context = _task(hospital, _manifest())
    edited = _manifest(dermfed_config={**_manifest().dermfed_config, "seed": 99})
    context.run_config[MANIFEST_KEY] = base64.urlsafe_b64encode(edited.encode()).decode()
    with pytest.raises(UntrustedApp, match="not signed by a key this hospital trusts"):
        approve_task(message, context, BUNDLE, hospital)
    assert not hospital.accepted_runs.exists()


def test_a_manifest_signed_by_another_key_is_refused(hospital, tmp_path):
    make_signing_key(tmp_path / "other.key", tmp_path / "other.pub", "someone")
    with pytest.raises(UntrustedApp, match="not signed by a key this hospital trusts"):
        approve_task(*_task(hospital, _manifest(), key_path=tmp_path / "other.key"), BUNDLE, hospital)


@pytest.mark.parametrize("case, change, expected", [
    ("another federation", {"federation": "0" * 32}, "for federation 0000"),
    ("no registry", {"run_config": {"site-registry": "", "run-dir": "/srv/runs/r1"}}, "has no site-registry"),
    ("fault injection", {"run_config": {"site-registry": "/r", "fault-injection": "0:raise:1"}}, "fault-injection"),
])
def test_a_signed_run_this_hospital_must_not_run_is_refused(hospital, case, change, expected):
    with pytest.raises(UntrustedApp, match=expected):
        approve_task(*_task(hospital, _manifest(**change)), BUNDLE, hospital)


@pytest.mark.parametrize("case, task, expected", [
    ("a run config key changed", {"run_config": {"run-dir": "/tmp/elsewhere"}}, r"differs from the signed one in \['run-dir'\]"),
    ("a run config key added", {"run_config": {"site-names": "x"}}, r"differs from the signed one in \['site-names'\]"),
    ("a bool that equals 0", {"run_config": {"stop-after-round": False}}, "stop-after-round"),
    ("another DermFed config", {"instruction": {"dermfed-config": config_to_json(load_config("smoke", ["seed=3"]))}},
     r"keys the signed run does not cover: \['dermfed-config'\]"),
    ("an extra instruction key", {"instruction": {"learning-rate": 1.0}}, "keys the signed run does not cover"),
    ("a round beyond the signed ones", {"instruction": {"server-round": 99}}, "outside the signed run's rounds"),
    ("a proximal term not signed", {"instruction": {"proximal-mu": 0.5}}, "proximal-mu"),
    ("a compression in the instruction", {"instruction": {"compression": "none"}},  # only the signed config's counts
     r"keys the signed run does not cover: \['compression'\]"),
])
def test_a_task_that_is_not_the_signed_run_is_refused(hospital, case, task, expected):
    with pytest.raises(UntrustedApp, match=expected):
        approve_task(*_task(hospital, _manifest(), **task), BUNDLE, hospital)


def test_an_unapproved_bundle_is_refused_with_its_hash(hospital):
    other = b"another bundle"
    manifest = _manifest(bundle_sha256=bundle_sha256(other))
    with pytest.raises(UntrustedApp, match=f"sha256 {bundle_sha256(other)} is not approved by this hospital"):
        approve_task(*_task(hospital, manifest), other, hospital)
    with pytest.raises(UntrustedApp, match="is not the one the manifest signs"):
        approve_task(*_task(hospital, _manifest()), other, hospital)


def test_expired_and_replayed_manifests_are_refused(hospital):
    expired = _manifest(expires=int(time.time()) - 1)
    with pytest.raises(UntrustedApp, match="expired"):
        approve_task(*_task(hospital, expired), BUNDLE, hospital)
    manifest = _manifest(run="b" * 32)
    approve_task(*_task(hospital, manifest, flower_run_id=7), BUNDLE, hospital)
    with pytest.raises(UntrustedApp, match="was used before at this hospital"):
        approve_task(*_task(hospital, manifest, flower_run_id=8), BUNDLE, hospital)


@pytest.mark.parametrize("node_config, overrides, expected", [
    ({"min-batch-size": 16}, ["train.batch_size=8"],
     "asks for train.batch_size=8, but this hospital's node config sets min-batch-size=16"),
    ({"allow-plain-metrics": False}, ["dp.enabled=false"], "allow-plain-metrics=false"),
    ({"min-batch-size": "16"}, [], "must be a positive whole number"),
])
def test_a_run_beyond_the_hospitals_limits_is_refused_naming_both_values(hospital, node_config, overrides, expected):
    with pytest.raises(RunRefused, match=expected):
        approve_task(*_task(hospital, _manifest(overrides), node_config=node_config), BUNDLE, hospital)
    assert not hospital.accepted_runs.exists()  # a refused run is not spent


def test_the_hospitals_own_overrides_count_towards_its_limits(hospital):
    node_config = {"min-batch-size": 16, "dermfed-overrides": "train.batch_size=32"}
    approve_task(*_task(hospital, _manifest(["train.batch_size=8"]), node_config=node_config), BUNDLE, hospital)


def test_approvals_are_sha256_lines_with_notes(hospital):
    text = hospital.approved_bundles.read_text()
    assert text.startswith(bundle_sha256(BUNDLE) + "  # approved ")
    assert approve(hospital.root, bundle_sha256(BUNDLE).upper()) is False  # already there
    hospital.approved_bundles.write_text(text + "not-a-hash\n")
    with pytest.raises(ValueError, match="not a sha256"):
        read_approved_bundles(hospital.approved_bundles)


@pytest.mark.parametrize("preset", ["paper", "demo", "smoke"])
def test_the_config_the_serverapp_sends_is_exactly_the_signed_one(preset):
    """The ServerApp rebuilds the config from the manifest and sends config_to_json of it: the same JSON."""
    from common.config import build_config
    from common.run_manifest import _same

    signed = json.loads(config_to_json(load_config(preset, ["train.lr=1"])))
    carried = base64.urlsafe_b64encode(_manifest(dermfed_config=signed).encode()).decode()
    sent = json.loads(config_to_json(build_config(RunManifest.decode(carried).dermfed_config)))
    assert _same(sent, signed)


def test_the_clientapp_is_loaded_only_from_the_approved_bundles_own_folder(tmp_path, monkeypatch):
    """Flower imports the ClientApp from the folder the run's fab_id and fab_version name (the coordinator's
    values); one naming another installed app, or another hash, is refused after install, before any import."""
    from flwr.common.config import get_project_dir

    from client.trusted_app import check_installed_app

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    digest = bundle_sha256(BUNDLE)
    installed = get_project_dir("dermfed/dermfed", "1.0.0", digest)  # where install_from_fab put the approved bundle
    check_installed_app(installed, "dermfed/dermfed", "1.0.0", digest, BUNDLE)
    older = bundle_sha256(b"an older approved release")
    for fab_id, version, fab_hash in [("dermfed/dermfed", "0.9.0", digest), ("other/app", "1.0.0", digest),
                                      ("dermfed/dermfed", "1.0.0", older), ("no-slash", "1.0.0", digest)]:
        with pytest.raises(UntrustedApp, match="not the approved bundle it carries"):
            check_installed_app(installed, fab_id, version, fab_hash, BUNDLE)


def test_a_fedprox_task_carries_exactly_the_signed_proximal_term(hospital):
    """The coordinator may send only the mu it signed: a larger pull toward its global weights is refused."""
    manifest = _manifest(["federation.strategy=fedprox", "federation.proximal_mu=0.1"])
    approve_task(*_task(hospital, manifest, instruction={"proximal-mu": 0.1}), BUNDLE, hospital)
    for asked in (0.5, 0.0, float("nan"), float("inf")):
        with pytest.raises(UntrustedApp, match=r"proximal-mu .* is not the signed run's \(0.1\)"):
            approve_task(*_task(hospital, manifest, instruction={"server-round": 2, "proximal-mu": asked}), BUNDLE,
                         hospital)


def test_a_registered_strategys_own_instruction_keys_are_checked_against_the_signed_run(hospital):
    """A strategy module declares what its Flower class adds to an instruction (`Strategy.instruction`): the hospital
    accepts those keys with the signed values, and nothing else: no list of keys to edit elsewhere."""
    from common.strategies import STRATEGIES, Strategy, register

    register(Strategy(name="toy-signed", flower_class="FedAvg", config_keys=("server_lr",),
                      instruction=lambda federation: {"toy-rate": float(federation["server_lr"])}))
    try:
        manifest = _manifest(["federation.strategy=toy-signed", "federation.server_lr=0.5"])
        approve_task(*_task(hospital, manifest, instruction={"toy-rate": 0.5}), BUNDLE, hospital)
        with pytest.raises(UntrustedApp, match=r"toy-rate 2.0 is not the signed run's \(0.5\)"):
            approve_task(*_task(hospital, manifest, instruction={"server-round": 2, "toy-rate": 2.0}), BUNDLE, hospital)
        with pytest.raises(UntrustedApp, match=r"keys the signed run does not cover: \['proximal-mu'\]"):
            approve_task(*_task(hospital, manifest, instruction={"server-round": 2, "proximal-mu": 0.5}), BUNDLE,
                         hospital)
    finally:
        STRATEGIES.pop("toy-signed")


def test_a_second_signed_run_cannot_take_over_a_flower_run_mid_way(hospital):
    """Each round is a new ClientApp process, so the config a site keeps for a run lives in its ledger: round 2 of
    Flower run 7 under another signed manifest (another batch size, split and seed) is refused."""
    first = _manifest(run="c" * 32)
    approve_task(*_task(hospital, first, flower_run_id=7), BUNDLE, hospital)
    other = _manifest(["train.batch_size=4", "data.val_fraction=0.4", "seed=99"], run="d" * 32)
    with pytest.raises(UntrustedApp, match=r"Flower run 7 already runs the signed run c{32}"):
        approve_task(*_task_of(hospital, other, round_number=2, flower_run_id=7), BUNDLE, hospital)
    assert "d" * 32 not in json.loads(hospital.accepted_runs.read_text())


def test_a_signed_run_identifier_cannot_carry_another_manifest_mid_way(hospital):
    """The operator chooses the run identifier it signs: round 2 of Flower run 7 under a second manifest that reuses
    round 1's identifier, with another config (batch size, split, seed, more rounds), is refused: a run identifier
    stands for the one manifest the hospital first accepted under it."""
    first = _manifest(run="e" * 32)
    approve_task(*_task(hospital, first, flower_run_id=7), BUNDLE, hospital)
    other = _manifest(["train.batch_size=4", "data.val_fraction=0.4", "seed=99", "federation.num_rounds=50"],
                      run="e" * 32)
    with pytest.raises(UntrustedApp, match=r"another manifest"):
        approve_task(*_task_of(hospital, other, round_number=2, flower_run_id=7), BUNDLE, hospital)
    assert "train-2" not in json.loads(hospital.accepted_runs.read_text())["e" * 32]["tasks"]


def test_a_signed_proximal_term_too_large_to_train_with_is_refused_before_any_training(hospital):
    """mu = 1e39 is a finite float64, so the config took it, but in float32 the proximal gradient is inf * 0 = NaN
    at the first step: a DP site would reserve a round's budget, diverge and send nothing. Refused at approval."""
    valid = _manifest(["federation.strategy=fedprox"], run="f" * 32)
    config = json.loads(json.dumps(valid.dermfed_config))
    config["federation"]["proximal_mu"] = 1e39
    manifest = RunManifest(**{**valid.__dict__, "dermfed_config": config})
    with pytest.raises(UntrustedApp, match="proximal_mu"):
        approve_task(*_task(hospital, manifest, instruction={"proximal-mu": 1e39}), BUNDLE, hospital)
