"""``splitllm export``: a committed adapter version as a standard PEFT adapter directory for the whole model.

The version's tensors (``user/...``, ``edge/...``, ``cloud/...``) are put into a peft model made of the plain
transformers model (``PeftModel`` over ``AutoModelFor...``), by mapping each peft parameter name onto our
normalised adapter key (the model family's ``normalise``); peft itself then writes ``adapter_config.json``
and ``adapter_model.safetensors``, so keys and config are exactly as peft writes them. A classification
deployment's trained head goes in as peft's ``modules_to_save``. ``splitllm.json`` beside them says what the
adapter belongs to: the base model's path, the task, the label names, the version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from shared.config.deployment import Experiment
from shared.model.adapters import peft_config
from shared.model.partition import layout, normalise
from shared.model.sources import resolve_model
from shared.protocol.bundle import AdapterBundle

INFO_FILE = "splitllm.json"


class ExportError(RuntimeError):
    """The version cannot be exported (missing, or its tensors do not fit the model); reported in one line."""


def load_adapters(model: torch.nn.Module, adapters: dict[str, torch.Tensor], normalise: Callable[[str], str]) -> None:
    """Copy our adapter tensors (normalised keys) into the peft model's trainable parameters, all of them."""
    params = {name: p for name, p in model.named_parameters() if ".original_module." not in name}
    placed: dict[str, str] = {}
    for name, param in params.items():
        key = normalise(name)
        if key not in adapters:
            continue
        value = adapters[key]
        if tuple(value.shape) != tuple(param.shape):
            raise ExportError(f"{key}: the version holds shape {tuple(value.shape)}, the peft model "
                              f"{tuple(param.shape)} (a pruned or rank-reduced adapter cannot be exported as is)")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        placed[key] = name
    missing = sorted(set(adapters) - set(placed))
    untrained = sorted(n for n, p in params.items() if p.requires_grad and normalise(n) not in placed)
    if missing or untrained:
        raise ExportError(f"adapter keys and the peft model disagree: {len(missing)} keys without a place "
                          f"(e.g. {missing[:2]}), {len(untrained)} trainable parameters without a value "
                          f"(e.g. {untrained[:2]})")


def export_peft(meta: dict[str, Any], bundle: AdapterBundle, out: Path, version: int) -> Path:
    """Write ``out`` as a peft adapter directory for the whole model; returns ``out``."""
    from peft import get_peft_model

    from shared.lab.verify import whole_model

    experiment = Experiment.from_meta(meta)
    spec = experiment.spec
    source = resolve_model(spec.model)
    config = peft_config(spec.lora, source.family, spec.adapter)
    config.task_type = "SEQ_CLS" if spec.task == "cls" else "CAUSAL_LM"  # SEQ_CLS: peft saves the head too
    config.base_model_name_or_path = str(source.path)
    base = whole_model(source, spec.task, spec.num_labels)
    modules = layout(source.family, base, spec.task)  # before peft wraps it: the plain model's module paths
    model = get_peft_model(base, config)
    load_adapters(model, {k: v for state in bundle.values() for k, v in state.items()},
                  lambda name: normalise(name, modules))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    labels = experiment.data.load().label_names if spec.task == "cls" else []
    info = {"version": version, "model": spec.model, "base_model": str(source.path), "family": source.family.name,
            "task": spec.task, "num_labels": spec.num_labels, "label_names": labels, "split": list(spec.split),
            "max_len": experiment.data.max_len, "adapter": spec.adapter}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def from_cloud(url: str, version: int | None, token: str | None, verify: str | bool = True) -> tuple[dict, AdapterBundle, int]:
    """The deployment's spec and a version's adapters from a running cloud (its current version by default)."""
    from safetensors.torch import load

    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120, verify=verify) as client:
        if version is None:
            version = int(client.get("/healthz").json()["version"])
        spec, tensors = client.get("/v1/spec"), client.get(f"/v1/adapters/{version}")
        for r in (spec, tensors):
            if r.status_code != 200:
                raise ExportError(f"{r.request.url}: HTTP {r.status_code} {r.text[:200]}")
    return spec.json(), AdapterBundle.from_tensors(load(tensors.content)), version


def from_data_dir(data_dir: Path, version: int | None) -> tuple[dict, AdapterBundle, int]:
    """The same from a cloud's data directory (offline; the cloud may be running or not)."""
    from cloud_server.store import Store

    if not (data_dir / "splitllm.db").exists():
        raise ExportError(f"{data_dir} is not a cloud's data directory (no splitllm.db)")
    store = Store(data_dir)
    try:
        meta = store.get_setting("experiment")
        if meta is None:
            raise ExportError(f"{data_dir}: the store does not record its deployment (a cloud older than "
                              f"`splitllm export`); export with --cloud from the running cloud instead")
        version = store.latest_version() if version is None else version
        try:
            return meta, store.load_version(version), version
        except KeyError:
            raise ExportError(f"{data_dir}: no adapter version {version}") from None
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitllm export", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cloud", help="a running cloud's URL (with --admin-token)")
    where.add_argument("--data-dir", type=Path, help="a cloud's data directory, offline")
    parser.add_argument("--version", type=int, default=None, help="adapter version (default: the latest)")
    parser.add_argument("--out", type=Path, required=True, help="the directory to write")
    parser.add_argument("--admin-token", default=os.environ.get("SPLITLLM_ADMIN_TOKEN"),
                        help="with --cloud: an admin's bearer credential, or @FILE (default: $SPLITLLM_ADMIN_TOKEN)")
    parser.add_argument("--ca-file", default=None, help="CA bundle for a cloud with a private CA")
    args = parser.parse_args(argv)
    try:
        if args.cloud:
            token = args.admin_token
            if token and token.startswith("@"):
                token = Path(token[1:]).read_text().strip()
            meta, bundle, version = from_cloud(args.cloud, args.version, token, args.ca_file or True)
        else:
            meta, bundle, version = from_data_dir(args.data_dir, args.version)
        out = export_peft(meta, bundle, args.out, version)
    except (ExportError, httpx.HTTPError, ValueError, OSError) as exc:
        print(f"splitllm export: error: {exc}", file=sys.stderr)
        return 2
    print(f"version {version} of {meta['spec']['model']} written to {out} (adapter_config.json, "
          f"adapter_model.safetensors, {INFO_FILE})")
    return 0
