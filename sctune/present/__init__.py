"""Presentation: report.md and the console text, TensorBoard's event files and HParams protocol, the live
progress display, the recommended configuration's snippet. It reads what the service writes (experiment
files, the compute plan) and never drives Ray's stages itself (``tests/test_layers.py``)."""
