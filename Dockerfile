# One image for every role of the aggregator: API (the default command), Celery
# worker, Flower, the one-shot `alembic upgrade head` and the publisher CLI.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Install the runtime dependencies first, read from pyproject.toml (no dev
# extras), so this layer is rebuilt only when the dependency list changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The source stays in /app as well: gunicorn picks up ./gunicorn.conf.py and
# alembic reads [tool.alembic] from ./pyproject.toml, both relative to the
# working directory.
COPY . .
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info

# Nothing in the image runs as root.
RUN useradd --create-home --uid 10001 --user-group aggregator
USER aggregator

EXPOSE 8080 5555

CMD ["gunicorn", "--bind", "0.0.0.0:8080", "--workers", "2", "app:create_app()"]
