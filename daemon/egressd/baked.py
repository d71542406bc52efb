"""What the node image bakes in: the config file and the policy files of ``[policies] dir``.

Reading files is all this module does; validation is the pure core's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .core.config import Config, parse_config
from .core.policy import DEFAULT_POLICY_ID, Policy, default_policy, parse_policy
from .core.workloads import Workload
from .errors import FieldError, ValidationError


@dataclass(frozen=True)
class Baked:
    config: Config
    policies: dict[str, Policy]
    bindings: dict[str, str]
    workloads: tuple[Workload, ...]


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValidationError(FieldError("", f"cannot read {p}: {e.strerror}")) from None
    return parse_config(text, str(p))


def load_policies(cfg: Config) -> dict[str, Policy]:
    """Every *.json in policies.dir, plus default-policy (FULL_ACCESS unless a file says otherwise)."""
    errors: list[FieldError] = []
    policies: dict[str, Policy] = {}
    origin: dict[str, str] = {}
    d = Path(cfg.policies.dir)
    files = sorted(d.glob("*.json")) if d.is_dir() else []
    default_path = Path(cfg.policies.default_policy_path) if cfg.policies.default_policy_path else None
    if default_path is not None and default_path.is_file() and default_path not in files:
        files.append(default_path)  # an absolute path outside the directory
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            errors.append(FieldError(str(f), f"cannot read policy: {e}"))
            continue
        try:
            pol = parse_policy(doc)
        except ValidationError as e:
            errors.extend(FieldError(f"{f}: {fe.path}", fe.message) for fe in e.errors)
            continue
        pid = pol.network_policy_id
        if f == default_path and pid != DEFAULT_POLICY_ID:
            errors.append(FieldError(f"{f}: network_policy_id", f"the default policy file must hold {DEFAULT_POLICY_ID!r}, not {pid!r}"))
            continue
        if pid in policies:
            errors.append(FieldError(f"{f}: network_policy_id", f"{pid!r} is also defined in {origin[pid]}"))
            continue
        policies[pid] = pol
        origin[pid] = str(f)
    if errors:
        raise ValidationError(errors)
    policies.setdefault(DEFAULT_POLICY_ID, default_policy())
    return policies


def load_baked(config_path: str | Path) -> Baked:
    cfg = load_config(config_path)
    policies = load_policies(cfg)
    bindings = {b.workspace_id: b.network_policy_id for b in cfg.workspaces}
    errors = [
        FieldError(f"workspaces[{i}].network_policy_id", f"policy {b.network_policy_id!r} is not defined in {cfg.policies.dir}")
        for i, b in enumerate(cfg.workspaces)
        if b.network_policy_id not in policies
    ]
    if errors:
        raise ValidationError(errors)
    return Baked(cfg, policies, bindings, tuple(cfg.workloads))
