"""`backend: verl`: the trainer's own engine (verl's `TrainingWorker`) behind our `Engine` seam.

- `cpu_platform.py`: a verl platform for machines without an accelerator.
- `build.py`: the process set-up verl expects, and the worker built from the trainer's settings.
- `batches.py`: our packed rows to verl's no-padding batch and verl's outputs back to our scores.
- `engine.py`: `VerlEngine`, registered as engine backend ``verl``.

Nothing is imported here: `import verl` alone costs seconds, and it must wait until the
platform is chosen (`build.select_platform`).
"""
