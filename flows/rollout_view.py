"""What a fleet run does for a rollout: gate its plan by the rollout's stages, record each
cluster's outcome in the rollout as it comes, read the rollout's state as a control, and
publish the rollout's forecast as one Prefect artifact per rollout (a new version only when
what it says changed: a no-op tick publishes nothing).

The logic is ``amlfs.rollout``; this module only wires it to the fleet flow and Prefect.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import time
from collections.abc import Callable, Sequence

from prefect.artifacts import create_markdown_artifact

from amlfs.errors import InventoryError, StateStoreError
from amlfs.fleet import Control, PlanRow
from amlfs.models import Fleet, Release
from amlfs.rollout import (
    Rollout,
    RolloutBook,
    cluster_gate,
    compliance,
    forecast,
    forecast_lines,
    record_outcome,
    stage_views,
    upcoming,
    windows,
)
from flows.markdown import markdown_text

__all__ = ["RolloutLink", "artifact_key", "gate_for_other_rollouts", "publish_forecast"]


def artifact_key(rollout: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) naming the rollout."""
    return "rollout-" + re.sub(r"[^a-z0-9-]+", "-", rollout.lower()).strip("-")


class RolloutLink:
    """One fleet run advancing one rollout."""

    def __init__(
        self,
        book: RolloutBook,
        name: str,
        release: Release,
        *,
        now: Callable[[], dt.datetime],
        log: Callable[[str], None],
        every_s: float = 1.0,
    ) -> None:
        self.book = book
        self.name = name
        self.now = now
        self.log = log
        self.every_s = every_s
        self.rollout = book.get(name)
        if self.rollout.release_version != release.version:
            raise InventoryError(
                f"rollout {name} rolls out {self.rollout.release_version}, but the release "
                f"file is {release.version}: use the rollout's release file "
                f"({self.rollout.release_file})"
            )
        self._read_at = time.monotonic()

    @property
    def members(self) -> dict[str, str]:
        return self.rollout.members

    def gate(self, rows: Sequence[PlanRow]) -> list[PlanRow]:
        """The plan with every admitted cluster whose stage is not open held back (with the
        reason). A cluster left half-way by an earlier run is resumed whatever its stage."""
        views = stage_views(self.rollout, self.now())
        gated = []
        for row in rows:
            if row.run and not row.interrupted:
                admitted, why = cluster_gate(self.rollout, views, row.cluster)
                row = dataclasses.replace(
                    row,
                    run=admitted,
                    reason=f"{why}; {row.reason}",
                    predicted_downtime_s=row.predicted_downtime_s if admitted else 0.0,
                )
            gated.append(row)
        return gated

    def remaining_budget(self) -> int:
        counted = max(0, self.rollout.failures() - self.rollout.forgiven_failures)
        return self.rollout.budget().remaining(counted)

    def record(self, cluster: str, outcome: str, run_name: str, reason: str) -> None:
        """The cluster's outcome in the rollout (idempotent per fleet run); logs a halt."""
        before = self.rollout.state
        try:
            self.rollout = self.book.change(
                self.name,
                lambda r: record_outcome(
                    r, cluster, outcome, at=self.now(), run_name=run_name, reason=reason
                ),
            )
        except StateStoreError as err:
            self.log(f"rollout {self.name}: cannot record {cluster} {outcome}: {err}")
            return
        if self.rollout.state != before:
            self.log(
                f"rollout {self.name}: {self.rollout.state}"
                + (f": {self.rollout.state_reason}" if self.rollout.state_reason else "")
            )

    def control(self) -> Control:
        """halt while the rollout is halted, abort once aborted; re-read at most every_s."""
        if time.monotonic() - self._read_at >= self.every_s:
            self._read_at = time.monotonic()
            try:
                self.rollout = self.book.get(self.name)
            except (StateStoreError, InventoryError) as err:
                self.log(f"rollout {self.name}: cannot read it: {err}; still {self.rollout.state}")
        if self.rollout.state == "aborted":
            return "abort"
        return "halt" if self.rollout.state == "halted" else "run"


def gate_for_other_rollouts(
    book: RolloutBook, rows: Sequence[PlanRow], now: dt.datetime
) -> list[PlanRow]:
    """A scheduled run that advances no rollout leaves the clusters of active rollouts to
    them (else a weekly tick would upgrade a wave1 cluster before its canary)."""
    owners: dict[str, str] = {}
    for rollout in book.active():
        for cluster in rollout.members:
            owners.setdefault(cluster, rollout.name)
    gated = []
    for row in rows:
        owner = owners.get(row.cluster)
        if row.run and not row.interrupted and owner is not None:
            row = dataclasses.replace(
                row,
                run=False,
                predicted_downtime_s=0.0,
                reason=f"belongs to active rollout {owner} (the rollout tick advances it)",
            )
        gated.append(row)
    return gated


def publish_forecast(
    book: RolloutBook,
    rollout: Rollout,
    fleet: Fleet,
    now: dt.datetime,
    *,
    upgrade: dt.timedelta,
    state_dir: str,
) -> bool:
    """Publish the rollout's forecast (and the fleet's compliance) as the artifact
    ``rollout-NAME`` when it says something new; True when it did."""
    result = forecast(rollout, fleet, now, upgrade=upgrade, state_dir=state_dir)
    # The windows to come up to the end of tomorrow (UTC), not a 24-hour list that moves
    # with every tick: on a large fleet a window enters that list most ticks, and each would
    # be a new version of the artifact saying nothing new. Here a window enters at midnight
    # and leaves when it opens (when its cluster starts: news).
    until = dt.datetime.combine(
        result.at.astimezone(dt.UTC).date() + dt.timedelta(days=2), dt.time(), dt.UTC
    )
    result = dataclasses.replace(
        result, upcoming=upcoming(rollout, fleet, result.at, horizon=until - result.at)
    )
    latest, since = book.latest()
    counts, rows = compliance(fleet, book.releases(), latest, since)
    # What the operator reads: the forecast and the fleet's release counts (a census that
    # learnt a cluster's release is news; a re-read that found the same is not).
    digest = hashlib.sha256(f"{result.digest()} {sorted(counts.items())}".encode()).hexdigest()[:16]
    if digest == rollout.published:
        return False
    lines = [f"# Rollout {markdown_text(rollout.name)}", ""]
    lines += [markdown_text(line.strip()) + "  " for line in forecast_lines(result, upcoming=False)]
    if result.upcoming:
        lines += [
            "",
            f"## From {result.at:%Y-%m-%d %H:%M} until {until:%Y-%m-%d %H:%M} UTC: "
            f"{windows(len(result.upcoming))}, {sum(u.runs for u in result.upcoming)} to start",
            "",
            "| window | cluster | stage | starts | why |",
            "|---|---|---|---|---|",
        ]
        for u in result.upcoming:
            cells = [u.window.isoformat(), u.cluster, u.stage, "yes" if u.runs else "held", u.why]
            lines.append("| " + " | ".join(markdown_text(v) for v in cells) + " |")
    lines += [
        "",
        "| cluster | stage | status | next window | projected done | late |",
        "|---|---|---|---|---|---|",
    ]
    for c in result.clusters:
        cells = [
            c.cluster,
            c.stage,
            c.status,
            c.next_window.isoformat() if c.next_window else "",
            c.projected_done.isoformat() if c.projected_done else "",
            "late" if c.late else "",
        ]
        lines.append("| " + " | ".join(markdown_text(v) for v in cells) + " |")
    lines += ["", "## Fleet releases", "", "| release | clusters |", "|---|---|"]
    lines += [f"| {markdown_text(r)} | {n} |" for r, n in sorted(counts.items())]
    behind = [r for r in rows if r.behind_since is not None]
    if behind:
        lines += ["", f"{len(behind)} clusters behind {markdown_text(latest)} since "]
        lines[-1] += markdown_text(min(r.behind_since for r in behind if r.behind_since))
    create_markdown_artifact(
        key=artifact_key(rollout.name),
        markdown="\n".join(lines) + "\n",
        description=markdown_text(f"rollout {rollout.name}: {result.state}"),
    )
    book.change(rollout.name, lambda r: r.model_copy(update={"published": digest}))
    return True
