#!/usr/bin/env bash
# The main job end to end; extra arguments go to the publisher.
source "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/python -m scripts.demo "$@"
