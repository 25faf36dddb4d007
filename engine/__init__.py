"""The engine: model bundles, the predictor, the local streaming pipeline, the Ray Data pipeline,
job specs and run manifests."""
