# The two commands of the README. Each sets up what is missing (scripts/setup.sh), then does its job.
.PHONY: run test setup lint benchmark

run: setup
	.venv/bin/pupil train recipes/fmnist_fast.yaml --overwrite
	.venv/bin/pupil eval runs/fmnist_fast --split test
	.venv/bin/pupil audit runs/fmnist_fast

test: setup lint
	.venv/bin/python -m pytest -q

setup:
	@bash scripts/setup.sh

lint:
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

benchmark: setup
	.venv/bin/python benchmarks/train_fmnist.py
