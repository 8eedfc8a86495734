"""nginx configurations: the coordinator's edge and each hospital's forwarder.

Flower 1.42's SuperLink serves the Fleet API (for SuperNodes), the Control API (run
submission, node registration) and the Runtime API on one HTTP port. DermFed binds the
SuperLink to 127.0.0.1 and puts nginx in front of it:

- the **edge** (coordinator) listens on the public port, requires a client certificate signed by
  the federation's CA (mutual TLS) and forwards only `/v1/fleet/` to the SuperLink; everything
  else (the Control and Runtime APIs) answers 403. Only the coordinator, on its own server,
  reaches the Control API.
- the **forwarder** (hospital) listens on 127.0.0.1 and presents the hospital's client
  certificate to the edge: Flower's SuperNode cannot present one itself (its HTTP client
  only verifies the server), so it talks to its local forwarder, over TLS too (Flower's node
  authentication refuses plain HTTP), with a throwaway loopback certificate.

Both are rendered at start-up with absolute paths of the folder they run from, so the folders
can be copied anywhere.
"""

from __future__ import annotations

from pathlib import Path

FLEET_PREFIX = "/v1/fleet/"

_COMMON = """worker_processes 1;
pid {runtime}/nginx.pid;
error_log {runtime}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {runtime}/nginx-access.log;
    client_body_temp_path {runtime}/body;
    proxy_temp_path {runtime}/proxy;
    fastcgi_temp_path {runtime}/fastcgi;
    uwsgi_temp_path {runtime}/uwsgi;
    scgi_temp_path {runtime}/scgi;
    server_tokens off;
    server {{
{server}
    }}
}}
"""

_PASS_THROUGH = """            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            client_max_body_size 0;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;"""


def edge_config(coordinator: Path, runtime: Path, public_port: int, superlink_port: int) -> str:
    """The coordinator's public face: mutual TLS, Fleet API only."""
    server = f"""        listen {public_port} ssl;
        ssl_certificate {coordinator}/edge.crt;
        ssl_certificate_key {coordinator}/edge.key;
        ssl_client_certificate {coordinator}/ca.crt;
        ssl_verify_client on;
        ssl_verify_depth 1;
        ssl_protocols TLSv1.2 TLSv1.3;
        location {FLEET_PREFIX} {{
            proxy_pass https://127.0.0.1:{superlink_port};
            proxy_ssl_trusted_certificate {coordinator}/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
{_PASS_THROUGH}
        }}
        location / {{
            return 403;
        }}"""
    return _COMMON.format(runtime=runtime, server=server)


def forward_config(hospital: Path, runtime: Path, local_port: int, coordinator_host: str, coordinator_port: int) -> str:
    """A hospital's local forwarder: the SuperNode's Fleet traffic, with the hospital's client certificate."""
    server = f"""        listen 127.0.0.1:{local_port} ssl;
        ssl_certificate {runtime}/loopback.crt;
        ssl_certificate_key {runtime}/loopback.key;
        location {FLEET_PREFIX} {{
            proxy_pass https://{coordinator_host}:{coordinator_port};
            proxy_ssl_certificate {hospital}/client.crt;
            proxy_ssl_certificate_key {hospital}/client.key;
            proxy_ssl_trusted_certificate {hospital}/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_name {coordinator_host};
            proxy_ssl_server_name on;
{_PASS_THROUGH}
        }}
        location / {{
            return 403;
        }}"""
    return _COMMON.format(runtime=runtime, server=server)


def write_config(text: str, runtime: Path, name: str) -> Path:
    runtime.mkdir(parents=True, exist_ok=True)
    path = runtime / name
    path.write_text(text)
    return path


def nginx_command(config: Path, runtime: Path) -> list[str]:
    return ["nginx", "-p", str(runtime), "-c", str(config), "-g", "daemon off;"]
