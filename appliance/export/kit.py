"""The launch kit of a vLLM export: the `vllm serve` lines, Kubernetes manifests and a README for the platform team."""

from __future__ import annotations

import shlex

PORT = 8000
SECRET = "bankllm-vllm"  # a Kubernetes Secret with the API key clients must send (key: api-key)


def _serve_script(title: str, args: list[str]) -> str:
    words = [shlex.quote(a) if not a.startswith('"') else a for a in args]
    lines = [" ".join(words[:3])]  # vllm serve MODEL
    for word in words[3:]:  # one flag (and its value) per line
        if word.startswith("--") or not lines[1:]:
            lines.append(word)
        else:
            lines[-1] += f" {word}"
    cmd = " \\\n    ".join(lines)
    return f"""#!/bin/sh
# {title}
# The export is expected at $MODEL_DIR (default /models/bankllm); nothing is fetched from the network.
set -eu
MODEL_DIR="${{MODEL_DIR:-/models/bankllm}}"
: "${{VLLM_API_KEY:?set VLLM_API_KEY to the API key clients must send}}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec {cmd}
"""


def serve_args(name: str, mount: str, lora: bool, adapter_name: str, max_lora_rank: int) -> list[str]:
    """The `vllm serve` argument list (with $MODEL_DIR and $VLLM_API_KEY left for the shell or the pod)."""
    if not lora:
        return ["vllm", "serve", f"{mount}/model", "--served-model-name", name, "--host", "0.0.0.0",
                "--port", str(PORT), "--api-key", "$(VLLM_API_KEY)"]
    return ["vllm", "serve", f"{mount}/base", "--served-model-name", f"{name}-base", "--host", "0.0.0.0",
            "--port", str(PORT), "--api-key", "$(VLLM_API_KEY)", "--enable-lora",
            "--lora-modules", f"{adapter_name}={mount}/adapter", "--max-lora-rank", str(max_lora_rank)]


def _shell(args: list[str], mount: str) -> list[str]:
    """The pod's argument list written for sh: $(VAR) (Kubernetes) becomes "$VAR", the mount becomes $MODEL_DIR."""
    out = []
    for a in args:
        a = a.replace(mount, "$MODEL_DIR")
        out.append(f'"{a.replace("$(VLLM_API_KEY)", "$VLLM_API_KEY")}"' if "$" in a else a)
    return out


def _manifests(name: str, mount: str, args: list[str]) -> dict[str, dict]:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "vllm"}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "replicas": 1, "selector": {"matchLabels": dict(labels)},
            "template": {"metadata": {"labels": dict(labels)}, "spec": {
                "containers": [{
                    "name": "vllm",
                    # The bank's mirror of vLLM's OpenAI-compatible server image: replace before applying.
                    "image": "REGISTRY/vllm/vllm-openai:TAG",
                    "command": args[:2], "args": args[2:],
                    "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
                            {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "api-key"}}}],
                    "ports": [{"name": "http", "containerPort": PORT}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 10,
                                       "failureThreshold": 60},
                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                    "securityContext": {"allowPrivilegeEscalation": False},
                    "volumeMounts": [{"name": "model", "mountPath": mount, "readOnly": True}],
                }],
                "volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": f"{name}-model"}}],
            }},
        },
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": dict(labels)},
               "spec": {"selector": dict(labels), "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{name}-model", "labels": dict(labels)},
           "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "STORAGE"}}}}
    return {"deployment.yaml": deployment, "service.yaml": service, "pvc.yaml": pvc}


def render_kit(*, name: str, mount: str, architecture: str, rank: int, max_lora_rank: int, adapter_name: str,
               default_max_rank: int, storage_gib: int) -> dict[str, tuple[str, int]]:
    """Relative path -> (text, mode) of every launch-kit file."""
    import yaml

    merged = serve_args(name, mount, False, adapter_name, max_lora_rank)
    lora = serve_args(name, mount, True, adapter_name, max_lora_rank)
    files: dict[str, tuple[str, int]] = {
        "launch/serve-merged.sh": (_serve_script("Serve the merged 16-bit model with vLLM (recommended).",
                                                 _shell(merged, mount)), 0o755),
        "launch/serve-lora.sh": (_serve_script("Serve the base with the adapter unmerged (vLLM LoRA).",
                                               _shell(lora, mount)), 0o755),
    }
    for file, manifest in _manifests(name, mount, merged).items():
        text = yaml.safe_dump(manifest, sort_keys=False).replace("STORAGE", f"{storage_gib}Gi")
        files[f"launch/k8s/{file}"] = (text, 0o644)
    rank_note = ("vLLM's default --max-lora-rank (16) holds it" if max_lora_rank == default_max_rank
                 else f"serve-lora.sh passes --max-lora-rank {max_lora_rank}, vLLM's default is {default_max_rank}")
    files["launch/README.md"] = (f"""# {name}: a bankllm export for vLLM

Made by `bankllm export --format vllm`. Architecture {architecture}; LoRA rank {rank} ({rank_note}).

| path | what |
| --- | --- |
| `model/` | the adapter merged into the 16-bit base: what `serve-merged.sh` serves (recommended) |
| `base/`, `adapter/` | the 16-bit base and the PEFT LoRA, for `serve-lora.sh` (`--enable-lora --lora-modules`) |
| `labels.json`, `bankllm-task.json`, `answers.toml` | the intents, the classify prompt and the approved answers the appliance serves beside the model |
| `manifest.json` | sha256 of every file: check it after copying |
| `launch/` | these scripts and `k8s/` (Deployment, Service, PersistentVolumeClaim) |

## Check the copy

    cd /models/{name} && python3 -c "import json,hashlib,sys; m=json.load(open('manifest.json'))['files']; \\
      bad=[p for p,h in m.items() if hashlib.sha256(open(p,'rb').read()).hexdigest()!=h]; print(bad or 'ok'); sys.exit(bool(bad))"

## Run on one GPU machine

    export VLLM_API_KEY=...        # the key clients send as 'Authorization: Bearer ...'
    MODEL_DIR=/models/{name} sh launch/serve-merged.sh

Both scripts set `HF_HUB_OFFLINE=1`: vLLM reads only the export. Clients use model id `{name}` (merged) or
`{adapter_name}` (LoRA; `{name}-base` is the base alone).

## Kubernetes

1. Copy this directory onto the volume behind the claim `{name}-model` (`launch/k8s/pvc.yaml`, {storage_gib} GiB),
   mounted read-only at `{mount}`.
2. `kubectl create secret generic {SECRET} --from-literal=api-key=...`
3. Replace `REGISTRY/vllm/vllm-openai:TAG` in `deployment.yaml` with the bank's mirror of vLLM's image.
4. `kubectl apply -f launch/k8s/`; the pod is ready when `/health` answers; the Service listens on port {PORT}.

## Query

    curl -s http://HOST:{PORT}/v1/chat/completions -H "Authorization: Bearer $VLLM_API_KEY" \\
      -H 'Content-Type: application/json' \\
      -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "I lost my card"}}], "temperature": 0}}'
""", 0o644)
    return files
