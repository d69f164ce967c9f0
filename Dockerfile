# bitplan: API, CLI and Celery worker in one CPU image.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    BITPLAN_HOME=/data

WORKDIR /app
# CPU-only torch first, so the project's own install does not pull a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision
COPY pyproject.toml README.md ./
COPY allocator ./allocator
COPY db ./db
COPY workers ./workers
COPY service ./service
RUN pip install '.[bench]'

VOLUME ["/data"]
EXPOSE 8000
CMD ["bitplan", "serve", "--host", "0.0.0.0", "--port", "8000"]
