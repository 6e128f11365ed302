# sidetune: API (`sidetune api`) and Celery workers (`sidetune worker --queues extract|train`), one image.
# GPU: torch's PyPI wheels bring their own CUDA libraries; the host needs the NVIDIA driver + Container Toolkit.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    SIDETUNE_DATA_DIR=/data

# Non-root user; /data is owned by it so a fresh named volume mounted there inherits that ownership.
RUN useradd --create-home --uid 1000 sidetune \
 && mkdir -p /data/datasets \
 && chown -R sidetune:sidetune /data

WORKDIR /app

# Dependencies first (the slow layer: torch + CUDA wheels), so editing the source does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Then the package itself (dependencies are already there).
COPY README.md ./
COPY api/ api/
COPY worker/ worker/
COPY services/ services/
COPY storage/ storage/
RUN pip install --no-cache-dir --no-deps .

USER sidetune
EXPOSE 8000
CMD ["sidetune", "api"]
