"""`dermfed deploy`: a real federation that nobody else can join, command, or impersonate, and whose runs
the hospitals approve.

Who does what, and with which key:

- the coordinator's server: `init` (the CA, the SuperLink's and the edge's certificates, the
  operator's signing key; the CA key and the signing key are then moved off the server),
  `add-hospital` (signs a hospital's certificate request with the CA key brought from offline
  storage), `serve` (the SuperLink in a private network behind the nginx edge: `serve.py`),
  `register`, `revoke`, `ls` and `run` (the operator's commands through the control socket
  only its account can open: `control.py`);
- the operator's workstation: `sign` (a run manifest covering bundle, config, federation, run
  id and expiry: `sign.py`), which `run --manifest` forwards;
- each hospital: `dermfed node keygen` (its keys never leave it), `dermfed node approve`, and
  its daemon, which checks every run against the manifest before any code loads.
"""

from server.deploy.base import DeployError
from server.deploy.control import list_federation, register_hospitals, revoke_hospital, submit_run
from server.deploy.serve import coordinator_daemons, serve
from server.deploy.setup import add_hospital, init_federation

__all__ = ["DeployError", "add_hospital", "coordinator_daemons", "init_federation", "list_federation",
           "register_hospitals", "revoke_hospital", "serve", "submit_run"]
