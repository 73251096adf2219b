# The verbs people expect. `make run` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8002
HOST ?= 127.0.0.1

.PHONY: help venv run serve migrate demo-key test lint fmt typecheck check services bench clean

help:
	@echo "make run        create the virtualenv, migrate, print a demo key, serve on :$(PORT) with daphne"
	@echo "make serve      the production server: uvicorn on $(HOST):$(PORT), production settings from the environment"
	@echo "make test       the whole suite on PostgreSQL and Redis (started when stopped)"
	@echo "make lint | fmt | typecheck | check | migrate | bench"

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(BIN)/.installed

migrate: export DEBUG ?= true
migrate: venv
	$(BIN)/python manage.py migrate --noinput

demo-key: migrate
	@echo "Demo API key (premium plan):"
	@$(BIN)/python manage.py createapikey demo --plan premium 2>/dev/null | tail -n 1

# Embedded default: SQLite, in-process limiter, the sandbox upstream for every provider without a key.
run: export DEBUG ?= true
run: export SANDBOX_URL ?= http://$(HOST):$(PORT)/sandbox
run: demo-key
	$(BIN)/daphne -b $(HOST) -p $(PORT) chatservice.asgi:application

# Production (the Dockerfile runs the same command): uvicorn on uvloop and httptools, measured faster
# than daphne on one core (bench/README.md). The settings come from the environment (SECRET_KEY,
# DATABASE_URL, ...); migrations are a step of their own. The keep-alive outlasts nginx's upstream
# keepalive_timeout (60 s), so nginx closes its idle pooled connections before uvicorn does: a POST
# sent on a connection uvicorn is closing would be a 502.
serve: venv
	$(BIN)/uvicorn chatservice.asgi:application --host $(HOST) --port $(PORT) \
		--loop uvloop --http httptools --ws websockets-sansio --lifespan off --no-access-log --timeout-keep-alive 120 --ws-max-size 1048576

services:
	@scripts/ensure-services.sh

test: venv services
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv
	$(BIN)/mypy .

check: venv services
	DJANGO_SETTINGS_MODULE=tests.settings $(BIN)/python manage.py makemigrations --check --dry-run
	DJANGO_SETTINGS_MODULE=tests.settings $(BIN)/python manage.py check

bench: venv services
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
