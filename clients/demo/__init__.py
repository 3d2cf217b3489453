"""The main job: a small fully-async RL loop scored by the server, against the colocated baseline.

A client of the server like any trainer: it reaches the scheduler through `clients.local_client`
and publishes weights with `clients.publisher`. `run.py` builds the server and runs the modes,
`loop.py` is the loop (rollouter -> server -> message queue -> trainer -> weights back),
`report.py` the plot and comparison. `model-engine-server demo` imports it only when it runs.
"""
