"""Runs that hospitals approve: a manifest the operator signs, checked at each hospital before any code loads.

Flower's own `--trusted-entities` verifies only bundles that Flower Hub has signed, and a
signature over a bundle alone would approve it forever, with any run configuration. DermFed's
operator therefore signs a *run manifest* on its own workstation (`dermfed deploy sign`):

- `bundle_sha256`: the app bundle (FAB) the run executes;
- `run_config`: the COMPLETE Flower run config of the run (every key the ServerApp and the
  ClientApp read: run folder, resume, site registry, ...);
- `dermfed_config`: the complete DermFed config after overrides, the one config of the run: the
  ServerApp and every site read it from the manifest itself;
- `federation`: the federation it is meant for; `run`: a fresh random identifier (a hospital
  accepts it for one Flower run only); `expires`: after this time no hospital starts it.

The SuperLink's server only forwards the manifest (`run-manifest`, `run-manifest-signature` in
the run config). Each hospital's verifying ClientApp process (`client.trusted_app`) checks the
signature, then everything the manifest says against what it is asked to run
(`check_task`), before the bundle is installed or imported.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common import flower_keys as keys
from common.deployment.files import replace_file

MANIFEST_KEY = keys.RUN_MANIFEST  # run config keys that carry the manifest and its signature
SIGNATURE_KEY = keys.RUN_MANIFEST_SIGNATURE
CARRIER_KEYS = (MANIFEST_KEY, SIGNATURE_KEY)
_DOMAIN = b"dermfed-run-manifest-v1\0"  # a signature over a manifest can be nothing else
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class UntrustedApp(RuntimeError):
    """This hospital does not run what it was asked to; none of the bundle's code was loaded.

    The message holds only hashes, key names and values of the signed run, never a path or
    anything of the hospital's data: it goes back to the coordinator as the task's error.
    """


@dataclass(frozen=True)
class RunManifest:
    federation: str
    run: str
    expires: int  # Unix time (seconds)
    bundle_sha256: str
    run_config: dict[str, Any]
    dermfed_config: dict[str, Any]

    def encode(self) -> bytes:
        return canonical(asdict(self))

    @classmethod
    def decode(cls, encoded: str) -> "RunManifest":
        """The manifest as carried in the run config (base64 of its canonical JSON); not verified."""
        try:
            raw = json.loads(base64.urlsafe_b64decode(encoded.encode("ascii")))
            return cls(**raw)
        except (ValueError, TypeError, UnicodeError) as exc:
            raise UntrustedApp(f"the {MANIFEST_KEY} is not a DermFed run manifest ({type(exc).__name__})") from None


def canonical(value: Any) -> bytes:
    """One byte string per value: sorted keys, no spaces, types kept (true is not 1)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _same(a: Any, b: Any) -> bool:
    """Equal as signed: the same JSON, types included (true is not 1, 1 is not 1.0)."""
    try:
        return canonical(a) == canonical(b)
    except (TypeError, ValueError):  # NaN, infinities or objects JSON cannot hold: never what was signed
        return False


def bundle_sha256(bundle: bytes) -> str:
    return hashlib.sha256(bundle).hexdigest()


# -- keys --------------------------------------------------------------------------------------


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_trusted_keys(path: Path) -> list[Ed25519PublicKey]:
    """One `ssh-ed25519 AAAA... comment` line per trusted key; other lines are ignored."""
    keys = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("ssh-ed25519 "):
            key = serialization.load_ssh_public_key(line.encode("ascii"))
            assert isinstance(key, Ed25519PublicKey)
            keys.append(key)
    if not keys:
        raise ValueError(f"{path} holds no ssh-ed25519 public key")
    return keys


# -- signing and verifying ---------------------------------------------------------------------


def sign_manifest(manifest: RunManifest, key: Ed25519PrivateKey) -> tuple[str, str]:
    """(manifest, signature), both base64 text for the run config."""
    encoded = manifest.encode()
    signature = key.sign(_DOMAIN + encoded)
    return base64.urlsafe_b64encode(encoded).decode("ascii"), base64.urlsafe_b64encode(signature).decode("ascii")


def verify_manifest(encoded: str, signature: str, trusted: list[Ed25519PublicKey]) -> RunManifest:
    """The manifest, if one trusted key signed exactly these bytes; UntrustedApp otherwise."""
    if not encoded or not signature:
        raise UntrustedApp(f"the run carries no signed run manifest ({MANIFEST_KEY}); this hospital runs only runs "
                           "its coordinator's operator signed (dermfed deploy sign)")
    try:
        raw_manifest = base64.urlsafe_b64decode(encoded.encode("ascii"))
        raw_signature = base64.urlsafe_b64decode(signature.encode("ascii"))
    except (ValueError, UnicodeError):
        raise UntrustedApp("the run manifest or its signature is not valid base64") from None
    for key in trusted:
        try:
            key.verify(raw_signature, _DOMAIN + raw_manifest)
            break
        except InvalidSignature:
            continue
    else:
        raise UntrustedApp("the run manifest is not signed by a key this hospital trusts; none of the bundle's code "
                           "was loaded")
    return RunManifest.decode(encoded)


def check_task(manifest: RunManifest, *, federation: str, bundle: bytes, run_config: Mapping[str, Any],
               instruction: Mapping[str, Any], approved_bundles: set[str]) -> None:
    """Raise UntrustedApp unless this task is exactly what the signed manifest approves (expiry and
    run identifier are the run ledger's: `RunLedger.admit`)."""
    digest = bundle_sha256(bundle)
    if digest != manifest.bundle_sha256:
        raise UntrustedApp(f"the app bundle (sha256 {digest}) is not the one the manifest signs "
                           f"({manifest.bundle_sha256}); none of its code was loaded")
    if digest not in approved_bundles:
        raise UntrustedApp(f"the app bundle sha256 {digest} is not approved by this hospital; its operator reviews "
                           f"a release and approves it with `dermfed node approve {digest}`")
    if manifest.federation != federation:
        raise UntrustedApp(f"the run manifest is for federation {manifest.federation}, not this hospital's "
                           f"({federation})")
    asked = {k: v for k, v in run_config.items() if k not in CARRIER_KEYS}
    changed = sorted(k for k in set(asked) | set(manifest.run_config)
                     if k not in asked or k not in manifest.run_config or not _same(asked[k], manifest.run_config[k]))
    if changed:
        raise UntrustedApp(f"the run config differs from the signed one in {changed}: "
                           f"asked {[asked.get(k) for k in changed]}, signed {[manifest.run_config.get(k) for k in changed]}")
    if not str(manifest.run_config.get(keys.SITE_REGISTRY, "")):
        raise UntrustedApp("the signed run has no site-registry: in a real federation every update must be "
                           "recorded under the name of the key that sent it")
    if str(manifest.run_config.get(keys.FAULT_INJECTION, "")):
        raise UntrustedApp("the signed run asks for fault-injection, a simulation-only test switch")
    check_instruction(manifest, instruction)


def check_instruction(manifest: RunManifest, instruction: Mapping[str, Any]) -> None:
    """A train or evaluate instruction carries nothing the manifest does not cover (no config of its own: the site
    trains with the signed one), a round of the signed run and only what the signed strategy's Flower class sends,
    with the signed values (FedProx: the signed proximal term; `common.strategies`, `Strategy.instruction`)."""
    from common.strategies import UnknownStrategy, strategy_named

    federation = manifest.dermfed_config.get("federation", {})
    try:
        expected = strategy_named(str(federation.get("strategy"))).instruction(federation)
    except (UnknownStrategy, KeyError, TypeError, ValueError) as exc:
        raise UntrustedApp(f"the signed run's strategy {federation.get('strategy')!r} is not one this hospital's "
                           f"DermFed knows ({exc})") from None
    extra = sorted(set(instruction) - {keys.SERVER_ROUND} - set(expected))
    if extra:
        raise UntrustedApp(f"the instruction carries keys the signed run does not cover: {extra}")
    round_number = instruction.get(keys.SERVER_ROUND)
    if not isinstance(round_number, int) or not 1 <= round_number <= int(federation.get("num_rounds", 0)):
        raise UntrustedApp(f"the instruction's server-round {round_number!r} is outside the signed run's rounds "
                           f"(1..{federation.get('num_rounds')})")
    for key, signed in expected.items():
        if key in instruction and not _same(instruction[key], signed):
            raise UntrustedApp(f"the instruction's {key} {instruction[key]!r} is not the signed run's ({signed!r})")


# -- the hospital's approvals and its record of runs -------------------------------------------


def read_approved_bundles(path: Path) -> set[str]:
    """The bundle hashes a hospital approved: one sha256 per line, `#` starts a comment."""
    if not Path(path).is_file():
        return set()
    hashes = set()
    for line in Path(path).read_text().splitlines():
        entry = line.split("#", 1)[0].strip().lower()
        if entry:
            if not SHA256.match(entry):
                raise ValueError(f"{path}: {entry!r} is not a sha256 (64 hexadecimal digits)")
            hashes.add(entry)
    return hashes


def approve_bundle(path: Path, digest: str, note: str = "") -> bool:
    """Add a bundle hash to the approvals file; False if it was approved already."""
    digest = digest.strip().lower()
    if not SHA256.match(digest):
        raise ValueError(f"{digest!r} is not a sha256 (64 hexadecimal digits; `dermfed node bundle-hash` prints it)")
    if digest in read_approved_bundles(path):
        return False
    previous = Path(path).read_bytes() if Path(path).is_file() else b""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    note = " ".join(note.split())  # one line: a note never adds another approval
    line = f"{digest}  # approved {stamp}{' ' + note if note else ''}\n".encode()
    replace_file(Path(path), previous + (b"" if not previous or previous.endswith(b"\n") else b"\n") + line)
    return True


TASK_KINDS = ("train", "evaluate")  # the instructions a signed run sends; each once per round


def run_deadline(manifest: RunManifest) -> float:
    """After this no task of the run is accepted: its expiry (the latest start), then at most num_rounds rounds,
    each a train and an evaluate phase that the server waits at most federation.round_timeout for."""
    federation = manifest.dermfed_config.get("federation", {})
    rounds = int(federation.get("num_rounds", 0))
    timeout = float(federation.get("round_timeout", 0.0))
    return manifest.expires + rounds * len(TASK_KINDS) * timeout


class RunLedger:
    """The run identifiers a hospital accepted, each bound to the one Flower run it started, and each
    task (round and kind) of it this hospital was asked for.

    Every task starts a new ClientApp process that checks the manifest again: the same identifier with
    the same Flower run id continues that run until `run_deadline`; the same identifier with another run
    id is a replay and refused, and so is another identifier with a Flower run id already bound, or the same
    identifier with another manifest (the operator chooses the identifier it signs): a run keeps the one config it
    started with, across the processes of its rounds. A task is `started` when admitted and `answered` once its reply exists
    (`answered`); a task already answered is refused, and one that started without an answer (the
    process died) may be tried once more (`retried`), never again.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = json.loads(self.path.read_text()) if self.path.is_file() else {}
            yield entries

    def _save(self, entries: dict[str, Any]) -> None:
        replace_file(self.path, json.dumps(entries, indent=1).encode())  # atomic, 0600

    @staticmethod
    def task_name(kind: str, round_number: int) -> str:
        if kind not in TASK_KINDS:
            raise UntrustedApp(f"the task is a {kind!r} instruction; a signed run sends only {list(TASK_KINDS)}")
        return f"{kind}-{int(round_number)}"

    def admit(self, manifest: RunManifest, flower_run_id: int, kind: str, round_number: int,
              now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        task = self.task_name(kind, round_number)
        digest = hashlib.sha256(manifest.encode()).hexdigest()
        with self._locked() as entries:
            known = entries.get(manifest.run)
            if known is None:
                bound = sorted(run for run, entry in entries.items() if int(entry["flower_run_id"]) == int(flower_run_id))
                if bound:  # one Flower run, one signed config: a second manifest cannot take over a run mid-way
                    raise UntrustedApp(f"Flower run {flower_run_id} already runs the signed run {bound[0]} at this "
                                       f"hospital; a Flower run carries one signed run, and {manifest.run} is another")
                if now >= manifest.expires:
                    raise UntrustedApp(f"the run manifest expired at {_utc(manifest.expires)} (now {_utc(now)}); the "
                                       "operator signs a new one")
                known = entries[manifest.run] = {"flower_run_id": int(flower_run_id), "accepted": _utc(now),
                                                 "bundle_sha256": manifest.bundle_sha256, "manifest_sha256": digest}
            elif int(known["flower_run_id"]) != int(flower_run_id):
                raise UntrustedApp(f"the run identifier {manifest.run} was used before at this hospital (Flower "
                                   f"run {known['flower_run_id']}); a signed run is accepted once")
            elif known.setdefault("manifest_sha256", digest) != digest:  # the operator chooses the identifier it signs
                raise UntrustedApp(f"the run identifier {manifest.run} came with another manifest (sha256 "
                                   f"{known['manifest_sha256']}) when this hospital accepted it; a run keeps the one "
                                   f"signed config it started with, and this manifest ({digest}) is not it")
            if now >= run_deadline(manifest):
                raise UntrustedApp(f"the signed run ended at {_utc(run_deadline(manifest))} (its expiry plus "
                                   f"num_rounds x 2 x round_timeout; now {_utc(now)}); the operator signs a new one")
            tasks = known.setdefault("tasks", {})
            state = tasks.get(task)
            if state in ("answered", "retried"):
                raise UntrustedApp(f"this hospital already {'answered' if state == 'answered' else 'tried twice'} "
                                   f"{task.replace('-', ' round ')} of this run; each round is answered once")
            tasks[task] = "started" if state is None else "retried"
            self._save(entries)

    def answered(self, manifest: RunManifest, kind: str, round_number: int) -> None:
        """The task's reply exists: it is never computed again."""
        task = self.task_name(kind, round_number)
        with self._locked() as entries:
            entries.setdefault(manifest.run, {}).setdefault("tasks", {})[task] = "answered"
            self._save(entries)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
