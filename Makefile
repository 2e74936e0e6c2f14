# The two commands of the README, `make run` and `make test`, and `make check`, the fast loop. Each
# sets up .venv from the pinned requirement files first (again only when they change), so all work
# on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test check

# With no OPENAI_API_KEY or OPENAI_BASE_URL, run.py also sets up and runs the embedded model.
run: $(VENV)/.runtime
	$(BIN)/python run.py

test: $(VENV)/.dev tests/js/node_modules/.installed
	bash tests/install-debian.sh
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 --dist loadfile

# What `make test` runs but the slow tiers (tests marked `slow`: the browser, the container, the
# embedded model, load, fuzzing, Redis, the JS clients, multi-worker launchers), stopping at the
# first failure: a couple of minutes, for the loop of editing.
check: $(VENV)/.dev
	bash tests/install-debian.sh
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow" -x

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.runtime: requirements.txt $(VENV)/.created
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.created
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

# The real JS clients the tests drive (tests/test_js_clients.py), exactly as the lockfile pins them.
tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
	touch $@
