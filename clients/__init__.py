"""What users hold to reach the server: one `LogProbClient` interface over Ray or HTTP.

Only the transport-free interface is imported here, so `import clients` pulls in neither Ray
nor httpx; import `clients.ray_client` or the HTTP client module for a concrete client.
"""

from clients.base import BaseLogProbClient, LogProbClient, SyncLogProbClient, raise_first_error

__all__ = ["BaseLogProbClient", "LogProbClient", "SyncLogProbClient", "raise_first_error"]
