# The two commands a newcomer needs: `make run` and `make test`. Both build .venv/ first.
PY := .venv/bin/python
ARGS ?=
# The suite's processes (pytest-xdist): most tests are CLI runs, each mostly one core importing torch and Hydra.
TEST_WORKERS ?= 2

.PHONY: setup run test bench clean
setup:
	@bash scripts/setup_env.sh

run: setup
	$(PY) -m maml_runner.cli $(ARGS)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

bench: setup
	$(PY) scripts/bench_speed.py

clean:
	rm -rf outputs multirun .pytest_cache
