"""A hospital's side of a federated round, in plain PyTorch (Flower stays in client_app.py).

Each round a site receives the global shared weights (the encoder, or the whole VAE), trains
its VAE locally, optionally with DP-SGD, and returns the shared weights and scalar metrics
(under DP only its privacy status; see `client.policy`). Nothing else leaves the site: no
images, file names, per-sample values or private weights.

What a site keeps between rounds (optimizer, step, private decoder) is a snapshot per round,
written to the site's state folder (and nowhere else: not into Flower's context, which the
simulation engine would copy to and from its worker at every message), so a restarted daemon
or a resumed run continues from the last completed round. The DP accountant is kept
in an append-only privacy ledger beside it and never rewound: an update that left the site
was a release, even if the server later crashed and the round is repeated. Before a DP call's
first noisy step the ledger already counts all of the call's steps (a reservation, synced to
disk), so a round that fails half-way has spent them. A ledger that is missing, unreadable or
incomplete where the site has trained before is refused, never taken for a fresh site.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import torch

from client.policy import (
    ClientEvaluationRefused,
    PrivacyFloor,
    PrivacyLedgerCorrupt,
    SiteBusy,
    SiteStateCorrupt,
    TooFewImages,
    node_overrides,
    override_keys,
    reply_metrics,
    site_state_dir,
)
from common.config import DermFedConfig, build_config
from common.data.batches import ImageRows, ordered_batches, read_batch, to_device_float
from common.data.catalog import DataError
from common.data.partition import partition_catalog
from common.data.pipeline import PreparedData, ensure_cache, prepare_data
from common.model import build_model, load_partial_state, private_state, shared_keys, shared_state
from common.run_files import atomic_write_bytes
from common.run_folder import locked_fingerprint
from common.serialization import read_site_snapshot, write_site_snapshot
from common.strategies import client_hooks
from common.compression import compress_update, seeded_generator
from common.privacy import group_epsilon, secret_generator, with_planned_steps
from common.training import DPPlan, LocalTrainer, SiteState, seed_everything

log = logging.getLogger("dermfed.client")

SNAPSHOTS_KEPT = 3
ROUND_LOCK = "round.lock"
ROUNDING_STREAM = 50_000  # without DP, a compressed update's rounding draws from seed, this, site, round


@contextlib.contextmanager
def one_round_at_a_time(state_dir: Path) -> Iterator[None]:
    """Hold the site's exclusive lock (`flock` on <state-dir>/round.lock) for a whole round: ledger load,
    reservation, training, save. A second round at the same site, from another run of the coordinator or
    another process, is refused at once (`SiteBusy`), so two runs cannot overwrite each other's ledger."""
    state_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(state_dir / ROUND_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SiteBusy(f"{state_dir} is locked by another round in progress at this site") from None
        yield
    finally:
        os.close(descriptor)  # releases the lock, also when the round failed


def _holding_the_site_lock(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(self: "SiteRunner", *args: Any, **kwargs: Any) -> Any:
        with one_round_at_a_time(self.state_dir):
            return method(self, *args, **kwargs)

    return locked


@dataclass
class SiteData:
    name: str
    index: int
    prepared: PreparedData
    train_rows: np.ndarray
    val_rows: np.ndarray


def _site_rows(config: DermFedConfig, prepared: PreparedData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    split = prepared.catalog.frame["split"].to_numpy()
    train = rows[np.isin(split[rows], config.data.pretrain_splits)]
    val = rows[split[rows] == "val"]
    return train, val


def simulation_site_data(config: DermFedConfig, partition_id: int, num_partitions: int) -> SiteData:
    """Virtual hospital `partition_id` of the pooled data set (`data.partition`)."""
    prepared = prepare_data(config)
    parts, names = partition_catalog(prepared.catalog, config.data.partition, config.data.num_partitions,
                                     config.data.dirichlet_alpha, config.seed)
    if len(parts) != num_partitions:
        raise DataError(f"the data has {len(parts)} partitions ({names}) but the simulation runs {num_partitions} nodes")
    train, val = _site_rows(config, prepared, parts[partition_id])
    return SiteData(names[partition_id], partition_id, prepared, train, val)


def deployment_site_data(config: DermFedConfig, node_config: Mapping[str, Any]) -> SiteData:
    """A real hospital's own image folder, from the SuperNode's --node-config."""
    if "data-root" not in node_config:
        raise DataError('this SuperNode has no data: start it with --node-config "data-root=/path/to/images"')
    tree = config.model_dump(mode="json")
    tree["data"].update(root=str(node_config["data-root"]), format=str(node_config.get("data-format", "folder")),
                        **hospital_data_paths(node_config))
    config = build_config(tree)  # validated: a wrong data-format is an error that lists the formats
    ensure_cache(config.data)  # the site's cache, built before it reads (reading never writes)
    prepared = prepare_data(config)
    rows = np.arange(len(prepared.catalog))
    train, val = _site_rows(config, prepared, rows)
    return SiteData(deployment_site_name(node_config), int(node_config.get("site-index", 0)), prepared, train, val)


def hospital_data_paths(node_config: Mapping[str, Any]) -> dict[str, Optional[str]]:
    """The `data.*` paths of a real hospital, never the coordinator's: its preprocessing cache (a decoded copy of
    all its images) in its state folder (`<state-dir>/<site>/cache`), its metadata CSVs found in its data-root;
    a path its own `dermfed-overrides` sets stays (the config already holds it, so it is left out here)."""
    own = set(override_keys(node_overrides(node_config)))
    defaults = {"cache_dir": str(site_state_dir(node_config, deployment_site_name(node_config)) / "cache"),
                "metadata_csv": None, "ham_metadata_csv": None}
    return {key: value for key, value in defaults.items() if f"data.{key}" not in own}


def deployment_site_name(node_config: Mapping[str, Any]) -> str:
    """A real hospital's name, from its node config alone (`site-name`, else its data folder's name)."""
    return str(node_config.get("site-name", Path(str(node_config.get("data-root", ""))).name))


class PrivacyLedger:
    """Append-only record of a site's DP accountant (and its calibrated noise), and the privacy floor
    in force when the site first trained with DP: later runs may ask for more privacy, never less.

    Written after every round, DP or not, so that a site that has trained always has one; before a DP
    call, it already counts the call's steps. Missing where snapshots exist, unreadable, or without
    its `floor` or `accountant`: `PrivacyLedgerCorrupt`, never a fresh start.
    """

    def __init__(self, path: Path):
        self.path = path

    def has_trained(self) -> bool:
        """The site has completed a round before: its state folder holds snapshots."""
        return any(self.path.parent.glob("round-*.pt"))

    def load(self) -> dict[str, Any]:
        if not self.path.is_file():
            if self.has_trained():
                raise PrivacyLedgerCorrupt(f"{self.path} is missing, but this site has trained before (its snapshots "
                                           "are there): restore the ledger from a backup, or, if these images were "
                                           "never used with DP, move the whole state folder aside")
            return {}
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise PrivacyLedgerCorrupt(f"{self.path} is unreadable ({type(exc).__name__}: {exc}); restore it from a "
                                       "backup") from None
        accountant = record.get("accountant") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("floor"), dict) \
                or not isinstance(accountant, dict) or not isinstance(accountant.get("history"), list):
            raise PrivacyLedgerCorrupt(f"{self.path} lacks its floor or its accountant history; restore it from a "
                                       "backup (a ledger is never started afresh where a site has trained)")
        return record

    def floor(self) -> PrivacyFloor:
        record = self.load()
        return PrivacyFloor.from_record(record["floor"]) if record else PrivacyFloor()

    def save(self, accountant: Optional[dict[str, Any]], noise_multiplier: Optional[float], floor: PrivacyFloor,
             mechanism: str) -> None:
        """Record the accountant (a reservation before a DP call, the result after it), synced to disk."""
        kept = self.load().get("floor")  # set by the first DP run; never loosened by a coordinator
        history = [list(h) for h in (accountant or {}).get("history", [])]
        record = {"accountant": {"history": history, "mechanism": (accountant or {}).get("mechanism", mechanism)},
                  "noise_multiplier": noise_multiplier,
                  "floor": kept if kept and kept.get("dp_required") else floor.as_record()}
        atomic_write_bytes(self.path, json.dumps(record, indent=1).encode())

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int, floor: PrivacyFloor,
                mechanism: str) -> dict[str, Any]:
        """Before a DP call's first noisy step: the ledger's own history plus this call's steps, synced."""
        accountant = with_planned_steps(self.load().get("accountant"), noise_multiplier, sample_rate, steps, mechanism)
        self.save(accountant, noise_multiplier, floor, mechanism)
        return accountant

    def close_round(self, noise_multiplier: Optional[float], floor: PrivacyFloor, mechanism: str) -> None:
        """After a round: the ledger keeps its own history (a DP call's steps are in it since its reservation);
        the round's in-memory accountant never overwrites it."""
        record = self.load()
        kept_noise = noise_multiplier if noise_multiplier is not None else record.get("noise_multiplier")
        self.save(record.get("accountant"), kept_noise, floor, mechanism)


def _on_cpu(tree: Any) -> Any:
    """`tree` (an optimizer state dict, a residual) with every tensor in host memory."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {key: _on_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(value) for value in tree)
    return tree


@dataclass
class RoundOutput:
    shared: dict[str, torch.Tensor]
    metrics: dict[str, float]


class SiteRunner:
    """Trains one site's model (the run's objective) round after round; owns the site's model and state."""

    def __init__(self, config: DermFedConfig, data: SiteData, state_dir: Path,
                 floor: PrivacyFloor = PrivacyFloor(), public_count: Optional[int] = None,
                 min_batch_size: Optional[int] = None):
        if len(data.train_rows) == 0:
            raise DataError(f"site {data.name}: no training images (splits {config.data.pretrain_splits})")
        self.min_batch = min_batch_size or 1  # the hospital's min-batch-size: see _require_at_least
        self.ledger = PrivacyLedger(Path(state_dir) / "privacy_ledger.json")
        self.floor = floor.stricter(self.ledger.floor())
        config = self.floor.apply(config)  # refuses a coordinator that asks for less privacy than the site allows
        self.config, self.data, self.state_dir = config, data, Path(state_dir)
        self.made_with = locked_fingerprint(config)  # a saved state continues only a run with these locked settings
        self.public_weight = float(public_count or 1)
        seed_everything(config.seed, 30_000, data.index)
        self.model = build_model(config.model, config.data.image_size)
        self.scope = config.federation.share
        self.images = ImageRows(data.prepared.store, data.train_rows)
        self._require_at_least(len(data.train_rows), "train on", "training")
        if config.train.batch_size < self.min_batch:
            raise TooFewImages(f"the run asks for train.batch_size={config.train.batch_size}, but this site's node "
                               f"config sets min-batch-size={self.min_batch}")
        self.trainer = LocalTrainer(config, self.model, self.images, site=data.name, site_index=data.index,
                                    declared_size=public_count, min_batch=1 if config.dp.enabled else self.min_batch)
        # DP budget: the whole federated run, every round's local steps
        self.trainer.planned_steps = config.dp.planned_steps or self.trainer.steps_per_call() * config.federation.num_rounds
        self.state = SiteState()
        self.round = 0
        self._release_device()  # the GPU is taken when this site trains, not while it waits for its first round

    def _require_at_least(self, rows: int, verb: str, split: str) -> None:
        """Refuse to compute anything from fewer images than the hospital's min-batch-size. Without DP this limit
        is the only protection against values of a few images: the coordinator sizes the splits (data.*)."""
        if rows < self.min_batch:
            log.warning("%s: %d %s images, fewer than min-batch-size=%d: refused", self.data.name, rows, split,
                        self.min_batch)
            raise TooFewImages(f"this run's data split (data.pretrain_splits, data.val_fraction, data.test_fraction) "
                               f"leaves this site fewer {split} images than its node config's "
                               f"min-batch-size={self.min_batch}; it refuses to {verb} them")

    def first_image_path(self) -> str:
        """A real file of this site (for the test-only fault switch, which mimics a file gone bad)."""
        return str(self.data.prepared.catalog.frame["path"].iloc[int(self.data.train_rows[0])])

    # -- state ------------------------------------------------------------------------------

    def snapshot_path(self, round_number: int) -> Path:
        return self.state_dir / f"round-{round_number:04d}.pt"

    def _restore(self, round_number: int) -> None:
        """Bring the site to the end of round `round_number - 1` (from memory, or its snapshot on disk)."""
        previous = round_number - 1
        if self.round == previous:
            return  # already there: the normal case within one run (and round 1 of a fresh site)
        on_disk = self.snapshot_path(previous)
        if previous > 0 and on_disk.is_file():
            try:
                stored_round, state, private, made_with = read_site_snapshot(on_disk)
            except Exception as exc:  # noqa: BLE001 - a torn or foreign file: never silently replaced by a fresh state
                raise SiteStateCorrupt(f"{self.data.name}: the saved state of round {previous} in {on_disk} is "
                                       f"unreadable ({type(exc).__name__}); restore it, or move it aside to restart "
                                       "this site from scratch") from None
            if made_with and made_with != self.made_with:  # another run's, with other locked settings (no DP, ...)
                log.warning("%s: the saved state of round %d in %s was made with other locked settings (dp.enabled, "
                            "federation.share, model, data, ...); this run does not continue it", self.data.name,
                            previous, on_disk)
            elif stored_round == previous:
                load_partial_state(self.model, private)
                self.state, self.round = state, previous
                log.info("%s: restored site state of round %d", self.data.name, previous)
                return
        if previous > 0:
            log.warning("%s: no state of round %d; the optimizer and private weights start fresh", self.data.name, previous)
        self.state, self.round = SiteState(), previous

    def _apply_ledger(self) -> None:
        """The accountant always comes from the ledger: every past release counts, rewound or not."""
        ledger = self.ledger.load()
        if ledger and ledger["accountant"]["history"]:
            self.state.accountant = ledger["accountant"]
            if self.config.dp.noise_multiplier is None:  # keep the noise calibrated when the budget was planned
                self.state.noise_multiplier = ledger.get("noise_multiplier")

    def _recorded_floor(self) -> PrivacyFloor:
        return self.floor.stricter(PrivacyFloor.of_config(self.config))

    def _reserve(self, plan: DPPlan) -> None:
        """Before the first noisy step: the ledger counts all of this call's steps (synced), so a failure spends them."""
        self.ledger.reserve(plan.noise_multiplier, plan.sample_rate, plan.steps, self._recorded_floor(),
                            self.config.dp.accountant)

    # -- rounds -----------------------------------------------------------------------------

    def _check_shared(self, shared: Mapping[str, torch.Tensor]) -> None:
        expected = set(shared_keys(self.model, self.scope))
        if set(shared) != expected:
            raise KeyError(f"{self.data.name}: received weights do not match federation.share={self.scope}")

    @_holding_the_site_lock
    def train_round(self, round_number: int, shared: Mapping[str, torch.Tensor],
                    instruction: Optional[Mapping[str, Any]] = None) -> RoundOutput:
        """One round's local training from the received `shared` weights; `instruction`: the round's train
        instruction (what the strategy's client hook is made from, e.g. FedProx's `proximal-mu`)."""
        self._check_shared(shared)
        self._restore(round_number)
        self._apply_ledger()
        self.model.to(self.trainer.device)
        load_partial_state(self.model, shared)
        if self.config.dp.enabled:  # a noise the coordinator chose that cannot meet the ceiling: refused, naming both
            plan = self.trainer.dp_plan(self.state)
            self.floor.check_noise(self.config.dp, plan.noise_multiplier, plan.sample_rate, plan.steps)
        hooks = client_hooks(self.config, instruction or {})
        for hook in hooks:
            hook.bind(self.model, shared)  # the plain model: by identity, before DP-SGD renames parameters
        result = self.trainer.train(self.state, hooks=hooks, before_noisy_steps=self._reserve)
        self.state, self.round = result.state, round_number
        self.ledger.close_round(self.state.noise_multiplier, self._recorded_floor(), self.config.dp.accountant)
        if result.privacy is not None:
            lesion = group_epsilon(self.state.accountant, result.privacy.delta, 2)
            log.info("%s: epsilon %.4g per image, %.4g for a lesion of 2 images (delta %g)", self.data.name,
                     result.privacy.epsilon, lesion, result.privacy.delta)
        sent = self._compressed(round_number, shared) if self.config.federation.compression != "none" else None
        write_site_snapshot(self.snapshot_path(round_number), round_number, self.state,
                            private_state(self.model, self.scope), self.made_with)
        for old in sorted(self.state_dir.glob("round-*.pt"))[:-SNAPSHOTS_KEPT]:
            old.unlink(missing_ok=True)
        images = max(1, result.images)
        training = {
            "num-examples": float(len(self.images)),  # FedAvg weight: the site's training images
            "images-seen": float(result.images),
            "steps": float(result.steps),
            **{key: sum(e.losses[key] * e.images for e in result.epochs) / images for key in self.model.terms},
            "seconds": sum(e.seconds for e in result.epochs),
            "skipped-steps": float(sum(e.skipped_steps for e in result.epochs)),  # float16 overflow: no update
        }
        privacy = {"epsilon": result.privacy.epsilon, "delta": result.privacy.delta} if result.privacy else {}
        metrics = reply_metrics(self.config, training, privacy, self.data.index, self.public_weight)
        output = RoundOutput(sent if sent is not None else shared_state(self.model, self.scope), metrics)
        self._release_device()
        return output

    def _release_device(self) -> None:
        """Between rounds, a site on a GPU keeps its model and optimizer state in host memory and gives the cached
        blocks back: one Ray worker may hold several virtual hospitals (`federation.client_gpu_fraction`), and the GPU
        should hold only the one training now. Moving back is exact (copies), and costs one transfer per round."""
        if self.trainer.device.type != "cuda":
            return
        self.model.to("cpu")
        self.state.optimizer = _on_cpu(self.state.optimizer)
        self.state.residual = _on_cpu(self.state.residual)
        torch.cuda.empty_cache()

    def _compressed(self, round_number: int, received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The round's update (local - received weights, plus the kept residual) as `federation.compression` encodes
        it; the new residual goes into the site state (saved with the snapshot, never sent). Called after training:
        under DP on the noised weights (post-processing), rounded with a secret generator nobody can replay."""
        generator = secret_generator("cpu") if self.config.dp.enabled else \
            seeded_generator(self.config.seed, ROUNDING_STREAM, self.data.index, round_number)
        payload, self.state.residual = compress_update(shared_state(self.model, self.scope), received,
                                                       self.state.residual, self.config.federation.compression,
                                                       generator)
        return payload

    @torch.no_grad()
    def evaluate(self, shared: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The objective's loss terms of the global weights (with this site's private part, e.g. the VAE's decoder)
        on its validation images, as `val-<term>`.

        Refused under DP (an un-noised loss on private images is not covered by the accounting) and
        when the site holds no validation images (its training images would flatter the number).
        """
        if self.config.dp.enabled:
            raise ClientEvaluationRefused(f"{self.data.name}: client evaluation is off under DP-SGD")
        if len(self.data.val_rows) == 0:
            raise ClientEvaluationRefused(f"{self.data.name}: no validation images (data.val_fraction=0?)")
        self._require_at_least(len(self.data.val_rows), "evaluate on", "validation")
        self._check_shared(shared)
        self.model.to(self.trainer.device)
        try:
            return self._validation_losses(shared)
        finally:
            self._release_device()

    def _validation_losses(self, shared: Mapping[str, torch.Tensor]) -> dict[str, float]:
        load_partial_state(self.model, shared)
        rows = self.data.val_rows
        self.model.eval()
        device = self.trainer.device
        keys, schedule = self.model.terms, self.model.schedule(None)
        totals = torch.zeros(len(keys), dtype=torch.float64, device=device)
        for positions in ordered_batches(len(rows), 64):
            images = to_device_float(read_batch(self.data.prepared.store, rows[positions]), device)
            terms = self.model.loss_terms(images, self.model(images), schedule)
            totals += torch.stack([terms[key].sum() for key in keys]).double()
        values = dict(zip(keys, totals.tolist()))
        return {"num-examples": float(len(rows)), "site-index": float(self.data.index),
                **{f"val-{k}": v / len(rows) for k, v in values.items()}}
