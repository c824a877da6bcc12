# Switchboard recipes. `just` lists them.

python := env("PYTHON", "python")

# List the recipes
default:
    @just --list

# Install the project with its dev tools (editable)
install:
    {{python}} -m pip install -e '.[dev]'

# Format the code
fmt:
    {{python}} -m ruff format .
    {{python}} -m ruff check --fix .

# Lint: ruff and the layering contract (lint-imports)
lint:
    {{python}} -m ruff check .
    {{python}} -m ruff format --check .
    lint-imports

# Type-check all three packages strictly
typecheck:
    {{python}} -m mypy

# Run the test suite (real nats-server, real svc processes)
test *ARGS:
    {{python}} -m pytest {{ARGS}}

# Benchmarks (docs/benchmarks.md): `just bench` runs them all and prints one table
# (`just bench --markdown` for the doc); `just bench core --turns 2000 --reps 5` runs one;
# `just bench limits` measures the physical limits of plain nats-py on this machine.
bench NAME="all" *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{NAME}}" in
        -*) exec {{python}} bench/all.py {{NAME}} {{ARGS}} ;;
        *) exec {{python}} bench/{{NAME}}.py {{ARGS}} ;;
    esac

# Run the embedded JetStream server in the foreground
nats *ARGS:
    svc nats serve {{ARGS}}

# Run a role: all, core, whatsapp, whatsapp-egress, whatsapp-ingress
run ROLE="all":
    svc run {{ROLE}}

# One-shot end-to-end proof
demo:
    svc demo

# Every gate CI runs
check: lint typecheck test
