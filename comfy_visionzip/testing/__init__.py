"""Fixtures for tests, benches and the demo: tiny random-weight checkpoints (:mod:`.tiny`) and synthetic
clips made with PyAV (:mod:`.synthetic`). Not part of the pipeline; nothing here is downloaded."""
