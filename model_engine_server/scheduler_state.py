"""Small state pieces of the scheduler: the weight-version state machine and the observer hook.

Weight states:   ready --begin(v)--> updating --commit(v)--> ready (version v)
                                              \--abort-----> incomplete (old version, no serving)
                 incomplete --begin(v)--> updating ...
Only `ready` serves. A version number is never attached to weights that did not fully arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from model_engine_server.errors import WeightSyncError

if TYPE_CHECKING:
    from model_engine_server.errors import ModelEngineError
    from model_engine_server.protocol import LogProbResult


@dataclass
class WeightState:
    version: int = 0
    updating_to: int | None = None
    incomplete_reason: str | None = None

    @property
    def updating(self) -> bool:
        return self.updating_to is not None

    @property
    def servable(self) -> bool:
        return self.updating_to is None and self.incomplete_reason is None

    def begin(self, version: int) -> None:
        if self.updating_to is not None:
            raise WeightSyncError(f"a weight update to version {self.updating_to} is already in progress")
        if version <= self.version:
            raise WeightSyncError(f"new weight version must be greater than the current {self.version}, got {version}")
        self.updating_to = version

    def commit(self, version: int) -> None:
        if self.updating_to != version:
            raise WeightSyncError(f"commit of version {version}, but the update in progress is {self.updating_to}")
        self.version = version
        self.updating_to = None
        self.incomplete_reason = None

    def withdraw(self, version: int) -> None:
        """An update begun but abandoned before anything was loaded: the old weights are intact."""
        if self.updating_to == version:
            self.updating_to = None

    def abort(self, reason: str) -> None:
        self.updating_to = None
        self.incomplete_reason = reason


class SchedulerObserver:
    """Hooks for metrics; the default does nothing, the HTTP layer installs Prometheus ones."""

    def request_done(self, result: "LogProbResult", tokens: int) -> None:
        pass

    def request_failed(self, error: "ModelEngineError") -> None:
        pass

    def request_rejected(self, error: "ModelEngineError") -> None:
        pass

    def batch_done(self, num_requests: int, num_tokens: int, compute_s: float) -> None:
        pass
