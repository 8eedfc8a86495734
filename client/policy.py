"""What a hospital allows: its privacy floor, what its replies may hold, what its errors may say.

Privacy holds against the coordinating server too, so none of this is the server's to decide:

- `PrivacyFloor`: the hospital's own DP settings (node config keys `dp-enabled`,
  `dp-max-epsilon`, `dp-delta`, `dp-max-grad-norm`), made stricter by what its privacy ledger
  remembers. `dp-enabled=true` needs a finite `dp-max-epsilon`; `dp-delta` defaults to
  `DEFAULT_DELTA`. A coordinator's config may ask for more privacy, never less: a request for
  less (DP off, a larger target epsilon or delta, no noise, a noise multiplier with which one
  round already exceeds the ceiling) is refused with a message naming both values.
- `site_state_dir`: the hospital's state folder (its snapshots and privacy ledger) comes from
  its node config or a per-user default, never from the coordinator's run config.
- `reply_metrics`: under DP a reply holds the privacy status and a FedAvg weight that reveals
  nothing (equal weights, or a count the hospital declared public), never a value computed from
  the private images without noise.
- `min_batch_size`: the hospital's node config `min-batch-size`. Without DP it is the only
  protection against values computed from a few images: the site refuses to train or evaluate
  on fewer images, and no plain (non-DP) step uses a smaller batch (`client.site.SiteRunner`).
- `public_error`: a site's error reply names an error class and a fixed message, never a path,
  a file name, an exception's text or class; the details stay in the site's own log. Under DP,
  every failure that depends on the images gets one fixed reason (`DP_SITE_FAILED`).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from common.config import ConfigError, DermFedConfig, DPConfig
from common.data.catalog import DataError
from common.privacy import BUDGET_RELATIVE_TOLERANCE, AccountantError, PrivacyBudgetExhausted, epsilon_of

# Node config keys through which a hospital sets its privacy floor.
FLOOR_KEYS = {"dp-enabled": "dp_required", "dp-max-epsilon": "max_epsilon", "dp-delta": "max_delta",
              "dp-max-grad-norm": "max_grad_norm"}
PUBLIC_COUNT_KEY = "public-num-examples"
MIN_BATCH_KEY = "min-batch-size"
STATE_DIR_KEY = "state-dir"
# Every node config key a DermFed node reads (README "Run at your hospitals"); any other key is refused with close
# matches, so that a misspelt privacy floor (dp-enable=true) is never silently ignored.
SITE_KEYS = ("data-root", "data-format", "site-name", "site-index", "dermfed-overrides", "allow-plain-metrics")
NODE_CONFIG_KEYS = (*FLOOR_KEYS, PUBLIC_COUNT_KEY, MIN_BATCH_KEY, STATE_DIR_KEY, *SITE_KEYS)


def check_node_config_keys(node_config: Mapping[str, Any], also: tuple[str, ...] = ()) -> None:
    """Refuse a node config key no DermFed node reads (`also`: keys the caller itself sets, e.g. partition-id)."""
    import difflib

    known = (*NODE_CONFIG_KEYS, *also)
    for key in node_config:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"unknown node config key {key!r}; {hint}known: {', '.join(sorted(NODE_CONFIG_KEYS))}")


# What a simulated hospital's `dermfed-overrides` may not change: its data are the pooled data set's partition, which
# the server records (for evaluation's leak guard) from the run's config; the cache's location changes no image.
SIMULATED_DATA_KEYS = ("seed", "data.", "synth.")
SIMULATED_FREE_KEYS = ("data.cache_dir", "data.use_cache")


def node_overrides(node_config: Mapping[str, Any]) -> list[str]:
    """The hospital's own `dermfed-overrides` (space-separated key=value, shell-quoted), as a list."""
    return shlex.split(str(node_config.get("dermfed-overrides", "")))


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys a list of key=value overrides sets."""
    return [item.split("=", 1)[0].strip() for item in overrides]


def check_simulated_overrides(node_config: Mapping[str, Any]) -> None:
    """Refuse a simulated hospital's `dermfed-overrides` that would change which images it pretrains on (its split,
    splits, seed, data): the run's record of pretraining images, which the leak guard trusts, would not hold them."""
    keys = override_keys(node_overrides(node_config))
    changed = [key for key in keys if key.startswith(SIMULATED_DATA_KEYS) and not key.startswith(SIMULATED_FREE_KEYS)]
    if changed:
        raise ConfigError(f"dermfed-overrides of a simulated hospital may not set {changed}: its images are the pooled "
                          "data's partition, which the run records from its own config for the leak guard; change "
                          "the run's config instead")


DEFAULT_DELTA = 1e-5  # a hospital that requires DP and sets no dp-delta allows at most this delta


def default_state_root() -> Path:
    """Where a site keeps its state when its node config names no `state-dir`: the daemon user's own folder."""
    return Path.home() / ".dermfed" / "state"


def site_state_dir(node_config: Mapping[str, Any], site_name: str) -> Path:
    """The site's state folder: `<state-dir>/<site>` from the node config, else ~/.dermfed/state/<site>.

    Never derived from the run config (the coordinator's `run-dir`): the privacy ledger in it is the
    hospital's lifetime record, which no run of the coordinator may start afresh.
    """
    root = node_config.get(STATE_DIR_KEY)
    return (Path(str(root)).expanduser() if root else default_state_root()) / site_name

# Exactly what a DP site's training reply may hold (besides the shared weights).
DP_REPLY_FIELDS = ("num-examples", "epsilon", "delta", "site-index")


class PrivacyFloorError(ValueError):
    """The coordinator asked for less privacy than this site allows. The message holds only settings."""


class SiteStateCorrupt(RuntimeError):
    """A site's saved state (optimizer, private decoder, step) cannot be read: the site refuses to guess."""


class PrivacyLedgerCorrupt(RuntimeError):
    """The privacy ledger is unreadable, incomplete, or missing where the site has trained before:
    the site refuses to train rather than start its budget afresh."""


class SiteBusy(RuntimeError):
    """Another round holds this site's lock (a second run of the coordinator at the same time): refused at once."""


class TooFewImages(RuntimeError):
    """The run's data split leaves this site fewer images than its min-batch-size. The message holds only settings
    (never the site's image count), so that it may go back to the coordinator as it is."""


class ClientEvaluationRefused(RuntimeError):
    """This site does not compute validation metrics for the server (DP on, or no validation images)."""


@dataclass(frozen=True)
class PrivacyFloor:
    """The least privacy a site accepts. None: the site sets no limit of that kind."""

    dp_required: bool = False
    max_epsilon: Optional[float] = None  # lifetime ceiling on this site's images
    max_delta: Optional[float] = None
    max_grad_norm: Optional[float] = None  # the site's own clipping norm, used whatever the coordinator says

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "PrivacyFloor":
        values: dict[str, Any] = {}
        for key, field in FLOOR_KEYS.items():
            if key not in node_config:
                continue
            raw = node_config[key]
            if field == "dp_required":
                if not isinstance(raw, bool):
                    raise ConfigError(f"node config {key}={raw!r} must be true or false")
                values[field] = raw
                continue
            try:
                number = float(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"node config {key}={raw!r} must be a number") from None
            if not math.isfinite(number) or number <= 0 or (field == "max_delta" and number >= 1):
                raise ConfigError(f"node config {key}={raw!r} is out of range "
                                  f"({'0 < delta < 1' if field == 'max_delta' else 'a finite positive number'})")
            values[field] = number
        if values and not values.get("dp_required", False) and any(k != "dp_required" for k in values):
            raise ConfigError("node config sets DP limits (dp-max-epsilon, dp-delta, dp-max-grad-norm) without "
                              "dp-enabled=true; add dp-enabled=true so that they apply")
        if values.get("dp_required"):
            if "max_epsilon" not in values:
                raise ConfigError("node config dp-enabled=true needs dp-max-epsilon, this site's lifetime epsilon "
                                  "ceiling (e.g. dp-max-epsilon=8): without it the coordinator's dp.* settings "
                                  "would decide how much privacy this site spends")
            values.setdefault("max_delta", DEFAULT_DELTA)
        return cls(**values)

    @classmethod
    def from_record(cls, record: Optional[Mapping[str, Any]]) -> "PrivacyFloor":
        return cls(**{k: v for k, v in (record or {}).items() if k in cls.__dataclass_fields__})

    @classmethod
    def of_config(cls, config: DermFedConfig) -> "PrivacyFloor":
        """The floor a DP run establishes at a site that had none: what the ledger remembers."""
        if not config.dp.enabled:
            return cls()
        return cls(dp_required=True, max_epsilon=config.dp.target_epsilon, max_delta=config.dp.delta)

    def as_record(self) -> dict[str, Any]:
        return asdict(self)

    def stricter(self, other: "PrivacyFloor") -> "PrivacyFloor":
        def smaller(a: Optional[float], b: Optional[float]) -> Optional[float]:
            return b if a is None else a if b is None else min(a, b)

        return PrivacyFloor(self.dp_required or other.dp_required, smaller(self.max_epsilon, other.max_epsilon),
                            smaller(self.max_delta, other.max_delta), smaller(self.max_grad_norm, other.max_grad_norm))

    def check_noise(self, dp: DPConfig, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Refuse a noise multiplier with which one training call alone would end above the ceiling."""
        if self.max_epsilon is None:
            return
        alone = epsilon_of(dp.accountant, {"history": [(noise_multiplier, sample_rate, steps)],
                                           "mechanism": dp.accountant}, dp.delta)
        if alone > self.max_epsilon * (1 + BUDGET_RELATIVE_TOLERANCE):
            asked = f"dp.noise_multiplier={dp.noise_multiplier}" if dp.noise_multiplier is not None else \
                f"a noise multiplier of {noise_multiplier:.4g}"
            raise PrivacyFloorError(f"the coordinator asked for {asked}, with which one round of {steps} steps alone "
                                    f"spends epsilon={alone:.4g} at delta={dp.delta}, but this site allows at most "
                                    f"epsilon={self.max_epsilon} over its lifetime")

    def apply(self, config: DermFedConfig) -> DermFedConfig:
        """The config this site trains with: the coordinator's, checked against the floor."""
        dp = config.dp
        if not dp.enabled:
            if self.dp_required:
                raise PrivacyFloorError("the coordinator asked for dp.enabled=false, but this site requires DP-SGD "
                                        "(dp-enabled=true in its node config or privacy ledger)")
            return config
        if self.max_epsilon is not None and dp.noise_multiplier == 0:
            raise PrivacyFloorError(f"the coordinator asked for dp.noise_multiplier=0 (no noise), but this site allows "
                                    f"at most epsilon={self.max_epsilon} over its lifetime")
        if self.max_epsilon is not None and dp.target_epsilon is not None and dp.target_epsilon > self.max_epsilon:
            raise PrivacyFloorError(f"the coordinator asked for dp.target_epsilon={dp.target_epsilon}, but this site "
                                    f"allows at most epsilon={self.max_epsilon} over its lifetime")
        if self.max_delta is not None and dp.delta > self.max_delta:
            raise PrivacyFloorError(f"the coordinator asked for dp.delta={dp.delta}, but this site allows at most "
                                    f"delta={self.max_delta}")
        update: dict[str, Any] = {}
        if dp.target_epsilon is None and self.max_epsilon is not None:
            update["target_epsilon"] = self.max_epsilon  # a fixed noise multiplier still stops at the ceiling
        if self.max_grad_norm is not None:
            update["max_grad_norm"] = self.max_grad_norm
        if not update:
            return config
        return config.model_copy(update={"dp": dp.model_copy(update=update)})


def public_count(node_config: Mapping[str, Any]) -> Optional[int]:
    """The image count the hospital declared public, if any: under DP, the FedAvg weight and the size the
    accounting uses (sampling rate, steps). None: equal weights, and a size bucket (`common.privacy.public_size`)."""
    if PUBLIC_COUNT_KEY not in node_config:
        return None
    raw = node_config[PUBLIC_COUNT_KEY]
    if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
        raise ConfigError(f"node config {PUBLIC_COUNT_KEY}={raw!r} must be a positive whole number")
    return raw


def min_batch_size(node_config: Mapping[str, Any]) -> Optional[int]:
    """The hospital's `min-batch-size` (None: no limit, the default): the fewest images any value it sends may
    come from, and the smallest batch of a plain step."""
    if MIN_BATCH_KEY not in node_config:
        return None
    raw = node_config[MIN_BATCH_KEY]
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(f"node config {MIN_BATCH_KEY}={raw!r} must be a positive whole number")
    return raw


def reply_metrics(config: DermFedConfig, training: Mapping[str, float], privacy: Mapping[str, float],
                  site_index: int, weight: float) -> dict[str, float]:
    """What leaves the site with its weights. Under DP: the privacy status and a public weight, nothing else."""
    if config.dp.enabled:
        return {"num-examples": weight, "epsilon": float(privacy["epsilon"]), "delta": float(privacy["delta"]),
                "site-index": float(site_index)}
    return {**{k: float(v) for k, v in training.items()}, "site-index": float(site_index),
            "epsilon": math.inf, "delta": 0.0}


# Error class -> (code, fixed public message). The first matching class wins.
_PUBLIC_ERRORS: tuple[tuple[type[BaseException], str, str], ...] = (
    (PrivacyBudgetExhausted, "privacy-budget-exhausted",
     "this site has spent its privacy budget and refuses to train further"),
    (PrivacyLedgerCorrupt, "privacy-ledger-corrupt",
     "this site's privacy ledger is missing, unreadable or incomplete although the site has trained before; it "
     "refuses to train until its operator restores the ledger; details are in its own log"),
    (SiteBusy, "site-busy",
     "this site is training another round (another run?) and trains one round at a time; try again later"),
    (AccountantError, "privacy-accounting-error",
     "this site could not account the privacy of this run's settings and did not release an update; details are "
     "in its own log"),
    (FloatingPointError, "training-diverged",
     "the loss became NaN or infinite at this site; details are in its own log"),
    (ClientEvaluationRefused, "evaluation-refused",
     "this site does not send validation metrics (DP-SGD is on, or it holds no validation images)"),
    (DataError, "data-error", "this site's images could not be read as configured; details are in its own log"),
    (SiteStateCorrupt, "site-state-corrupt", "this site's saved state of the previous round is unreadable; its operator "
     "must restore it or move it aside; details are in its own log"),
    (ConfigError, "config-error", "this site could not apply the run's configuration; details are in its own log"),
)


# Failures that depend only on settings and the hospital's own records, never on its images: a DP site may name them.
_DATA_INDEPENDENT = (PrivacyFloorError, PrivacyBudgetExhausted, PrivacyLedgerCorrupt, SiteBusy, AccountantError,
                     ClientEvaluationRefused, SiteStateCorrupt, ConfigError)
# What a DP site answers for every other failure: which one it was (a missing sub-folder, a small image, a split
# that cannot be drawn, a NaN) would answer a question about its images without spending budget.
DP_SITE_FAILED = ("site-failed: this site could not train with this run's settings on its images; details are in "
                  "its own log")


def public_error(exc: BaseException, private: bool = False) -> str:
    """The reason a site sends when it fails: an error class and a fixed message, no paths, no exception text,
    no exception class name. `private` (a site under DP): one reason for every data-dependent failure."""
    if private and not isinstance(exc, _DATA_INDEPENDENT):
        return DP_SITE_FAILED
    if isinstance(exc, PrivacyFloorError):  # built from settings only: safe, and the coordinator must see both values
        return f"privacy-floor: {exc}"
    if isinstance(exc, TooFewImages):  # built from settings only, like the floor's
        return f"min-batch-size: {exc}"
    for kind, code, text in _PUBLIC_ERRORS:
        if isinstance(exc, kind):
            return f"{code}: {text}"
    return "site-error: the site failed; details are in its own log"
