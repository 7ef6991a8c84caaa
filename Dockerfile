# One image for every role of the aggregator: API (the default command), Celery
# worker, Flower, the one-shot `alembic upgrade head` and the publisher CLI.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Install the runtime dependencies first, exactly as locked (scripts/lock.sh writes
# requirements.lock from pyproject.toml), so this layer is rebuilt only when the lock
# changes. Every file is checked against its hash. The slim image has no compiler, so
# only wheels are accepted; psycogreen is the exception: it ships only an sdist, which
# is pure Python and builds without one.
COPY requirements.lock ./
RUN pip install --require-hashes --only-binary :all: --no-binary psycogreen -r requirements.lock

# Only what runs: the packages, the migrations and the two files read from the working
# directory (gunicorn picks up ./gunicorn.conf.py, alembic reads [tool.alembic] from
# ./pyproject.toml). Tests, benchmarks, docs and deploy files stay out of the image.
# The client library is its own distribution (clients/python/): installed from its
# directory beside the server, which depends on it; the lock holds its dependencies.
COPY pyproject.toml gunicorn.conf.py celery_config.py LICENSE ./
COPY clients/python ./clients/python
COPY app ./app
COPY tasks ./tasks
COPY publisher ./publisher
COPY migrations ./migrations
RUN pip install --no-deps ./clients/python . \
    && rm -rf build ./*.egg-info clients

# Nothing in the image runs as root.
RUN useradd --create-home --uid 10001 --user-group aggregator
USER aggregator

EXPOSE 8080 5555

CMD ["gunicorn", "--bind", "0.0.0.0:8080", "--workers", "2", "app:create_app()"]
