"""Storage: settings, the feature cache (Zarr), the artifact store (safetensors + JSON) and the job store
(Redis). Nothing here knows about HTTP or Celery."""
