"""The HTTP front end: `create_app` (FastAPI), its routes, metrics and auth.

`wire` is shared with the HTTP clients and imports no FastAPI; import `model_engine_server.http.app`
for the app itself.
"""
