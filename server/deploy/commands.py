"""COMMANDS.md (the coordinator's) and START.md (each hospital's): the exact commands, filled in."""

from __future__ import annotations

from common.deployment.layout import FederationLayout


def federation_commands(layout: FederationLayout) -> str:
    settings = layout.settings()
    root = layout.root.resolve()
    hospitals = [h["name"] for h in settings["hospitals"] if not h["revoked"]]
    lines = [
        "# DermFed federation: commands",
        "",
        f"Hospitals reach the coordinator at `{settings['host']}:{settings['public_port']}` (the nginx edge: mutual TLS",
        "with this federation's CA and its revocation list, Fleet API only). The SuperLink runs in a private network",
        "namespace: no port of it exists on this machine, and only this account can open the sockets in",
        f"`{layout.sockets.resolve()}`.",
        "",
        "## 0. Before anything else: move the two private keys off this server",
        "",
        f"- `{root}/ca-offline/` to offline storage (a USB key in a safe). `add-hospital` and `revoke` need it again",
        "  (`--ca-key PATH`).",
        f"- `{root}/operator/` to the operator's workstation (with a DermFed checkout of the release you run).",
        "",
        "`deploy serve` refuses to start while either key is still in this folder.",
        "",
        "## 1. Each hospital makes its own keys and sends you its request",
        "",
        "```bash",
        "dermfed node keygen --dir /etc/dermfed/HOSPITAL --name HOSPITAL     # at the hospital; sends request.json",
        f"dermfed deploy add-hospital --dir {root} --request request.json --ca-key /media/offline/ca.key",
        "```",
        "",
        f"`add-hospital` writes `{root}/hospitals/HOSPITAL/` (public files only): send them back to the hospital.",
        "",
        "## 2. Start the coordinator's daemons, register the hospitals' node keys",
        "",
        "```bash",
        f"dermfed deploy serve --dir {root}       # SuperLink (private network) + edge; stops both together",
        f"dermfed deploy register --dir {root}    # writes coordinator/registry.json",
        f"dermfed deploy ls --dir {root}          # nodes and runs",
        "```",
        "",
        "## 3. Sign a run on the operator's workstation, submit it here",
        "",
        "```bash",
        f"dermfed deploy sign --operator ~/dermfed-operator --config paper --run-dir {root}/runs/pretrain-1 \\",
        "    --out pretrain-1.manifest.json               # on the workstation: prints the bundle's sha256",
        f"dermfed deploy run --dir {root} --manifest pretrain-1.manifest.json   # here, from the same release",
        "```",
        "",
        "Each hospital approves the bundle's sha256 (`dermfed node approve`) after reviewing the release; a run of",
        "an unapproved bundle, an unsigned, changed or expired manifest, or a manifest used before is refused at",
        "every hospital before any code loads. To continue an interrupted run, sign a new manifest with `--resume`",
        "and the same `--run-dir`.",
        "",
        "## 4. Revoke a hospital",
        "",
        "```bash",
        f"dermfed deploy revoke HOSPITAL --dir {root} --ca-key /media/offline/ca.key",
        "```",
        "",
        "The edge refuses its certificate at once (revocation list reloaded), its node is unregistered and marked",
        "revoked in the registry.",
        "",
    ]
    if hospitals:
        lines += ["Hospitals of this federation: " + ", ".join(f"`{h}`" for h in hospitals), ""]
    return "\n".join(lines)


def hospital_commands(layout: FederationLayout, name: str) -> str:
    settings = layout.settings()
    return "\n".join([
        f"# DermFed: hospital {name}",
        "",
        "These files are public: the federation's CA certificate (`ca.crt`), your client certificate (`client.crt`,",
        "signed from your request), the operator's app-signing public key (`trusted-app-keys.pub`) and your settings",
        "(`hospital.json`). Copy them into the folder where `dermfed node keygen` made your keys (they never left it),",
        "install DermFed (`make install`) and nginx (`apt-get install nginx-light`), check your images, review and",
        "approve the release the coordinator runs, and start the daemon:",
        "",
        "```bash",
        "dermfed data summary --config paper data.format=folder data.root=/data/dermoscopy",
        "git -C dermfed-release checkout vX.Y && dermfed node bundle-hash --source dermfed-release   # the reviewed release",
        "dermfed node approve --dir /etc/dermfed/" + name + " SHA256 --note 'vX.Y reviewed by ...'",
        "dermfed node start --dir /etc/dermfed/" + name + " --data-root /data/dermoscopy --state-dir /var/lib/dermfed \\",
        "    --node-config 'dp-enabled=true dp-max-epsilon=8 min-batch-size=16 allow-plain-metrics=false'",
        "```",
        "",
        "`dermfed node start` runs a local nginx forwarder that presents your client certificate to the coordinator",
        f"({settings['host']}:{settings['public_port']}) and, in a private network namespace that no other account",
        "on this machine can reach, the Flower SuperNode and a SuperExec that runs only runs the operator signed,",
        "of bundles you approved, within your limits. Your images never leave this machine.",
        "",
    ])
