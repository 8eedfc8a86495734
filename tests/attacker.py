"""A second Unix account on the coordinator's machine, trying what the threat model says it controls:
loopback ports, world-readable files, its own processes, its own Flower install.

Run as root with `python -m tests.attacker SPEC_JSON`: it imports Flower's CLI and what it needs, then
gives up root for the attacker's uid and gid for good (setgroups, setgid, setuid: no capability is left),
and only then makes its attempts, printing one JSON line of results. (The interpreter of the test's
virtual environment may live where the attacker cannot execute it, e.g. under /root: importing first,
then dropping privileges, makes the attempts independent of that, and changes nothing the kernel checks
on a socket or a file.)
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import json
import os
import pkgutil
import socket
import ssl
import sys

import flwr.cli
import httpx  # noqa: F401 - loaded before privileges are dropped

for _module in pkgutil.walk_packages(flwr.cli.__path__, "flwr.cli."):
    with contextlib.suppress(Exception):
        importlib.import_module(_module.name)
from flwr.cli.app import app  # noqa: E402


def flwr(args: list[str]) -> dict:
    """Flower's own `flwr` CLI, in this process, as the attacker."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            returned = app(args, standalone_mode=False, prog_name="flwr")  # click returns the exit code here
            code = returned if isinstance(returned, int) else 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - every outcome is a result
            code = 1
            print(f"{type(exc).__name__}: {exc}", file=err)
    return {"code": code, "output": (out.getvalue() + err.getvalue())[-1500:]}


def connection(home: str, address: str, ca: str) -> None:
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "config.toml"), "w") as stream:
        stream.write(f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{address}"\n'
                     f'root-certificates = "{ca}"\n')
    os.environ["FLWR_HOME"] = home


def raw_control_call(port: int, tls: bool) -> str:
    """POST the Control API's list-runs to a port, with or without TLS (no client certificate)."""
    request = (f"POST /v1/control/list-runs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "Content-Type: application/protobuf\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            stream = raw
            if tls:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                stream = context.wrap_socket(raw, server_hostname="localhost")
            stream.sendall(request)
            answer = stream.recv(200).decode(errors="replace")
            return answer.split("\r\n", 1)[0] or "connection closed"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def main(spec: dict) -> dict:
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    assert os.getuid() == spec["uid"] and os.geteuid() == spec["uid"]
    home = spec["home"]
    os.chdir(home)
    os.environ["HOME"] = home
    results: dict = {"uid": os.getuid(), "flwr": {}, "sockets": {}, "files": {}, "ports": {}}
    for address in spec["addresses"]:
        connection(os.path.join(home, "flwr-" + address.replace(":", "-")), address, spec["ca"])
        results["flwr"][address] = {
            "ls": flwr(["ls", "target"]),
            "supernode list": flwr(["supernode", "list", "target"]),
            "supernode register": flwr(["supernode", "register", spec["public_key"], "target"]),
            "run": flwr(["run", spec["app"], "target"]),
        }
    for path in spec["sockets"]:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
            results["sockets"][path] = "connected"
        except OSError as exc:
            results["sockets"][path] = errno.errorcode.get(exc.errno, str(exc))
    for path in spec["files"]:
        try:
            with open(path, "rb") as stream:
                stream.read(1)
            results["files"][path] = "read"
        except OSError as exc:
            results["files"][path] = errno.errorcode.get(exc.errno, str(exc))
    for port in spec["ports"]:
        results["ports"][str(port)] = {"plain": raw_control_call(port, False), "tls": raw_control_call(port, True)}
    return results


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
