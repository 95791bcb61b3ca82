# Pollen's image: the collector, the enabler, the API and the demo Celery app, in one image.
# The command picks the service: pollen-api (the default), pollen-collector, pollen-enabler;
# for the demo, `celery -A demo.app worker ...` and `python -m demo.traffic`.
# Every setting is a POLLEN_* environment variable (README: Settings); nothing is read from
# files. docker-compose.yml runs the whole stack.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY demo ./demo
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pollen
USER pollen

EXPOSE 5555
CMD ["pollen-api"]
