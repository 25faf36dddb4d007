"""Training deep ensembles with MC dropout, recalibration, evaluation metrics and plots, and export
of model bundles."""
