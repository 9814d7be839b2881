"""The plain-PyTorch core: configs, schedules, data, models, the training loop, the LR range test and the
bounds read from it. It imports nothing from ``sctune.service`` or ``sctune.present`` (``tests/test_layers.py``),
and Ray only inside the functions of ``tasks`` that ship a task's code to Ray's workers, which the service calls
(``tests/test_import.py``: importing the core loads no Ray). Usable on its own, in a notebook or a Ray worker."""
