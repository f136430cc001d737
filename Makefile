# The two commands a newcomer needs: `make run` and `make test`. Both build .venv/ first.
PY := .venv/bin/python
ARGS ?=

.PHONY: setup run test bench clean
setup:
	@bash scripts/setup_env.sh

run: setup
	$(PY) -m maml_runner.cli $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) scripts/bench_speed.py

clean:
	rm -rf outputs multirun .pytest_cache
