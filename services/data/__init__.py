"""What a job reads: datasets (ImageFolder or CSV manifests, splits, checks), image decoding and the backbone's
transforms, the loader processes, and the sources that yield mini-batches from images or from the feature cache."""
