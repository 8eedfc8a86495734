"""nginx configurations: the coordinator's edge and each hospital's forwarder.

Flower 1.42's SuperLink serves the Fleet API (for SuperNodes), the Control API (run
submission, node registration) and the Runtime API on one HTTP port. DermFed runs the
SuperLink in a private network namespace (`common.deployment.sandbox`), where no other account
can reach that port, and puts nginx in front of it:

- the **edge** (coordinator) listens on the public port, requires a client certificate signed by
  the federation's CA and not revoked (mutual TLS, `ssl_crl`), and forwards only requests whose
  raw URI is a Fleet endpoint (`/v1/fleet/<name>`, no encoded or dot segments: `FLEET_URI`)
  to the SuperLink, through a Unix socket in the coordinator's 0700 folder; everything else
  answers 403. It reads a whole request body, at most `max_body_mb`, before anything of it
  reaches the SuperLink (413 beyond), and serves at most `max_connections` requests at once per
  client certificate (429 beyond).
- the **forwarder** (hospital) listens on a Unix socket in the hospital's 0700 folder and
  presents the hospital's client certificate to the edge: Flower's SuperNode cannot present one
  itself (its HTTP client only verifies the server), so it talks to its forwarder over TLS too
  (Flower's node authentication refuses plain HTTP), with a throwaway loopback certificate,
  through a relay of its private network namespace.

Both are rendered at start-up with absolute paths of the folder they run from, so the folders
can be copied anywhere.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

FLEET_PREFIX = "/v1/fleet/"
# The raw request line, before nginx decodes and normalises it (`location` matches the normalised path, but
# proxy_pass forwards the raw one: `/v1/control/%2e%2e/fleet/x` would match no Fleet location and still reach
# the SuperLink as something else). Flower's Fleet endpoints are all of this form.
FLEET_URI = r"^/v1/fleet/[a-z-]+(\?|$)"
# Flower pushes every object of a message in its own request and splits arrays into chunks of at most
# 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), so no legitimate Fleet request body is larger than a chunk
# and a few KiB of framing, whatever the model. 8 MiB leaves room; `deploy init --max-body-mb` changes it.
DEFAULT_MAX_BODY_MB = 8
# A SuperNode makes at most 2 object pushes and 2 pulls at once (Flower's defaults) besides heartbeats.
DEFAULT_MAX_CONNECTIONS = 16

_COMMON = """worker_processes 1;
{user}pid {runtime}/nginx.pid;
error_log {runtime}/nginx-error.log warn;
worker_shutdown_timeout 10s;
events {{ worker_connections 1024; }}
http {{
    access_log {runtime}/nginx-access.log;
    client_body_temp_path {runtime}/body;
    proxy_temp_path {runtime}/proxy;
    fastcgi_temp_path {runtime}/fastcgi;
    uwsgi_temp_path {runtime}/uwsgi;
    scgi_temp_path {runtime}/scgi;
    server_tokens off;
{http}    server {{
{server}
    }}
}}
"""

_UPSTREAM = """            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;"""


def _user_directive() -> str:
    """As root, nginx hands its workers to `nobody`, who must not open the owner's sockets: keep this account."""
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"


def edge_config(coordinator: Path, runtime: Path, public_port: int, fleet_socket: Path,
                max_body_mb: int = DEFAULT_MAX_BODY_MB, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> str:
    """The coordinator's public face: mutual TLS with revocation, Fleet API only, bounded bodies and connections."""
    http = "    limit_conn_zone $ssl_client_serial zone=per_client:1m;\n    limit_conn_status 429;\n"
    server = f"""        listen {public_port} ssl;
        ssl_certificate {coordinator}/edge.crt;
        ssl_certificate_key {coordinator}/edge.key;
        ssl_client_certificate {coordinator}/ca.crt;
        ssl_crl {coordinator}/crl.pem;
        ssl_verify_client on;
        ssl_verify_depth 1;
        ssl_session_tickets off;
        ssl_protocols TLSv1.2 TLSv1.3;
        limit_conn per_client {max_connections};
        if ($request_uri !~ "{FLEET_URI}") {{
            return 403;
        }}
        location {FLEET_PREFIX} {{
            client_max_body_size {max_body_mb}m;
            client_body_buffer_size 1m;
            proxy_request_buffering on;
            proxy_pass https://unix:{fleet_socket};
            proxy_ssl_trusted_certificate {coordinator}/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
{_UPSTREAM}
        }}
        location / {{
            return 403;
        }}"""
    return _COMMON.format(user=_user_directive(), runtime=runtime, http=http, server=server)


def forward_config(hospital: Path, runtime: Path, listen_socket: Path, coordinator_host: str,
                   coordinator_port: int) -> str:
    """A hospital's forwarder: the SuperNode's Fleet traffic, with the hospital's client certificate."""
    server = f"""        listen unix:{listen_socket} ssl;
        ssl_certificate {runtime}/loopback.crt;
        ssl_certificate_key {runtime}/loopback.key;
        location {FLEET_PREFIX} {{
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_pass https://{coordinator_host}:{coordinator_port};
            proxy_ssl_certificate {hospital}/client.crt;
            proxy_ssl_certificate_key {hospital}/client.key;
            proxy_ssl_trusted_certificate {hospital}/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name {coordinator_host};
            proxy_ssl_server_name on;
{_UPSTREAM}
        }}
        location / {{
            return 403;
        }}"""
    return _COMMON.format(user=_user_directive(), runtime=runtime, http="", server=server)


def write_config(text: str, runtime: Path, name: str) -> Path:
    runtime.mkdir(parents=True, exist_ok=True)
    path = runtime / name
    path.write_text(text)
    return path


def nginx_command(config: Path, runtime: Path) -> list[str]:
    return ["nginx", "-p", str(runtime), "-c", str(config), "-g", "daemon off;"]
