"""Idempotent provisioning of every stream and bucket.

Semantic differences (subjects, retention; a bucket's history, TTL, markers) are
conflicts: reported, never applied. Tunables (replicas and every limit a StreamSpec /
BucketSpec declares: max_age, max_msg_size, duplicate_window, and any limit added there
that names a StreamConfig field such as max_bytes, max_msgs_per_subject, discard) are
compared too: a difference is reported as `differs` and applied by `update=True`
(`svc streams ensure --update`), so new limits reach existing deployments.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError

from contracts.streams import BUCKETS, STREAMS, BucketSpec, Retention, StreamSpec
from services.runtime.errors import ProvisioningError, StreamsMissingError

log = logging.getLogger(__name__)

Action = Literal["created", "unchanged", "differs", "updated", "conflict", "failed"]

CREATE_HINT = "run 'svc streams ensure' (or start any role) to create"

# StreamSpec fields that are not tunables, and spec fields named differently in nats-py.
_SEMANTIC = frozenset({"name", "subjects", "retention", "description"})
_RENAMED = {"max_age_s": "max_age", "duplicate_window_s": "duplicate_window"}
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(StreamConfig))
# "Unlimited" as nats-server reports it back, per field (nats-py sends None as absent).
_UNLIMITED: dict[str, Any] = {
    "max_age": 0.0,
    "max_bytes": -1,
    "max_msgs": -1,
    "max_msgs_per_subject": -1,
    "max_msg_size": -1,
    "discard": "old",
}


@dataclass(frozen=True)
class Provisioned:
    """What provisioning did with one stream or bucket."""

    kind: Literal["stream", "bucket"]
    name: str
    action: Action
    detail: str = ""


def stream_tunables(spec: StreamSpec) -> dict[str, Any]:
    """The StreamConfig fields a spec's tunables set (every non-semantic spec field)."""
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(spec):
        if field.name in _SEMANTIC:
            continue
        key = _RENAMED.get(field.name, field.name)
        if key not in _CONFIG_FIELDS:
            raise ProvisioningError(f"StreamSpec.{field.name} names no StreamConfig field")
        value = getattr(spec, field.name)
        if key == "discard" and isinstance(value, str):
            value = DiscardPolicy(value)
        out[key] = None if key in _UNLIMITED and not value else value  # 0: unlimited
    return out


def stream_config(spec: StreamSpec, replicas: int = 1) -> StreamConfig:
    """The nats-py config for a stream spec."""
    config = StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=(
            RetentionPolicy.WORK_QUEUE
            if spec.retention is Retention.WORKQUEUE
            else RetentionPolicy.LIMITS
        ),
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
    )
    return dataclasses.replace(config, **stream_tunables(spec))


def _bucket_tunables(spec: BucketSpec, replicas: int) -> dict[str, Any]:
    """The KV stream's config fields a bucket spec sets (as nats-py's create_key_value)."""
    return {
        "num_replicas": replicas,
        "max_msg_size": spec.max_value_size,
        "max_age": spec.max_age_s or None,
    }


def retention_name(config: StreamConfig) -> str:
    """The retention policy's name (nats-py returns a str or an enum, depending on the call)."""
    return RetentionPolicy(config.retention or RetentionPolicy.LIMITS).value


def _norm(key: str, value: Any) -> Any:
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return _UNLIMITED.get(key, 1 if key == "num_replicas" else None)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _label(key: str) -> str:
    return "replicas" if key == "num_replicas" else key


def _differences(wanted: dict[str, Any], live: StreamConfig) -> list[str]:
    """`replicas 1 -> wanted 3`, per tunable whose live value is not the wanted one."""
    out = []
    for key, want in wanted.items():
        have = getattr(live, key)
        if _norm(key, have) != _norm(key, want):
            out.append(f"{_label(key)} {_norm(key, have)} \u2192 wanted {_norm(key, want)}")
    return out


def _stream_conflicts(spec: StreamSpec, live: StreamConfig) -> list[str]:
    want = stream_config(spec)
    problems: list[str] = []
    if set(live.subjects or []) != set(want.subjects or []):
        problems.append(f"subjects are {live.subjects}, expected {want.subjects}")
    live_retention = retention_name(live)
    if live_retention != spec.retention.value:
        problems.append(f"retention is {live_retention}, expected {spec.retention.value}")
    return problems


def _bucket_conflicts(spec: BucketSpec, live: StreamConfig) -> list[str]:
    problems: list[str] = []
    if live.max_msgs_per_subject != spec.history:
        problems.append(f"history is {live.max_msgs_per_subject}, expected {spec.history}")
    if not live.allow_msg_ttl:
        problems.append("per-key TTL (allow_msg_ttl) is off, leases could never expire")
    if live.subject_delete_marker_ttl:
        problems.append("limit markers are on, they break lease reads and re-acquisition")
    return problems


async def _compare(
    js: JetStreamContext,
    kind: Literal["stream", "bucket"],
    name: str,
    live: StreamConfig,
    conflicts: list[str],
    wanted: dict[str, Any],
    update: bool,
) -> Provisioned:
    """Judge one existing stream: conflict, unchanged, differs -- or apply (`update`)."""
    if conflicts:
        return Provisioned(kind, name, "conflict", "; ".join(conflicts))
    differences = _differences(wanted, live)
    if not differences:
        return Provisioned(kind, name, "unchanged")
    detail = ", ".join(differences)
    if not update:
        return Provisioned(
            kind, name, "differs", f"{detail}; run 'svc streams ensure --update' to apply"
        )
    try:
        await js.update_stream(dataclasses.replace(live, **wanted))
    except (APIError, nats.errors.Error) as exc:
        reason = getattr(exc, "description", None) or str(exc) or type(exc).__name__
        return Provisioned(kind, name, "failed", f"{detail}: the server refused: {reason}")
    log.info("provisioning updated", extra={"kind": kind, "resource": name, "changes": detail})
    return Provisioned(kind, name, "updated", detail)


async def ensure_streams(
    js: JetStreamContext, *, replicas: int = 1, update: bool = False
) -> list[Provisioned]:
    """Create what is missing; report (don't change) conflicting semantics; report tunables
    that differ from the specs -- and, with `update`, apply them."""
    results: list[Provisioned] = []
    for spec in STREAMS:
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(stream_config(spec, replicas))
            results.append(Provisioned("stream", spec.name, "created"))
            continue
        wanted = {"num_replicas": replicas, **stream_tunables(spec)}
        conflicts = _stream_conflicts(spec, info.config)
        results.append(
            await _compare(js, "stream", spec.name, info.config, conflicts, wanted, update)
        )
    for bucket in BUCKETS:
        stream_name = f"KV_{bucket.name}"
        try:
            info = await js.stream_info(stream_name)
        except NotFoundError:
            # history=1, no limit markers, per-key TTL on (nats-py sets allow_msg_ttl).
            await js.create_key_value(
                bucket=bucket.name,
                history=bucket.history,
                description=bucket.description,
                max_value_size=bucket.max_value_size,
                ttl=bucket.max_age_s or None,
                replicas=replicas,
            )
            results.append(Provisioned("bucket", bucket.name, "created"))
            continue
        conflicts = _bucket_conflicts(bucket, info.config)
        wanted = _bucket_tunables(bucket, replicas)
        results.append(
            await _compare(js, "bucket", bucket.name, info.config, conflicts, wanted, update)
        )
    for r in results:
        if r.action == "created":
            log.info("provisioned", extra={"kind": r.kind, "resource": r.name})
    return results


def warn_on_differences(results: list[Provisioned]) -> None:
    """At a role's start: say which tunables differ from the specs (and keep running)."""
    for r in results:
        if r.action == "differs":
            log.warning(f"{r.kind} {r.name} differs: {r.detail}")


async def missing_streams(js: JetStreamContext, names: Iterable[str]) -> list[str]:
    """Which of `names` (streams) do not exist."""
    missing = []
    for name in names:
        try:
            await js.stream_info(name)
        except NotFoundError:
            missing.append(name)
    return missing


def missing_message(missing: list[str], consequence: str) -> str:
    """One line: which streams are missing, what that means here, how to create them."""
    if len(missing) == 1:
        which, them = f"stream {missing[0]} does not", "it"
    else:
        which, them = f"streams {', '.join(missing)} do not", "them"
    return (
        f"{which} exist yet (a fresh server: no role has started): {consequence};"
        f" {CREATE_HINT} {them}"
    )


async def require_streams(js: JetStreamContext, names: Iterable[str], consequence: str) -> None:
    """Raise StreamsMissingError (one line) if any of `names` is missing."""
    if missing := await missing_streams(js, names):
        raise StreamsMissingError(missing_message(missing, consequence))


def raise_on_conflict(results: list[Provisioned]) -> None:
    """Refuse to run on streams whose semantics differ from ours."""
    conflicts = [r for r in results if r.action == "conflict"]
    if conflicts:
        first = conflicts[0]
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise ProvisioningError(
            f"{first.kind} {first.name} conflicts: {first.detail}{more}; it was left unchanged"
            " -- inspect with 'svc streams ensure', fix or remove it with the nats CLI"
        )
