# The two commands of the README. Both set up .venv first (scripts/setup.sh) on a fresh machine.
.PHONY: setup quickstart test

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/posttrain quickstart

test: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/pytest -n auto --dist loadfile
