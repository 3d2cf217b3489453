"""One weight update, owned by the server: who must receive what, what has arrived, until when.

A session is opened by `begin(version)` and closed by commit or abort. It knows its
participants (every engine process that must hold the new weights), the full set of tensor
names each must receive (the engine's own weight layout), what each has received so far and
whether any delivery has begun (after which the old weights may be partly overwritten). Every
delivery path records into it; commit asks it whether anything is missing. The server decides
completeness from this record alone, never from what a client claims.

Pure: no asyncio, no Ray, no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from model_engine_server.errors import WeightSyncError

EXAMPLES = 3  # names quoted in a refusal
# Results carry the version on every wire; msgpack (and most languages' integers) stop at int64
MAX_WEIGHT_VERSION = 2**63 - 1


@dataclass
class WeightSession:
    version: int
    participants: tuple[str, ...]
    expected: frozenset[str]
    deadline: float  # time.monotonic() by which commit must have happened
    received: dict[str, set[str]] = field(default_factory=dict)
    touched: bool = False  # a delivery began: the engines no longer hold the old weights intact
    ready: bool = False  # begin has drained the batches that read the old weights: deliveries may start
    deliveries_in_flight: int = 0  # loads still writing into the engines: commit waits for them

    @property
    def receivers(self) -> int:
        """How many processes receive each transport stream (one per participant)."""
        return len(self.participants)

    def start_delivery(self) -> None:
        """Called before bytes may reach an engine: from now on an abort leaves weights incomplete."""
        self.touched = True

    def delivery_began(self) -> None:
        """A load this server awaits started writing into the engines."""
        self.start_delivery()
        self.deliveries_in_flight += 1

    def delivery_ended(self) -> None:
        self.deliveries_in_flight -= 1

    def record(self, participant: str, names: Iterable[str]) -> None:
        """`participant` now holds `names` of this version (names outside the layout, e.g. a tied
        alias the engine accepts, are not counted)."""
        if participant not in self.participants:
            raise WeightSyncError(
                f"{participant!r} is not a participant of the weight update to version {self.version} "
                f"(participants: {', '.join(self.participants)})"
            )
        names = set(names)
        if names:
            self.touched = True
        self.received.setdefault(participant, set()).update(names & self.expected)

    def record_everywhere(self, names: Sequence[str]) -> None:
        """A delivery every participant took (the names each of them loaded)."""
        for participant in self.participants:
            self.record(participant, names)

    def missing(self) -> dict[str, list[str]]:
        """Per participant, the names it still lacks (only participants that lack any)."""
        lacking = {p: sorted(self.expected - self.received.get(p, set())) for p in self.participants}
        return {p: names for p, names in lacking.items() if names}

    def refusal(self) -> str | None:
        """Why this session cannot be committed, naming what is missing where; None when complete."""
        if not self.participants:
            return f"the weight update to version {self.version} has no participants"
        missing = self.missing()
        if not missing:
            return None
        parts = [
            f"{participant} is missing {len(names)} of {len(self.expected)} tensors, e.g. {names[:EXAMPLES]}"
            for participant, names in missing.items()
        ]
        return f"weights of version {self.version} did not arrive complete: {'; '.join(parts)}"
