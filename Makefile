# The two set-up commands of the README:
#   make demo   builds .venv (Python from .python-version) and runs the demo on SQLite
#   make test   builds .venv, runs the lint (make lint), then the suite on SQLite, then on PostgreSQL
# make check is what CI checks beside the tests: make lint (ruff, makemigrations --check) and make typecheck (mypy).
# The second supported stack: make test DJANGO=5.2 PY=3.11.7
PY      ?= $(shell cat .python-version)
DJANGO  ?= 6.1
VENV    ?= $(if $(filter 6.1,$(DJANGO)),.venv,.venv-django$(DJANGO))
PYTHON  := $(shell PYENV_VERSION=$(PY) pyenv which python 2>/dev/null || command -v python$(basename $(PY)) || command -v python3)
PYTEST_ARGS ?=
export KEYJOBS_TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/keyjobs

.PHONY: demo test test-sqlite test-postgres check lint typecheck bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]' 'Django~=$(DJANGO).0'
	touch $@

demo: venv
	$(VENV)/bin/python manage.py demo

test: lint test-sqlite test-postgres

check: lint typecheck

lint: venv
	$(VENV)/bin/ruff check keyjobs tests bench demo_project
	DJANGO_SETTINGS_MODULE=tests.settings KEYJOBS_TEST_DB=sqlite $(VENV)/bin/python manage.py makemigrations --check --dry-run

typecheck: venv
	$(VENV)/bin/mypy keyjobs

test-sqlite: venv
	KEYJOBS_TEST_DB=sqlite $(VENV)/bin/python -W error -m pytest $(PYTEST_ARGS)

test-postgres: venv
	KEYJOBS_TEST_DB=postgres $(VENV)/bin/python -W error -m pytest $(PYTEST_ARGS)

# The bench measures the peers (Procrastinate, Celery) in the same run, from a venv of its own.
.venv-bench/.installed: pyproject.toml bench/requirements.txt
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q --upgrade pip
	.venv-bench/bin/pip install -q -e . -r bench/requirements.txt
	touch $@

bench: .venv-bench/.installed
	.venv-bench/bin/python -m bench $(BENCH_ARGS)

clean:
	rm -rf .venv .venv-django* .venv-bench var
