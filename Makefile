# ztgpu — the two commands a newcomer needs are `make demo` and `make test`.
# Both install what they need (Debian packages, a venv) and are safe to rerun.

SHELL := /bin/bash
PY_SYSTEM := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Debian packages: real Slurm + munge for the test cluster, the system Python
# with venv (pam_python embeds this interpreter later); PostgreSQL and rsyslog
# (with both its TLS drivers, gtls and ossl) as the real database and SIEM
# receiver the audit tests start privately; openssl for inspecting
# certificates; systemd for checking the shipped units; debootstrap, e2fsprogs,
# mount, qemu and an ssh client for the pure cgroup-v2 VM nodes (images cached
# under /var/cache/ztgpu-tests/vm); bpftool to look at device programs by hand;
# openssh-server, libpam-python, libpam-slurm-adopt and pamtester for the PAM
# tests' private sshd (no system sshd is started or changed); gcc and
# libpam0g-dev to build the compiled PAM module; prometheus (with promtool)
# as the real Prometheus server the metrics tests start privately (they
# never use or change the package's own service, which Debian enables).
# Every program the harnesses start is listed, with its package, in
# ztgpu/testing/prerequisites.py; tests/test_prerequisites.py fails when a
# package it names is missing here.
DEB_PACKAGES := slurm-wlm munge libslurm-dev python3 python3-venv python3-dev passwd util-linux \
	postgresql rsyslog rsyslog-gnutls rsyslog-openssl openssl systemd \
	debootstrap e2fsprogs mount qemu-utils qemu-system-x86 openssh-client bpftool \
	openssh-server libpam-python libpam-slurm-adopt pamtester gcc libpam0g-dev prometheus \
	docker.io docker-compose
STAMP_DEB := $(VENV)/.deb-installed
STAMP_PIP := $(VENV)/.pip-installed
TYPECHECK_TREE := build/typecheck

.PHONY: setup install demo test test-deploy lint typecheck unit bench clean reachable mutation

setup: $(STAMP_PIP)

$(STAMP_DEB): Makefile
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@test -x $(PY) || $(PY_SYSTEM) -m venv $(VENV)
	@touch $@

$(STAMP_PIP): $(STAMP_DEB) pyproject.toml
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q ".[dev]"
	@touch $@

# A regular (not editable) install: the package-dir mapping puts cgroups/,
# pam/, ... under ztgpu.*, and the Prolog/Epilog run with `python -I -S`.
install: setup
	@# setuptools reuses build/lib: a module moved or deleted since the last
	@# build would otherwise still be installed (and tests would pass on it).
	rm -rf build/lib build/bdist.*
	$(PIP) install -q --no-deps --no-build-isolation --force-reinstall .

lint: setup
	$(VENV)/bin/ruff check .

# mypy sees the installed layout: a tree of links mapping the top-level
# integration folders to their ztgpu.* names.
typecheck: setup
	@rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/ztgpu
	@for f in ztgpu/*; do ln -s ../../../$$f $(TYPECHECK_TREE)/ztgpu/; done
	@for d in cgroups pam prolog_epilog slurm_plugins; do ln -s ../../../$$d $(TYPECHECK_TREE)/ztgpu/$$d; done
	cd $(TYPECHECK_TREE) && ../../$(VENV)/bin/mypy --strict --config-file ../../pyproject.toml -p ztgpu

# The tests run the venv's interpreter as unprivileged test users (job tasks,
# researchers' `ztgpu login`, munge clients), as a cluster runs the installed
# suite: every directory above the checkout must let them through. A checkout
# under a private directory (e.g. `mktemp -d`, mode 0700) gets search
# permission (o+x: pass through, not list) on those of its directories that
# lack it; each change is printed.
reachable:
	@d="$(CURDIR)"; while [ "$$d" != "/" ]; do \
	  if [ -O "$$d" ] && ! stat -c %A "$$d" | grep -q '^d........[xt]'; then \
	    echo "making $$d searchable by the test users (chmod o+x)"; chmod o+x "$$d"; \
	  fi; d=$$(dirname "$$d"); done

test: install lint typecheck reachable
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=25 -m "not deploy" tests

# The Ansible roles run over ssh against the pure cgroup-v2 VM
# (tests/test_ansible_vm.py): under software emulation that takes about 15
# minutes, so it is kept out of `make test` (which runs the same roles
# against container hosts, tests/test_ansible.py).
test-deploy: install reachable
	$(VENV)/bin/pytest -q -p no:cacheprovider -m deploy tests

demo: install
	$(VENV)/bin/ztgpu demo

bench: install
	$(PY) bench/job_turnaround.py
	$(PY) bench/collector_ingest.py
	$(PY) bench/pdp_latency.py
	$(PY) bench/revocation.py
	$(PY) bench/prolog_grant.py
	$(PY) bench/short_jobs.py
	$(PY) bench/holder_scan.py
	$(PY) bench/login_flood.py
	$(PY) bench/v2_node.py
	$(PY) bench/pam_latency.py
	$(PY) bench/gpu_wipe.py
	$(PY) bench/anomaly.py

# Mutation testing of the security-critical pure logic (slurm/env, trust/grants,
# audit/events, policy, trust/totp), configured in pyproject.toml [tool.mutmut];
# scores and equivalent survivors: tests/MUTATION.md. Not part of `make test`
# (about 7 minutes on 2 cores). Only the `mutation` extra's requirements are
# installed (not the package: mutmut imports its own copy of ztgpu/), and the
# run happens in a copy under build/ so that mutmut's ./mutants stays out of
# the checkout.
MUTATION_DIR := build/mutation
mutation: setup
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['mutation']))" \
	  | xargs -d '\n' $(PIP) install -q
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	cp -r pyproject.toml ztgpu tests configs $(MUTATION_DIR)/
	cd $(MUTATION_DIR) && $(CURDIR)/$(VENV)/bin/mutmut run > mutmut-run.log 2>&1 \
	  || { tail -c 4000 mutmut-run.log; exit 1; }
	cd $(MUTATION_DIR) && $(CURDIR)/$(PY) $(CURDIR)/tests/mutation_scores.py mutants

clean:
	rm -rf build dist *.egg-info $(TYPECHECK_TREE)
