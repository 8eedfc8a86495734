"""Every key string a DermFed run and Flower exchange, in one place, owned by the Flower adapters.

Plain strings, no Flower import: the ServerApp and ClientApp adapters, the run config builder
(`common.config.transport.flower_run_config`, used by `dermfed simulate` and `dermfed deploy
sign`), the run manifest checks and the verifying ClientApp process read them from here, so a
key is spelt once. The run config keys are declared with their defaults in pyproject's
`[tool.flwr.app.config]` (Flower drops any key not declared there).
"""

# Flower's run config: set once per run, when the run is submitted.
CONFIG_PRESET = "config-preset"  # YAML path or preset name (read when neither of the two below is set)
CONFIG_OVERRIDES = "config-overrides"  # space-separated key=value on top of the preset
DERMFED_CONFIG = "dermfed-config"  # the resolved DermFed config as JSON (simulation)
RUN_MANIFEST = "run-manifest"  # a real federation: the operator's signed manifest, holding the DermFed config
RUN_MANIFEST_SIGNATURE = "run-manifest-signature"
RUN_DIR = "run-dir"
RESUME = "resume"
SITE_NAMES = "site-names"
STOP_AFTER_ROUND = "stop-after-round"
FAULT_INJECTION = "fault-injection"
SITE_REGISTRY = "site-registry"

# The records of a train or evaluate instruction and of a reply.
ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
REPLY_SIGNATURE_RECORD = "dermfed-reply-signature"  # a real federation: the node key's signature of a reply

# The key every Flower strategy sets in an instruction's config record; a strategy's own keys (FedProx's
# `proximal-mu`) are declared by its entry in `common.strategies` (`Strategy.instruction`).
SERVER_ROUND = "server-round"
