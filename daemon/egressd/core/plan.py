"""The enforcement plan: policies, bindings and workloads joined into what the kernel and the
shim need. Pure; built whole on every change, so that a change is validated before anything is
applied."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import FieldError, ValidationError
from .policy import DEFAULT_POLICY_ID, Policy, RestrictionMode
from .verdict import CompiledPolicy
from .workloads import Workload, WorkloadIndex, check_overlaps

ACCEPT = "accept"


@dataclass(frozen=True)
class WorkspacePlan:
    workspace_id: str
    policy: Policy
    compiled: CompiledPolicy = field(compare=False)

    @property
    def key(self) -> str:
        """Prefix of this workspace's nftables objects. Workspace ids are [A-Za-z0-9_.-]; the
        object suffixes hold no underscore, so the name maps back to one workspace."""
        return f"ws_{self.workspace_id}"

    @property
    def restricted(self) -> bool:
        return self.policy.restriction_mode == RestrictionMode.RESTRICTED_ACCESS

    def chain_for(self, product: str) -> str | None:
        """The chain a workload of this product jumps to, or None when nothing is restricted."""
        if not self.restricted:
            return None
        return f"{self.key}_dry" if self.policy.is_dry_run(product) else f"{self.key}_enf"


@dataclass(frozen=True)
class Plan:
    workspaces: Mapping[str, WorkspacePlan]
    workloads: tuple[Workload, ...]
    index: WorkloadIndex = field(compare=False)

    def workspace_of(self, workload: Workload) -> WorkspacePlan:
        return self.workspaces[workload.workspace_id]


def build_plan(
    policies: Mapping[str, Policy],
    bindings: Mapping[str, str],
    workloads: Iterable[Workload],
    extras: Mapping[str, tuple[Iterable[tuple[str, str]], Iterable[tuple[str, str]]]] | None = None,
    compile: Callable[..., CompiledPolicy] = CompiledPolicy,
) -> Plan:
    """Join the state. bindings: workspace id -> policy id. extras: workspace id ->
    (extra names, extra networks) from its connections. compile: how a policy is compiled,
    called as CompiledPolicy is (the engine passes a cache, so that an unchanged policy, with
    unchanged extras, is not compiled again).
    Raises ValidationError."""
    wl = tuple(sorted(workloads, key=lambda w: w.workload_id))
    errors = list(check_overlaps(wl))
    if DEFAULT_POLICY_ID not in policies:
        errors.append(FieldError("policies", f"{DEFAULT_POLICY_ID} is missing"))
    ws_ids = set(bindings) | {w.workspace_id for w in wl}
    compiled: dict[str, CompiledPolicy] = {}
    plans: dict[str, WorkspacePlan] = {}
    for ws in sorted(ws_ids):
        pid = bindings.get(ws, DEFAULT_POLICY_ID)
        policy = policies.get(pid)
        if policy is None:
            errors.append(FieldError(f"workspaces[{ws}].network_policy_id", f"policy {pid!r} does not exist"))
            continue
        extra = (extras or {}).get(ws)
        if extra:
            cp = compile(policy, extra_names=tuple(extra[0]), extra_networks=tuple(extra[1]))
        else:
            cp = compiled.get(pid) or compiled.setdefault(pid, compile(policy))
        plans[ws] = WorkspacePlan(ws, policy, cp)
    if errors:
        raise ValidationError(errors)
    return Plan(plans, wl, WorkloadIndex(wl))
