"""AdminService.FleetAudit on the wire: the core report to protobuf and back, and its two
renderings for operators (human-readable text and JSON), shared by the handler and the CLI."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from broker._proto.broker.v1 import admin_pb2
from broker.audit.fleet import CATEGORIES, AuditThresholds, Finding, FleetReport, Identify
from broker.errors import Unauthenticated
from broker.identity.spiffe import Kind, parse_spiffe_id


def identifier(trust_domain: str) -> Identify:
    """SPIFFE ID -> (kind, device_id or app_id), for broker.audit.fleet (which parses none)."""

    def identify(uri: str) -> tuple[str, str]:
        try:
            identity = parse_spiffe_id(uri, trust_domain)
        except Unauthenticated:
            return "unknown", uri
        if identity.kind is Kind.DEVICE:
            return "device", identity.name
        if identity.kind is Kind.APP:
            return "app", identity.app_id
        return "unknown", uri

    return identify


def thresholds_from(request: admin_pb2.FleetAuditRequest) -> AuditThresholds:
    """The request's thresholds (0 = default); InvalidArgument when out of range."""
    return AuditThresholds.from_request(
        request.since_seconds,
        request.expiring_within_seconds,
        request.fanout_min_devices,
        request.fanout_window_seconds,
    )


def report_pb(report: FleetReport) -> admin_pb2.FleetAuditResponse:
    """The core report as the RPC's response."""
    t = report.thresholds
    response = admin_pb2.FleetAuditResponse(
        generated_at_ms=report.generated_at_ms,
        since_ms=report.since_ms,
        since_seconds=t.since_seconds,
        expiring_within_seconds=t.expiring_within_seconds,
        fanout_min_devices=t.fanout_min_devices,
        fanout_window_seconds=t.fanout_window_seconds,
    )
    for name, _ in CATEGORIES:
        getattr(response, name).extend(
            admin_pb2.FleetAuditFinding(**dataclasses.asdict(f)) for f in getattr(report, name)
        )
    return response


def report_from_pb(response: admin_pb2.FleetAuditResponse) -> FleetReport:
    """The RPC's response back as the typed report (CLI side)."""
    findings = {
        name: tuple(
            Finding(f.kind, f.id, f.count, f.first_seen_ms, f.last_seen_ms, f.detail, f.value)
            for f in getattr(response, name)
        )
        for name, _ in CATEGORIES
    }
    thresholds = AuditThresholds(
        response.since_seconds,
        response.expiring_within_seconds,
        response.fanout_min_devices,
        response.fanout_window_seconds,
    )
    return FleetReport(response.generated_at_ms, response.since_ms, thresholds, **findings)


def report_json(report: FleetReport) -> str:
    """One JSON document: thresholds, times and every category (lists, empty when clean)."""
    return json.dumps(dataclasses.asdict(report), indent=2, sort_keys=True)


def _when(ms: int) -> str:
    if not ms:
        return "never"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _line(category: str, f: Finding) -> str:
    who = f"{f.kind} {f.id}"
    span = f"first {_when(f.first_seen_ms)}, last {_when(f.last_seen_ms)}"
    match category:
        case "possible_clones":
            return f"{who}: {f.count} Attach stream(s) replaced ({span}; replicas {f.detail})"
        case "key_reuse":
            return f"{who}: {f.count} refusal(s) on {f.detail} ({span})"
        case "revoked_attempts":
            return f"{who}: {f.count} refused call(s) with revoked certificate {f.detail} ({span})"
        case "expiring_offline":
            expires = _when(f.value * 1000)
            return f"{who}: certificate {f.detail} expires {expires}; last attached {_when(f.last_seen_ms)}"
        case "relay_alarms":
            return f"{who}: {f.count} alarm(s): {f.detail} ({span})"
    return f"{who}: sessions on {f.count} distinct device(s) within the window, {f.value} session(s), {f.detail} ({span})"


def report_text(report: FleetReport) -> str:
    """Sections with counts, one line per finding, "none" when a section is empty."""
    t = report.thresholds
    lines = [
        f"fleet audit from {_when(report.since_ms)} to {_when(report.generated_at_ms)} "
        f"({t.since_seconds} s); expiring within {t.expiring_within_seconds} s; fan-out "
        f">= {t.fanout_min_devices} device(s) per {t.fanout_window_seconds} s",
    ]
    for name, heading in CATEGORIES:
        findings = getattr(report, name)
        lines.append("")
        lines.append(f"{heading}: {len(findings)}")
        lines.extend(f"  {_line(name, f)}" for f in findings)
        if not findings:
            lines.append("  none")
    lines.append("")
    lines.append(f"{report.total()} finding(s)")
    return "\n".join(lines)
