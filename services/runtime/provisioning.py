"""Idempotent provisioning of every stream and bucket; conflicts are reported, never applied."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from contracts.streams import BUCKETS, STREAMS, BucketSpec, Retention, StreamSpec
from services.runtime.errors import ProvisioningError

log = logging.getLogger(__name__)

Action = Literal["created", "unchanged", "conflict"]


@dataclass(frozen=True)
class Provisioned:
    """What provisioning did with one stream or bucket."""

    kind: Literal["stream", "bucket"]
    name: str
    action: Action
    detail: str = ""


def stream_config(spec: StreamSpec, replicas: int = 1) -> StreamConfig:
    """The nats-py config for a stream spec."""
    return StreamConfig(
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
        max_age=spec.max_age_s or None,
        max_msg_size=spec.max_msg_size,
        duplicate_window=spec.duplicate_window_s,
        num_replicas=replicas,
    )


def retention_name(config: StreamConfig) -> str:
    """The retention policy's name (nats-py returns a str or an enum, depending on the call)."""
    return RetentionPolicy(config.retention or RetentionPolicy.LIMITS).value


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


async def ensure_streams(js: JetStreamContext, *, replicas: int = 1) -> list[Provisioned]:
    """Create what is missing; report (don't change) what exists with a conflicting config."""
    results: list[Provisioned] = []
    for spec in STREAMS:
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            await js.add_stream(stream_config(spec, replicas))
            results.append(Provisioned("stream", spec.name, "created"))
            continue
        problems = _stream_conflicts(spec, info.config)
        results.append(
            Provisioned(
                "stream", spec.name, "conflict" if problems else "unchanged", "; ".join(problems)
            )
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
        problems = _bucket_conflicts(bucket, info.config)
        results.append(
            Provisioned(
                "bucket", bucket.name, "conflict" if problems else "unchanged", "; ".join(problems)
            )
        )
    for r in results:
        if r.action == "created":
            log.info("provisioned", extra={"kind": r.kind, "resource": r.name})
    return results


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
