# cpx_devops: `make demo` shows it, `make test` checks it. Nothing to install.
PYTHON ?= python3
PREFIX ?= $(HOME)/.local
# `make install PREFIX=~/.local` from a shell that leaves the ~ alone still works.
BINDIR = $(patsubst ~%,$(HOME)%,$(PREFIX))/bin
# bash-completion's folder for a user's own completions; used only where it exists.
COMPLETIONDIR ?= $(or $(XDG_DATA_HOME),$(HOME)/.local/share)/bash-completion/completions
# A pyenv shim for a version that is installed but not selected fails to run:
# fall back to that version's own binary, so `make test PYTHON=python3.7` works.
PY := $(shell p='$(PYTHON)'; if "$$p" -c '' >/dev/null 2>&1; then echo "$$p"; else \
        for c in $${PYENV_ROOT:-$$HOME/.pyenv}/versions/*/bin/$$p; do \
          [ -x "$$c" ] && "$$c" -c '' >/dev/null 2>&1 && { echo "$$c"; break; }; done; fi)

.PHONY: help check-python demo test lint bench install uninstall
.DEFAULT_GOAL := help

help: ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

check-python:
	@[ -n "$(PY)" ] || { echo "make: no working $(PYTHON) found" >&2; exit 2; }

demo: check-python ## run the tool against its own simulator
	@log=$$(mktemp); sim=; \
	trap 'test -n "$$sim" && kill $$sim 2>/dev/null; rm -f $$log' EXIT INT TERM; \
	$(PY) cpx_devops.py simulate --port 0 --seed 42 2>$$log & sim=$$!; \
	url=; for i in $$(seq 100); do \
	  url=$$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' $$log); [ -n "$$url" ] && break; sleep 0.05; done; \
	[ -n "$$url" ] || { cat $$log >&2; echo "demo: the simulator did not start" >&2; exit 1; }; \
	cpx() { echo; echo "\$$ cpx_devops.py $$*"; $(PY) cpx_devops.py --url $$url "$$@"; }; \
	cpx services --sort cpu | head -12; \
	cpx status; \
	cpx unhealthy || echo "(exit status $$?: at least one service flagged)"; \
	cpx track MailService --interval 1 --count 3; \
	cpx track --count 1

test: check-python ## the whole suite (PYTHON=python3.7 for another Python)
	@$(PY) --version
	@$(PY) test_cpx_devops.py

# Developer tools, never needed to run the tool or its tests: pinned, in a
# throwaway virtual environment (rm -rf .lint to start again).
LINT_PYTHON ?= python3
LINT_DIR = .lint
LINT_TOOLS = mypy==2.4.1 ruff==0.17.6
# Line length 120: the file's long "why" comments read better unbroken than at 79.
# B904 (raise ... from inside except) is off: our exceptions become one line, and
# their chain is never shown. E402 is off: the Python version check and the start-up
# Ctrl+C handler must run before the imports.
RUFF = $(LINT_DIR)/bin/ruff check --isolated --target-version py37 --line-length 120 \
       --select E,W,F,B,BLE,I --ignore B904,E402
PYFILES = cpx_devops.py test_cpx_devops.py bench_cpx_devops.py

lint: ## type-check (mypy) and lint (ruff) from a throwaway venv in .lint/
	@[ -x $(LINT_DIR)/bin/mypy ] && [ -x $(LINT_DIR)/bin/ruff ] || { \
	  echo "lint: installing $(LINT_TOOLS) into $(LINT_DIR)/"; \
	  $(LINT_PYTHON) -m venv $(LINT_DIR) && \
	  $(LINT_DIR)/bin/pip install -q --disable-pip-version-check $(LINT_TOOLS); }
	$(RUFF) $(PYFILES)
	$(LINT_DIR)/bin/mypy --no-incremental $(PYFILES)

bench: check-python ## the performance tables of the README, sharding included (about 16 minutes; asserts nothing)
	@$(PY) bench_cpx_devops.py bench

install: check-python ## install cpx-devops in PREFIX/bin (~/.local), and its bash completion where bash-completion looks
	install -d "$(DESTDIR)$(BINDIR)"
	install -m 0755 cpx_devops.py "$(DESTDIR)$(BINDIR)/cpx-devops"
	@echo "installed $(DESTDIR)$(BINDIR)/cpx-devops"
	@if [ -d "$(COMPLETIONDIR)" ]; then \
	  $(PY) cpx_devops.py completion bash > "$(COMPLETIONDIR)/cpx-devops" && \
	  echo "installed bash completion $(COMPLETIONDIR)/cpx-devops (new shells complete cpx-devops)"; \
	else \
	  echo "bash completion not installed: no $(COMPLETIONDIR); add 'source <(cpx-devops completion bash)' to ~/.bashrc"; \
	fi

uninstall: ## remove PREFIX/bin/cpx-devops and its bash completion
	rm -f "$(DESTDIR)$(BINDIR)/cpx-devops" "$(COMPLETIONDIR)/cpx-devops"
