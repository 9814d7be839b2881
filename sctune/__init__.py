"""sctune: Leslie Smith's super-convergence recipe as a distributed hyperparameter service on Ray Tune."""
