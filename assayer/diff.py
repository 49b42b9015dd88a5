"""Diffing one listing against the last: which checkpoint versions are new, still settling, or gone.

A version is ready once the same fingerprint has been seen for `settle_seconds`. What a poll must keep
between runs is small: the fingerprint of every handled checkpoint (`known`) and, for the ones still
settling, the fingerprint and the time it was first seen (`pending`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from assayer.checkpoints import Checkpoint


@dataclasses.dataclass(frozen=True)
class Pending:
    """A checkpoint version that has not settled yet, or whose format marks it as incomplete."""

    fingerprint: str
    first_seen: float
    reported: bool = False

    def dumps(self) -> str:
        return json.dumps([self.fingerprint, self.first_seen, self.reported])

    @classmethod
    def loads(cls, text: bytes | str) -> Pending:
        fingerprint, first_seen, reported = json.loads(text)
        return cls(fingerprint, first_seen, reported)


@dataclasses.dataclass
class Plan:
    """The outcome of one diff: versions to evaluate now, what is still settling, what is gone."""

    ready: dict[str, Checkpoint] = dataclasses.field(default_factory=dict)
    pending: dict[str, Pending] = dataclasses.field(default_factory=dict)
    known: dict[str, str] = dataclasses.field(default_factory=dict)
    gone: list[str] = dataclasses.field(default_factory=list)


def digest(listing: dict[str, Checkpoint]) -> str:
    """Return a short hash of a listing; equal digests mean nothing was added, removed or changed."""
    hasher = hashlib.sha1()
    for relative in sorted(listing):
        hasher.update(relative.encode("utf-8", "surrogateescape"))
        hasher.update(b"\0" + listing[relative].fingerprint.encode() + b"\n")
    return hasher.hexdigest()


def plan(
    listing: dict[str, Checkpoint],
    known: dict[str, str],
    pending: dict[str, Pending],
    now: float,
    settle_seconds: float,
    baseline: bool = False,
    backfill: bool = False,
) -> Plan:
    """Diff `listing` against what earlier polls saw.

    Args:
        listing: this poll's checkpoints; may be a subset holding only the pending ones when the
            caller knows that nothing else changed.
        known: fingerprint of each checkpoint already handled (evaluated, queued or pre-existing).
        pending: the versions seen before that had not settled.
        now: the time of this poll, in seconds since the epoch.
        settle_seconds: how long a fingerprint must stay the same before the version is ready.
        baseline: this is the watch's first poll without `--eval_existing`: everything present is
            recorded as known and nothing is evaluated.
        backfill: evaluate everything present, known or not (`--eval_existing`); the caller drops
            versions that already have a record. A version last modified at least `settle_seconds`
            ago is ready at once instead of waiting one more interval.

    Returns:
        The plan. `known` holds only additions and changes; `gone` the known paths no longer listed.
    """
    result = Plan()
    for relative, checkpoint in listing.items():
        if baseline:
            result.known[relative] = checkpoint.fingerprint
            continue
        if not backfill and known.get(relative) == checkpoint.fingerprint:
            continue
        earlier = pending.get(relative)
        if earlier is not None and earlier.fingerprint == checkpoint.fingerprint:
            first_seen, reported = earlier.first_seen, earlier.reported
        elif backfill and now - checkpoint.modified >= settle_seconds:
            first_seen, reported = now - settle_seconds, False
        else:
            first_seen, reported = now, False
        if now - first_seen >= settle_seconds:
            result.ready[relative] = checkpoint
        else:
            result.pending[relative] = Pending(checkpoint.fingerprint, first_seen, reported)
    result.gone = [relative for relative in known if relative not in listing]
    return result
