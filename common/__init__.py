"""Code both sides of a DermFed federation use: config, data, model, privacy, serialization.

Nothing here imports from `server/` or `client/`, and nothing here imports Flower.
"""

import os as _os

# Reproducible CPU training (README: a resumed run ends with the weights of an uninterrupted one). Intel MKL,
# which torch uses on the CPU, splits some kernels (e.g. a matrix-vector product: a batch of one image) over
# its threads in a way that depends on the machine's load, so the same step can differ in the last bits from
# one run to the next on a busy machine. Strict conditional numerical reproducibility makes MKL's results
# independent of timing. MKL reads this at its first computation; set it otherwise in the environment.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
