"""The hyperparameter service on Ray Tune: space files and their validation, the experiment on disk, the
compute budget, stage 2's plan and searchers, the stages' Tune wiring, what runs in a trial, Ray's session
and the run's lifecycle. It builds on ``sctune.core`` and uses ``sctune.present`` to show its results."""
