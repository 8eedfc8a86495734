"""COMMANDS.md (the coordinator's) and START.md (each hospital's): the exact commands, filled in."""

from __future__ import annotations

from common.deployment.layout import FederationLayout, HospitalLayout


def federation_commands(layout: FederationLayout) -> str:
    settings = layout.settings()
    root = layout.root.resolve()
    hospitals = [h["name"] for h in settings["hospitals"]]
    lines = [
        "# DermFed federation: commands",
        "",
        f"Hospitals reach the coordinator at `{settings['host']}:{settings['public_port']}` (the nginx edge: mutual",
        "TLS, Fleet API only). The SuperLink itself listens on "
        f"`127.0.0.1:{settings['superlink_port']}` and is never exposed.",
        "",
        "## 0. Before anything else",
        "",
        f"Move `{root}/ca-offline/ca.key` to offline storage (a USB key in a safe). It is needed",
        "again only to add a hospital. Nothing below uses it.",
        "",
        "## 1. Coordinator: start the SuperLink and the edge proxy (one command, stops both together)",
        "",
        "```bash",
        f"dermfed deploy serve --dir {root}",
        "```",
        "",
        "## 2. Coordinator: register every hospital's key (writes coordinator/registry.json)",
        "",
        "```bash",
        f"dermfed deploy register --dir {root}",
        "```",
        "",
        "## 3. Each hospital: receive its own folder, start its daemon",
        "",
        "Copy `hospitals/NAME/` to hospital NAME only, by a secure channel. It holds that hospital's",
        "private keys; never send a hospital another's folder. Each folder's START.md says the rest:",
        "",
    ]
    lines += [f"- `{root}/hospitals/{name}/START.md`" for name in hospitals]
    lines += [
        "",
        "## 4. Coordinator: run federated pretraining (builds, signs and submits the app bundle)",
        "",
        "```bash",
        f"dermfed deploy run --dir {root} --config paper --run-dir {root}/runs/pretrain-1",
        "```",
        "",
        "Add `--resume` to continue an interrupted run from its last completed round.",
        "",
    ]
    return "\n".join(lines)


def hospital_commands(layout: FederationLayout, name: str) -> str:
    hospital = HospitalLayout(layout.hospital_dir(name)).settings()
    return "\n".join([
        f"# DermFed: hospital {name}",
        "",
        "This folder holds your hospital's private keys (`auth_key`, `client.key`: mode 0600, keep them so),",
        "the federation's CA certificate and the coordinator's app-signing public key. Install DermFed",
        "(`make install`) and nginx (`apt-get install nginx-light`), check your images, then start the daemon:",
        "",
        "```bash",
        "dermfed data summary --config paper data.format=folder data.root=/data/dermoscopy",
        "dermfed node --dir /path/to/this/folder --data-root /data/dermoscopy --state-dir /var/lib/dermfed \\",
        "    --node-config 'dp-enabled=true dp-max-epsilon=8'",
        "```",
        "",
        f"`dermfed node` runs three processes and stops them together: a local nginx forwarder "
        f"(127.0.0.1:{hospital['proxy_port']}) that",
        "presents this hospital's client certificate to the coordinator "
        f"({hospital['coordinator_host']}:{hospital['coordinator_port']}),",
        "the Flower SuperNode (authenticated by `auth_key`), and a SuperExec that runs only app bundles",
        "signed by the key in `trusted-app-keys.pub`. Your images never leave this machine.",
        "",
    ])

