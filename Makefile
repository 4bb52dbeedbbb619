# make demo   a whole sign-in against the bundled local issuer
# make test   every test: stdlib tests under each Python present, all tests in a venv
# make slow   the suite on one Python, then its ten slowest tests
# make lint   ruff
# make bench  speed figures next to reference implementations

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Reference libraries the optional tests and the benchmark compare against.
TEST_PACKAGES := cryptography==50.0.2 segno==1.6.6 zxing-cpp==3.1.1 numpy==2.4.6 \
	PyJWT==2.15.1 ecdsa==0.19.2 ruff==0.17.6 \
	'moto[server]==5.2.5' awscli==1.46.3 botocore==1.44.8 http-message-signatures==3.0.0 \
	docker==7.2.0
PYENV_ROOT := $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
MATRIX := 3.6 3.7 3.8 3.9 3.10 3.11 3.12 3.13
# Interpreters tested at a time: each runs its suite in three processes, and more than a few at once on
# two cores would put the deadline tests (a 1 s --timeout) past their peers' bytes.
TEST_JOBS ?= 2

.PHONY: demo test slow lint bench system-deps clean

demo:
	@$(PYTHON) test_vouch_device_login.py demo

$(VENV)/.installed: Makefile
	@$(PYTHON) -m venv $(VENV)
	@$(VENV_PY) -m pip install --quiet --disable-pip-version-check $(TEST_PACKAGES)
	@touch $@

# oidc-provider (npm) judges --register, private_key_jwt and DPoP; without npm its test skips.
NODE_DIR := .node
$(NODE_DIR)/.installed: Makefile
	@mkdir -p $(NODE_DIR)
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --prefix $(NODE_DIR) --no-audit --no-fund --silent oidc-provider@9.13.3 >/dev/null 2>&1 \
	    || echo "note: could not install oidc-provider with npm; testing without it"; \
	fi
	@touch $@

# PyPy3 widens the matrix, zsh, dash and busybox judge --format shell, kubectl judges
# --format exec-credential, git, ssh-keygen and sshd judge the git helper and --ssh-certificate, Docker's
# Go helper client the Docker helper;
# install them where this machine allows it (root with apt), and go on without them elsewhere.
system-deps:
	@if { ! command -v pypy3 || ! command -v zsh || ! command -v dash || ! command -v busybox \
	      || ! command -v kubectl || ! command -v git || ! command -v ssh || ! test -x /usr/sbin/sshd || ! command -v go \
	      || ! test -d /usr/share/gocode/src/github.com/docker/docker-credential-helpers; } >/dev/null 2>&1 \
	      && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing pypy3, zsh, dash, busybox, kubectl, git, openssh and Go's docker-credential-helpers for the tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pypy3 zsh dash busybox git \
	    openssh-client openssh-server golang-go golang-github-docker-docker-credential-helpers-dev \
	    golang-golang-x-sys-dev $$(command -v kubectl >/dev/null || echo kubernetes-client)) >/dev/null 2>&1 \
	    || echo "note: could not install some of pypy3/zsh/dash/busybox/kubectl/git/openssh/go; testing without them"; \
	fi

# The matrix: the venv (every test), then each interpreter found, stdlib only.
# Without pyenv that is the python3 on PATH; what could not be tested is named.
# CI (CI=true) needs all of them.
test: $(VENV)/.installed $(NODE_DIR)/.installed system-deps
	@pys=""; seen=""; missing=""; \
	for v in $(MATRIX); do \
	  py=$$(ls -d $(PYENV_ROOT)/versions/$$v.*/bin/python3 2>/dev/null | sort -V | tail -n 1); \
	  [ -z "$$py" ] && command -v python$$v >/dev/null 2>&1 && py=$$(command -v python$$v); \
	  if [ -n "$$py" ]; then pys="$$pys $$py"; seen="$$seen $$v"; fi; \
	done; \
	here=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	case " $$seen " in *" $$here "*) ;; *) [ -n "$$here" ] && pys="$$pys $$(command -v $(PYTHON))" && seen="$$seen $$here";; esac; \
	for v in $(MATRIX); do case " $$seen " in *" $$v "*) ;; *) missing="$$missing $$v";; esac; done; \
	if command -v pypy3 >/dev/null 2>&1; then pys="$$pys $$(command -v pypy3)"; else missing="$$missing pypy3"; fi; \
	if [ -n "$$missing" ]; then \
	  if [ "$${CI:-}" = true ]; then echo "make test: CI tests every interpreter; missing:$$missing"; exit 1; fi; \
	  echo "make test: not tested on this machine (pyenv install X / apt-get install pypy3):$$missing"; \
	fi; \
	logs=$$(mktemp -d); n=0; \
	for py in $(VENV_PY) $$pys; do \
	  while [ $$(jobs -rp | wc -l) -ge $(TEST_JOBS) ]; do wait -n; done; \
	  n=$$((n + 1)); echo "$$py" > $$logs/$$n.name; \
	  ( export VDL_TEST_TIMES=$$logs/$$n.times; \
	    if [ "$$py" = "$(VENV_PY)" ]; then "$$py" -m unittest -v test_vouch_device_login; \
	    else "$$py" -E -s -m unittest -v test_vouch_device_login; fi ) > $$logs/$$n.log 2>&1 & \
	done; wait; \
	passed=0; failed=0; \
	for i in $$(seq 1 $$n); do \
	  log=$$logs/$$i.log; ok=$$(grep -c ' \.\.\. ok$$' $$log); \
	  bad=0; for k in failures errors; do c=$$(grep -o "$$k=[0-9]*" $$log | tail -1 | cut -d= -f2); bad=$$((bad + $${c:-0})); done; \
	  skip=$$(grep -c " \.\.\. skipped " $$log); \
	  if tail -1 $$log | grep -q '^OK'; then status=ok; else status=FAILED; [ $$bad -gt 0 ] || bad=1; fi; \
	  printf '%-50s %-6s %4d passed, %3d skipped, %d failed\n' "$$(cat $$logs/$$i.name)" $$status $$ok $$skip $$bad; \
	  [ $$status = ok ] || grep -v ' \.\.\. \(ok\|skipped .*\)$$' $$log | sed 's/^/    /' | tail -80; \
	  passed=$$((passed + ok)); failed=$$((failed + bad)); \
	done; \
	echo "tests: $$passed passed, $$failed failed"; \
	echo "slowest tests in seconds ($(TEST_JOBS) interpreters at a time, so slower than alone; make slow times one):"; \
	for i in $$(seq 1 $$n); do sed "s|\$$| $$(cat $$logs/$$i.name)|" $$logs/$$i.times 2>/dev/null; done \
	  | sort -nr | awk '!seen[$$2]++' | head -n 10 | sed 's/^/    /'; \
	rm -rf $$logs; [ $$failed -eq 0 ]

# The ten slowest tests on $(PYTHON) alone, the figure the suite's time budget is about.
slow:
	@times=$$(mktemp); VDL_TEST_TIMES=$$times $(PYTHON) -m unittest test_vouch_device_login; status=$$?; \
	echo "slowest tests in seconds:"; head -n 10 $$times | sed 's/^/    /'; rm -f $$times; exit $$status

# ruff's oldest target is 3.7; the code also runs on 3.6, hence: %-formatting stays (UP031), no
# capture_output in the tests (UP022, 3.7+), and no typing annotations for class attributes (RUF012).
lint: $(VENV)/.installed
	@$(VENV)/bin/ruff check --target-version py37 --ignore UP031,UP022,RUF012 \
	  vouch_device_login.py test_vouch_device_login.py

bench: $(VENV)/.installed
	@$(VENV_PY) test_vouch_device_login.py bench

clean:
	rm -rf $(VENV) $(NODE_DIR) __pycache__ .ruff_cache
