"""Re-verifying what the central collector stores, as an auditor.

``verify_collector`` walks every chain the collector holds (the collectors'
own included) through ``ztgpu.audit.events.verify_chain``, checks the nodes'
signed checkpoints against the site CA, and tells a recorded gap (an
``audit.gap`` event of a collector's own chain) from a deletion. Findings go
into a ``VerifyReport``; only an unreadable collector raises.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from ztgpu.audit.client import AuditClient, EventQuery, NodeSummary, _is_seq
from ztgpu.audit.events import checkpoint_message, verify_chain

if TYPE_CHECKING:  # cryptography loads only when used
    from cryptography import x509


@dataclass(frozen=True)
class RecordedGap:
    """An ``audit.gap`` event of a collector: seqs expected..received-1 never arrived."""

    source_node: str
    expected_seq: int
    received_seq: int
    #: The collector chain and seq of the ``audit.gap`` event.
    recorder: str
    recorder_seq: int

    def describe(self) -> str:
        return (f"recorded gap: {_seqs(self.expected_seq, self.received_seq - 1)} never "
                f"reached the collector (audit.gap {self.recorder} seq {self.recorder_seq})")


@dataclass(frozen=True)
class ChainProblem:
    """A finding in one chain: ``broken`` (tampering, loss) or ``gap`` (a recorded gap)."""

    kind: Literal["broken", "gap"]
    seq: int | None
    message: str


@dataclass
class ChainReport:
    """The verification of one node's chain."""

    node: str
    head_seq: int
    events: int = 0
    #: Contiguous seq runs verified, e.g. ``[(1, 40), (46, 100)]``.
    ranges: list[tuple[int, int]] = field(default_factory=list)
    checkpoints: int = 0
    last_signed_seq: int | None = None
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return any(p.kind == "broken" for p in self.problems)

    @property
    def gaps(self) -> list[ChainProblem]:
        return [p for p in self.problems if p.kind == "gap"]

    @property
    def status(self) -> Literal["OK", "INCOMPLETE", "BROKEN"]:
        if self.broken:
            return "BROKEN"
        return "INCOMPLETE" if self.problems else "OK"

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """Human-readable lines: one per problem, then a summary unless broken."""
        out = []
        for problem in self.problems:
            if problem.kind == "gap":
                out.append(f"{self.node}: {problem.message}")
            elif problem.seq is not None and not problem.message.startswith("checkpoint"):
                out.append(f"{self.node}: BROKEN at seq {problem.seq}: {problem.message}")
            else:
                out.append(f"{self.node}: BROKEN: {problem.message}")
        if self.broken:
            return out
        runs = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in self.ranges)
        span = f" (seq {runs})" if runs else ""
        signed = (f"{self.checkpoints} checkpoint{'s' if self.checkpoints != 1 else ''} "
                  f"verified, last signed seq {self.last_signed_seq}"
                  if self.last_signed_seq is not None else "no checkpoints")
        plural = "s" if self.events != 1 else ""
        out.append(f"{self.node}: {self.status} {self.events} event{plural}{span}, {signed}")
        return out


@dataclass
class VerifyReport:
    """The verification of every chain the collector stores."""

    chains: list[ChainReport] = field(default_factory=list)
    #: Every trusted ``audit.gap`` record, in the collectors' order.
    recorded_gaps: list[RecordedGap] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(chain.ok for chain in self.chains)

    @property
    def events(self) -> int:
        return sum(chain.events for chain in self.chains)

    def chain(self, node: str) -> ChainReport:
        """The report of ``node``'s chain; KeyError if it was not verified."""
        for report in self.chains:
            if report.node == node:
                return report
        raise KeyError(node)

    def summary(self) -> str:
        """The final line: ``OK: N chains, M events verified`` or ``FAILED: ...``."""
        n = len(self.chains)
        if self.ok:
            return f"OK: {n} chain{'s' if n != 1 else ''}, {self.events} events verified"
        broken = [c.node for c in self.chains if c.broken]
        gapped = [c.node for c in self.chains if not c.broken and c.gaps]
        parts = []
        if broken:
            parts.append(f"{len(broken)} of {n} chains broken ({', '.join(broken)})")
        if gapped:
            parts.append(f"{len(gapped)} of {n} chains with recorded gaps "
                         f"({', '.join(gapped)})")
        return f"FAILED: {'; '.join(parts)}; {self.events} events verified"

    def lines(self) -> list[str]:
        return [line for chain in self.chains for line in chain.lines()] + [self.summary()]


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}-{last}"


def _short(digest: Any) -> str:
    return f"{str(digest)[:8]}…"


_CHECKPOINT_TS = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?Z")


def _checkpoint_time(ts: Any) -> datetime | None:
    match = _CHECKPOINT_TS.fullmatch(ts) if isinstance(ts, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    micro = int((match.group(7) or "").ljust(6, "0"))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)
    except ValueError:
        return None


def check_checkpoint(cp: Mapping[str, Any], node: str, ca: x509.Certificate) -> str | None:
    """What is wrong with one stored checkpoint of ``node``, or None if its signature holds.

    Decodes ``cert`` (base64 DER) and ``sig`` (base64) and checks with
    ``pki.verify_signature`` that a ``node`` certificate named ``node``,
    issued by ``ca`` and valid at the checkpoint's ``ts``, signed
    ``checkpoint_message`` of its node, seq, hash and ts.
    """
    from ztgpu.trust.pki import PkiError, identity_from_der, verify_signature

    if cp.get("node") != node or not _is_seq(cp.get("seq")) or not isinstance(
            cp.get("hash"), str):
        return "malformed checkpoint record"
    when = _checkpoint_time(cp.get("ts"))
    if when is None:
        return f"malformed ts {str(cp.get('ts'))[:40]!r}"
    try:
        cert_der = base64.b64decode(str(cp.get("cert")), validate=True)
        sig = base64.b64decode(str(cp.get("sig")), validate=True)
    except (binascii.Error, ValueError):
        return "cert or sig is not valid base64"
    try:
        # Nodes sign their chains; services (authd) sign their own.
        role = identity_from_der(cert_der).role
        if role not in ("node", "service"):
            return f"signed by a {role} certificate, not a node or service"
        verify_signature(cert_der, ca, checkpoint_message(cp), sig, at=when, role=role,
                         name=node)
    except PkiError as exc:
        return f"signature does not hold: {exc}"
    return None


class _Walk:
    """Splits a chain stream into gapless runs for ``verify_chain``, checking as it goes.

    ``segment()`` yields events until the next one jumps ahead in seq (it is
    kept in ``pending``). Code after each ``yield`` runs only once
    ``verify_chain`` has accepted the event (it asks for the next one only
    then), so ``accepted`` sees verified events only: it counts them, checks
    their node and compares them with the checkpoints.
    """

    def __init__(self, node: str, events: Iterator[dict[str, Any]],
                 checkpoints: dict[int, Mapping[str, Any]], report: ChainReport) -> None:
        self.node = node
        self.events = events
        self.checkpoints = checkpoints
        self.report = report
        self.pending: dict[str, Any] | None = next(events, None)
        self.last: dict[str, Any] | None = None
        self.matched: set[int] = set()
        self.stopped = False

    def segment(self) -> Iterator[dict[str, Any]]:
        event, self.pending = self.pending, None
        while event is not None:
            yield event
            self.accepted(event)
            if self.stopped:
                return
            following = next(self.events, None)
            if (following is not None and _is_seq(following.get("seq"))
                    and following["seq"] > event["seq"] + 1):
                self.pending = following
                return
            event = following

    def accepted(self, event: dict[str, Any]) -> None:
        report, seq = self.report, event["seq"]
        if event.get("node") != self.node:
            self.fail(seq, f"the event belongs to node {str(event.get('node'))[:64]!r}")
            return
        report.events += 1
        if report.ranges and report.ranges[-1][1] == seq - 1:
            report.ranges[-1] = (report.ranges[-1][0], seq)
        else:
            report.ranges.append((seq, seq))
        self.last = event
        cp = self.checkpoints.get(seq)
        if cp is None:
            return
        self.matched.add(seq)
        if cp["hash"] != event.get("hash"):
            self.fail(None, f"checkpoint seq {seq} signed hash {_short(cp['hash'])} but "
                      f"the stored event has {_short(event.get('hash'))}")
            return
        report.checkpoints += 1
        report.last_signed_seq = seq

    def fail(self, seq: int | None, message: str) -> None:
        self.report.problems.append(ChainProblem("broken", seq, message))
        self.stopped = True


def verify_chain_of(client: AuditClient, ca: x509.Certificate, summary: NodeSummary,
                    gaps: Mapping[tuple[int, int], RecordedGap]) -> ChainReport:
    """Verify one node's chain up to its head in ``summary``.

    Streams ``GET /v1/chain`` through ``events.verify_chain`` in gapless
    runs. A seq jump is a recorded gap if ``gaps`` holds exactly
    ``(expected_seq, received_seq)`` for it, otherwise the chain is broken.
    Checks every checkpoint's signature and that the stored event at its seq
    has the signed hash; that the chain ends at the stored head with its
    hash; and that every recorded gap appears in the chain.
    """
    node, head = summary.node, summary.head_seq
    report = ChainReport(node=node, head_seq=head)
    checkpoints: dict[int, Mapping[str, Any]] = {}
    for cp in client.checkpoints(node):
        seq = cp.get("seq")
        if _is_seq(seq) and seq > head:
            continue  # signed after the head was read: the next run checks it
        problem = check_checkpoint(cp, node, ca)
        if problem is not None or not _is_seq(seq):
            report.problems.append(ChainProblem("broken", seq if _is_seq(seq) else None,
                                                f"checkpoint seq {seq}: {problem}"))
        else:
            checkpoints[seq] = cp
    walk = _Walk(node, client.chain(node, until_seq=head), checkpoints, report)
    expected, seen_gaps = 1, set()
    while walk.pending is not None:
        first = walk.pending
        seq = first.get("seq")
        if _is_seq(seq) and seq > expected:
            gap = gaps.get((expected, seq))
            if gap is None:
                walk.fail(expected, f"{_seqs(expected, seq - 1)} missing and no audit.gap "
                          "records it (deleted from the store?)")
                break
            seen_gaps.add((expected, seq))
            report.problems.append(ChainProblem("gap", expected, gap.describe()))
        result = verify_chain(walk.segment())
        if not result.ok:
            walk.fail(result.first_bad_seq, result.problem or "broken link")
        if walk.stopped:
            break
        assert walk.last is not None
        expected = walk.last["seq"] + 1
    if walk.stopped:
        return report
    last_seq = walk.last["seq"] if walk.last is not None else 0
    if last_seq < head:
        walk.fail(last_seq + 1, f"{_seqs(last_seq + 1, head)} missing: the collector's head "
                  f"is seq {head} (deleted from the store?)")
    elif walk.last is not None and walk.last.get("hash") != summary.head_hash:
        walk.fail(head, f"the collector's head records hash {_short(summary.head_hash)} "
                  f"but the stored event has {_short(walk.last.get('hash'))}")
    for seq in sorted(set(checkpoints) - walk.matched):
        walk.fail(None, f"checkpoint seq {seq} signed hash {_short(checkpoints[seq]['hash'])} "
                  "but the chain has no event at that seq")
    for (expected_seq, received_seq), gap in sorted(gaps.items()):
        if (expected_seq, received_seq) not in seen_gaps and received_seq <= head:
            walk.fail(expected_seq, f"{gap.describe()}, but the stored chain has no gap there")
    return report


def recorded_gaps(client: AuditClient) -> list[RecordedGap]:
    """The ``audit.gap`` events of the collectors' own chains.

    Only chains whose seq 1 is ``collector.start`` count as a collector's:
    no node can post into such a chain (the collector refuses its own name),
    so a node cannot excuse a gap by forging an ``audit.gap`` in its own.
    """
    found: list[RecordedGap] = []
    collectors: dict[str, bool] = {}
    for event in client.events(EventQuery(code="audit.gap")):
        recorder = event.get("node")
        if not isinstance(recorder, str):
            continue
        if recorder not in collectors:
            first = client.first_event(recorder)
            collectors[recorder] = (first is not None and first.get("seq") == 1
                                    and first.get("code") == "collector.start")
        source, expected, received = (event.get("source_node"), event.get("expected_seq"),
                                      event.get("received_seq"))
        if (collectors[recorder] and isinstance(source, str) and _is_seq(expected)
                and _is_seq(received) and _is_seq(event.get("seq"))):
            found.append(RecordedGap(source, expected, received, recorder, event["seq"]))
    return found


def verify_collector(client: AuditClient, ca: x509.Certificate, *,
                     on_chain: Callable[[ChainReport], None] | None = None) -> VerifyReport:
    """Verify every chain in ``GET /v1/nodes`` (the collectors' own included).

    ``ca`` is the site CA certificate the checkpoint signers must chain to.
    ``on_chain`` is called with each chain's report as soon as it is done.
    Raises CollectorError/CollectorUnreachable if the collector cannot be
    read; findings are in the returned report, never raised.
    """
    nodes = client.nodes()
    report = VerifyReport(recorded_gaps=recorded_gaps(client))
    by_node: dict[str, dict[tuple[int, int], RecordedGap]] = {}
    for gap in report.recorded_gaps:
        by_node.setdefault(gap.source_node, {})[(gap.expected_seq, gap.received_seq)] = gap
    for summary in nodes:
        chain = verify_chain_of(client, ca, summary, by_node.get(summary.node, {}))
        report.chains.append(chain)
        if on_chain is not None:
            on_chain(chain)
    return report
