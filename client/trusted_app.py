"""At a hospital, run only runs the hospital approved (see common.run_manifest), and sign what it sends back.

A SuperNode started with `--isolation process` runs no app code itself: a SuperExec asks it for
tasks and starts one `flwr-clientapp` process per task, which pulls the message, the run and the
bundle, installs the bundle and imports its ClientApp. DermFed's two entry points wrap exactly
that, with Flower's own code:

- `dermfed-superexec`: Flower's SuperExec, launching `dermfed-clientapp` instead of
  `flwr-clientapp`;
- `dermfed-clientapp`: Flower's ClientApp process which, right after pulling the task and before
  the bundle is installed or imported, checks (`approve_task`): the run manifest's signature
  against the operator keys the hospital trusts, the bundle's sha256 against the manifest and
  against the hospital's own approved list, the federation and the complete run config against
  the signed ones, that the instruction carries nothing but a round of the signed run (the DermFed
  config is the signed manifest's, which the ClientApp reads), the hospital's limits
  (`min-batch-size`, `allow-plain-metrics` in its node config), the first time it sees the
  run, the expiry and that the run identifier was never used for another run here, and for every
  task that the run has not ended (`run_deadline`) and that this round's train or evaluate
  instruction was not answered before (`RunLedger`, in accepted-runs.json). Any failure
  ends the task with `UntrustedApp`: the server receives that error, and none of the bundle's
  code ran. After installing, it checks that the folder Flower imports the ClientApp from (named by
  the run's fab_id, fab_version and hash) is the one the approved bundle was installed to. When it
  pushes a reply, it records the round as answered and signs the reply with the hospital's node key
  (`common.reply_signature`), so that nobody else can send an update under this node's id.

The hospital's folder (keys, approvals, accepted runs) is named by `DERMFED_HOSPITAL_DIR`, which
`dermfed node` sets.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from client.node import HOSPITAL_DIR_ENV
from common import flower_keys as keys
from common.deployment.layout import HospitalLayout
from common.reply_signature import RECORD_KEY, load_node_key, reply_digest, sign_reply
from common.run_manifest import (MANIFEST_KEY, SIGNATURE_KEY, RunLedger, RunManifest, UntrustedApp, bundle_sha256,
                                 check_task, load_trusted_keys, read_approved_bundles, verify_manifest)

# what DermFed's ServerApp sends: the global weights and the instruction's config record (its round, FedProx's mu)
INSTRUCTION_RECORDS = {keys.ARRAYS_RECORD, keys.CONFIG_RECORD}


class RunRefused(UntrustedApp):
    """The signed run asks more of this hospital than its node config allows (names both values)."""


def hospital_folder() -> HospitalLayout:
    value = os.environ.get(HOSPITAL_DIR_ENV, "")
    layout = HospitalLayout(Path(value))
    if not value or not layout.trusted_keys.is_file() or not layout.settings_file.is_file():
        raise UntrustedApp(f"{HOSPITAL_DIR_ENV} must name this hospital's folder, with trusted-app-keys.pub and "
                           f"hospital.json (got {value!r}); refusing to run any app bundle")
    return layout


def check_limits(dermfed_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
    """The hospital's limits on what any run may ask of it, applied to the config it would train with."""
    from client.policy import node_overrides
    from common.config import ConfigError, apply_overrides, build_config

    try:
        config = apply_overrides(build_config(json.loads(json.dumps(dermfed_config))),
                                 node_overrides(node_config))
    except ConfigError as exc:
        raise RunRefused(f"the signed DermFed config cannot be applied here ({exc})") from None
    minimum = node_config.get("min-batch-size")
    if minimum is not None:
        if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 1:
            raise RunRefused(f"node config min-batch-size={minimum!r} must be a positive whole number")
        if config.train.batch_size < minimum:
            raise RunRefused(f"the run asks for train.batch_size={config.train.batch_size}, but this hospital's node "
                             f"config sets min-batch-size={minimum}")
    plain = node_config.get("allow-plain-metrics", True)
    if not isinstance(plain, bool):
        raise RunRefused(f"node config allow-plain-metrics={plain!r} must be true or false")
    if not plain and not config.dp.enabled:
        raise RunRefused("the run asks for dp.enabled=false, which sends this site's losses and image count without "
                         "DP, but this hospital's node config sets allow-plain-metrics=false")


def approve_task(message: Any, context: Any, fab_content: bytes, hospital: HospitalLayout,
                 now: Optional[float] = None) -> RunManifest:
    """Everything a hospital checks before a task's bundle is installed; raises UntrustedApp (or RunRefused)."""
    run_config = dict(context.run_config)
    manifest = verify_manifest(str(run_config.get(MANIFEST_KEY, "")), str(run_config.get(SIGNATURE_KEY, "")),
                               load_trusted_keys(hospital.trusted_keys))
    records = sorted(set(message.content.keys()) - INSTRUCTION_RECORDS)
    if records:
        raise UntrustedApp(f"the instruction carries records the signed run does not cover: {records}")
    config_records = message.content.config_records
    instruction = dict(config_records[keys.CONFIG_RECORD]) if keys.CONFIG_RECORD in config_records else {}
    try:
        approved = read_approved_bundles(hospital.approved_bundles)
    except ValueError as exc:
        raise UntrustedApp(f"this hospital's approved-bundles file is unreadable ({exc})") from None
    check_task(manifest, federation=str(hospital.settings()["federation_id"]), bundle=fab_content,
               run_config=run_config, instruction=instruction, approved_bundles=approved)
    check_limits(manifest.dermfed_config, context.node_config)
    RunLedger(hospital.accepted_runs).admit(manifest, int(context.run_id), str(message.metadata.message_type),
                                            int(instruction[keys.SERVER_ROUND]), time.time() if now is None else now)
    return manifest


def record_answer(message: Any, manifest: RunManifest, hospital: HospitalLayout) -> None:
    """This task's reply exists: the hospital never computes it again (`RunLedger`)."""
    round_number = int(message.content.config_records[keys.CONFIG_RECORD][keys.SERVER_ROUND])
    RunLedger(hospital.accepted_runs).answered(manifest, str(message.metadata.message_type), round_number)


def check_installed_app(installed: Path, fab_id: str, fab_version: str, fab_hash: str, fab_content: bytes) -> None:
    """Flower loads the ClientApp from the folder named by the run's fab_id, fab_version and fab hash, which the
    coordinator supplies; refuse unless that folder is the one the approved bundle was just installed to (its own
    pyproject's name and version, its own sha256), so that no other installed app is imported instead."""
    from flwr.common.config import get_project_dir

    digest = bundle_sha256(fab_content)
    try:
        named = get_project_dir(fab_id, fab_version, fab_hash)
    except ValueError:
        named = None
    if fab_hash != digest or named is None or Path(named).resolve() != Path(installed).resolve():
        raise UntrustedApp(f"the run names app {fab_id!r} version {fab_version!r} (hash {fab_hash[:16]}...), which is "
                           f"not the approved bundle it carries (sha256 {digest}); none of its code was loaded")


def sign_reply_in_place(reply: Any, key: Any, run_id: int, node_id: int, round_number: int) -> None:
    """Add the node key's signature over this reply's arrays and metrics, run, round, instruction and node id."""
    from flwr.app import ConfigRecord

    signature = sign_reply(key, run_id, round_number, node_id, str(reply.metadata.reply_to_message_id),
                           reply_digest(reply.content))
    reply.content[RECORD_KEY] = ConfigRecord({"signature": signature, "round": round_number})


def clientapp_main() -> None:
    """`dermfed-clientapp`: flwr-clientapp, approving the task before installing its bundle, signing its reply."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli import flwr_clientapp

    pull, install, push = runtime.pull_task_input, runtime.install_from_fab, runtime.push_message
    task: dict[str, Any] = {}

    def pull_remembering_task(client):  # type: ignore[no-untyped-def]
        message, context, run, fab = pull(client)
        task.update(message=message, context=context, run=run, fab=fab)
        return message, context, run, fab

    def install_if_approved(fab_content: bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
        manifest = approve_task(task["message"], task["context"], fab_content, hospital_folder())
        task["manifest"] = manifest  # from here on, this round's task counts as started (RunLedger)
        installed = install(fab_content, *args, **kwargs)
        check_installed_app(installed, task["run"].fab_id, task["run"].fab_version, task["fab"].hash_str, fab_content)
        return installed

    def push_signed(client, message, context):  # type: ignore[no-untyped-def]
        if "manifest" in task:  # a reply exists (an error reply too): this round is never computed again
            record_answer(task["message"], task["manifest"], hospital_folder())
        if not message.has_error():
            config = task["message"].content.config_records.get(keys.CONFIG_RECORD, {})
            sign_reply_in_place(message, load_node_key(hospital_folder().node_key), int(context.run_id),
                                int(context.node_id), int(config.get(keys.SERVER_ROUND, 0)))
        return push(client, message, context)

    runtime.pull_task_input = pull_remembering_task
    runtime.install_from_fab = install_if_approved
    runtime.push_message = push_signed
    flwr_clientapp()


def superexec_main() -> None:
    """`dermfed-superexec`: Flower's SuperExec, with `dermfed-clientapp` as the ClientApp process."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    hospital_folder()  # fail at start-up, not at the first task
    launcher = shutil.which("dermfed-clientapp", path=str(Path(sys.executable).parent)) or "dermfed-clientapp"
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = launcher  # the executor looks the command up here per task
    flower_superexec()
