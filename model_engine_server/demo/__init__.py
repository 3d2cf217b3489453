"""The main job: a small fully-async RL loop scored by the server, against the colocated baseline."""
