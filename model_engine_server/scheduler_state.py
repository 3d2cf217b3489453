"""Small state pieces of the scheduler: the weight-version state machine and the observer hook.

Weight states:   ready --begin(v)--> updating --commit(v), complete--> ready (version v)
                                    |         \--abort (after a delivery began)--> incomplete (old version, no serving)
                                    \--abort (nothing delivered)--> ready (old version, old weights)
                 incomplete --begin(v)--> updating ...
Only `ready` serves. A version number is never attached to weights that did not fully arrive:
`updating` holds a `WeightSession`, and commit asks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from model_engine_server.errors import WeightSyncError
from model_engine_server.weight_session import MAX_WEIGHT_VERSION, WeightSession

if TYPE_CHECKING:
    from model_engine_server.errors import ModelEngineError
    from model_engine_server.protocol import LogProbResult


@dataclass
class WeightState:
    version: int = 0
    session: WeightSession | None = None
    incomplete_reason: str | None = None

    @property
    def updating_to(self) -> int | None:
        return self.session.version if self.session is not None else None

    @property
    def updating(self) -> bool:
        return self.session is not None

    @property
    def servable(self) -> bool:
        return self.session is None and self.incomplete_reason is None

    def begin(self, session: WeightSession) -> None:
        """Open `session`; refused at once while another is open or for a version not newer."""
        if self.session is not None:
            raise WeightSyncError(
                f"a weight update to version {self.session.version} is already in progress; "
                "commit or abort it before beginning another"
            )
        if session.version > MAX_WEIGHT_VERSION:
            raise WeightSyncError(f"weight versions stop at {MAX_WEIGHT_VERSION} (int64, what every wire carries), "
                                  f"got {session.version}")
        if session.version <= self.version:
            raise WeightSyncError(
                f"new weight version must be greater than the current {self.version}, got {session.version}"
            )
        self.session = session

    def current(self, version: int | None = None) -> WeightSession:
        """The open session (of `version`, when given), or the reason there is none."""
        if self.session is None:
            raise WeightSyncError("no weight update is open: begin one (with its version) before sending weights")
        if version is not None and self.session.version != version:
            raise WeightSyncError(f"the weight update in progress is to version {self.session.version}, not {version}")
        return self.session

    def commit(self, version: int) -> None:
        """Serve `version`: only a complete session commits (otherwise raises, state unchanged)."""
        session = self.current(version)
        refusal = session.refusal()
        if refusal is not None:
            raise WeightSyncError(refusal)
        self.version = version
        self.session = None
        self.incomplete_reason = None

    def abort(self, reason: str) -> bool:
        """Close the session. Weights nothing was delivered into keep serving under the old
        version; otherwise nothing serves until a complete sync. Returns whether weights are now
        incomplete."""
        session, self.session = self.session, None
        if session is not None and session.touched:
            self.incomplete_reason = reason
        return self.incomplete_reason is not None


class SchedulerObserver:
    """Hooks for metrics; the default does nothing, the HTTP layer installs Prometheus ones."""

    def request_done(self, result: "LogProbResult", tokens: int) -> None:
        pass

    def request_failed(self, error: "ModelEngineError") -> None:
        pass

    def request_rejected(self, error: "ModelEngineError") -> None:
        pass

    def request_lost(self, error: "ModelEngineError") -> None:
        """An attempt lost with a replica that died; the request itself is retried elsewhere,
        or failed by the caller that gives up on it (counted then, once)."""

    def batch_done(self, num_requests: int, num_tokens: int, compute_s: float) -> None:
        pass
