# The two set-up commands of the README:
#   make demo   builds .venv (Python from .python-version) and runs the demo on SQLite
#   make test   builds .venv, runs make check (ruff, mypy, makemigrations --check), then the suite on SQLite, then on PostgreSQL
# make check is what CI checks beside the tests: make lint (ruff, makemigrations --check) and make typecheck (mypy).
# The second supported stack: make test DJANGO=5.2 PY=3.11.7
# make docs builds the documentation site (docs/_build/html), make dist the sdist and wheel (var/dist); CI runs both.
PY      ?= $(shell cat .python-version)
DJANGO  ?= 6.1
VENV    ?= $(if $(filter 6.1,$(DJANGO)),.venv,.venv-django$(DJANGO))
PYTHON  := $(shell PYENV_VERSION=$(PY) pyenv which python 2>/dev/null || command -v python$(basename $(PY)) || command -v python3)
PYTEST_ARGS ?=
export KEYJOBS_TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/keyjobs

.PHONY: demo site test test-sqlite test-postgres test-wheel check lint typecheck bench venv docs dist clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]' 'Django~=$(DJANGO).0'
	touch $@

demo: venv
	$(VENV)/bin/python manage.py demo

# The demo site: the provider, a worker and runserver together, on SQLite (demo.sqlite3) unless DATABASE_URL
# says otherwise; prints the URL, the demo user and its password. Ctrl-C stops all three.
site: venv
	$(VENV)/bin/python manage.py site $(SITE_ARGS)

test: check test-sqlite test-postgres

check: lint typecheck

lint: venv
	$(VENV)/bin/ruff check keyjobs tests bench demo_project docs
	DJANGO_SETTINGS_MODULE=tests.settings KEYJOBS_TEST_DB=sqlite $(VENV)/bin/python manage.py makemigrations --check --dry-run

typecheck: venv
	$(VENV)/bin/mypy keyjobs

test-sqlite: venv
	KEYJOBS_TEST_DB=sqlite $(VENV)/bin/python -W error -m pytest $(PYTEST_ARGS)

test-postgres: venv
	KEYJOBS_TEST_DB=postgres $(VENV)/bin/python -W error -m pytest $(PYTEST_ARGS)

# The admin's tests against the wheel, as `pip install /path/to/keyjobs` installs it, not against the checkout:
# the wheel and its dev extra go into a throwaway venv, and the tests run from a copy of tests/ and the demo in
# a directory without keyjobs/, so that `import keyjobs` finds site-packages (printed, and checked).
WHEEL_TMP ?= $(CURDIR)/var/test-wheel
test-wheel: venv
	rm -rf $(WHEEL_TMP) && mkdir -p $(WHEEL_TMP)/run
	$(VENV)/bin/python -m pip wheel -q --no-deps --wheel-dir $(WHEEL_TMP)/dist .
	$(PYTHON) -m venv $(WHEEL_TMP)/venv
	$(WHEEL_TMP)/venv/bin/pip install -q --upgrade pip
	$(WHEEL_TMP)/venv/bin/pip install -q "$$(ls $(WHEEL_TMP)/dist/keyjobs-*.whl)[dev]" 'Django~=$(DJANGO).0'
	cp -r tests demo_project templates manage.py pyproject.toml $(WHEEL_TMP)/run/
	cd $(WHEEL_TMP)/run && ../venv/bin/python -c 'import keyjobs, sys; print("keyjobs imported from", keyjobs.__file__); \
		sys.exit(0 if "/site-packages/keyjobs/" in keyjobs.__file__ else "not the installed wheel")'
	cd $(WHEEL_TMP)/run && KEYJOBS_TEST_DB=sqlite KEYJOBS_TEST_SQLITE=$(WHEEL_TMP)/test.sqlite3 \
		../venv/bin/python -W error -m pytest tests/test_admin.py $(PYTEST_ARGS)
	cd $(WHEEL_TMP)/run && KEYJOBS_TEST_DB=postgres ../venv/bin/python -W error -m pytest tests/test_admin.py $(PYTEST_ARGS)

# The documentation site (docs/, Sphinx with MyST and furo) into docs/_build/html, warnings as errors. Its reference
# pages are generated from the code as it builds (docs/_ext/keyjobs_reference.py). The tools are the docs extra.
$(VENV)/.docs-installed: pyproject.toml $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[dev,docs]' 'Django~=$(DJANGO).0'
	touch $@

docs: $(VENV)/.docs-installed
	rm -rf docs/_build
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@! grep -rlE '<(script|link|img)[^>]+(src|href)="(https?:)?//' docs/_build/html || \
		{ echo "these pages load something from another site: the docs must read offline"; false; }
	@echo "The documentation: docs/_build/html/index.html"

# The sdist and the wheel, as a release would build them, into var/dist; twine checks their metadata.
dist: $(VENV)/.docs-installed
	rm -rf var/dist
	$(VENV)/bin/python -m build --outdir var/dist .
	$(VENV)/bin/twine check --strict var/dist/*

# The bench measures the peers (Procrastinate, Celery) in the same run, from a venv of its own.
.venv-bench/.installed: pyproject.toml bench/requirements.txt
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q --upgrade pip
	.venv-bench/bin/pip install -q -e . -r bench/requirements.txt
	touch $@

bench: .venv-bench/.installed
	.venv-bench/bin/python -m bench $(BENCH_ARGS)

clean:
	rm -rf .venv .venv-django* .venv-bench var docs/_build docs/reference/generated
