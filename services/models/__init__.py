"""A trained model as the service stores it: its manifest (`manifest.py`: what the model is, typed and torch-free,
so the API reads it) and the one loader that rebuilds it from its artifact (`loading.py`: torch, for the inference
service and the exporters). This package's `__init__` imports no torch."""
