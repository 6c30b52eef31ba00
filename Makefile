# cpx_devops: `make demo` shows it, `make test` checks it. Nothing to install.
PYTHON ?= python3
PREFIX ?= $(HOME)/.local
# `make install PREFIX=~/.local` from a shell that leaves the ~ alone still works (~ and ~/...
# only: ~user is the shell's to expand). DESTDIR goes before every path written or removed.
prefix = $(if $(filter ~,$(PREFIX)),$(HOME),$(patsubst ~/%,$(HOME)/%,$(PREFIX)))
BINDIR = $(prefix)/bin
LIBDIR = $(prefix)/lib/cpx-devops
# Where bash-completion looks: a system prefix's share folder; for a prefix inside the user's
# home (and only when there is a HOME), the user's data home.
in_home = $(and $(HOME),$(filter $(HOME)/%,$(prefix)/))
COMPLETIONDIR ?= $(if $(in_home),$(or $(XDG_DATA_HOME),$(HOME)/.local/share),$(prefix)/share)/bash-completion/completions
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

bench: check-python ## the tables of docs/performance.md (22 minutes on 2 cores, 2026-12-03; asserts nothing)
	@$(PY) bench_cpx_devops.py bench

# The installed command is a launcher that runs the module from lib/cpx-devops beside its bin
# folder, byte-compiled here: a script is compiled on every run, a module once.
install: check-python ## install cpx-devops in PREFIX (~/.local): bin/cpx-devops, lib/cpx-devops, bash completion
	@case "$(prefix)" in /*) ;; *) echo "make: PREFIX must be an absolute path: $(PREFIX)" >&2; exit 2;; esac
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(COMPLETIONDIR)"
	install -m 0644 cpx_devops.py "$(DESTDIR)$(LIBDIR)/cpx_devops.py"
	$(PY) -m py_compile "$(DESTDIR)$(LIBDIR)/cpx_devops.py"
	$(PY) -c 'import sys; print("#!" + sys.executable)' > "$(DESTDIR)$(BINDIR)/.cpx-devops.tmp"
	printf '%s\n' '# cpx-devops: cpx_devops from ../lib/cpx-devops, byte-compiled by make install.' \
	  'import os, runpy, sys' \
	  'sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "lib", "cpx-devops"))' \
	  'runpy.run_module("cpx_devops", run_name="__main__")' >> "$(DESTDIR)$(BINDIR)/.cpx-devops.tmp"
	chmod 0755 "$(DESTDIR)$(BINDIR)/.cpx-devops.tmp"
	$(PY) cpx_devops.py completion bash > "$(DESTDIR)$(COMPLETIONDIR)/.cpx-devops.tmp"
	# Renamed into place: an old symlink there is removed, never written through nor (to a folder)
	# moved into; a real folder there stops the install (rm -f refuses it).
	rm -f "$(DESTDIR)$(BINDIR)/cpx-devops" && mv -f "$(DESTDIR)$(BINDIR)/.cpx-devops.tmp" "$(DESTDIR)$(BINDIR)/cpx-devops"
	rm -f "$(DESTDIR)$(COMPLETIONDIR)/cpx-devops" && mv -f "$(DESTDIR)$(COMPLETIONDIR)/.cpx-devops.tmp" \
	  "$(DESTDIR)$(COMPLETIONDIR)/cpx-devops"
	@echo "installed $(DESTDIR)$(BINDIR)/cpx-devops, and bash completion in $(DESTDIR)$(COMPLETIONDIR)"

uninstall: ## remove what install wrote (the same PREFIX and DESTDIR)
	rm -f "$(DESTDIR)$(BINDIR)/cpx-devops" "$(DESTDIR)$(LIBDIR)/cpx_devops.py" \
	  "$(DESTDIR)$(LIBDIR)"/__pycache__/cpx_devops.*.pyc "$(DESTDIR)$(COMPLETIONDIR)/cpx-devops"
	rmdir "$(DESTDIR)$(LIBDIR)/__pycache__" "$(DESTDIR)$(LIBDIR)" 2>/dev/null || true
