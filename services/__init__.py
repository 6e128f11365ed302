"""The ML core: job specs, datasets, backbones (timm), methods, extraction, training and inference."""
