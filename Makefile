# Two entry points on a fresh Debian 12 machine, as root:
#   make demo   install what is missing, build the example image in testdata/, run it
#   make test   install what is missing, run the whole test suite (slow benchmarks excluded)

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PYBUILD  := $(VENV)/bin/pybuild
STAMP    := $(VENV)/.installed
DEMO_DIR := build/demo

# System packages: the venv and compilers, the static busybox the test base image
# is built from, the independent OCI validators the tests use, ssh-agent (--ssh),
# and xfsprogs (a test's XFS on a loop device, where COPY makes reflinks).
APT_PACKAGES := python3-venv python3-dev gcc pkg-config libfuse3-dev fuse3 \
                busybox-static skopeo umoci ca-certificates \
                docker-registry apache2-utils uidmap openssh-client xfsprogs

.PHONY: all demo test test-slow bench docs system venv clean

all: demo

system:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml | system
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m compileall -q builder
	touch $@

demo: system venv
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	cp -r testdata/busybox $(DEMO_DIR)/busybox && cp /bin/busybox $(DEMO_DIR)/busybox/busybox
	mkdir -p $(DEMO_DIR)/busybox/rootfs/proc $(DEMO_DIR)/busybox/rootfs/dev $(DEMO_DIR)/busybox/rootfs/sys
	$(PYBUILD) build -t busybox:demo $(DEMO_DIR)/busybox
	$(PYBUILD) -t pybuild-demo:latest -f testdata/demo/Dockerfile testdata/demo
	$(PYBUILD) images
	$(PYBUILD) history pybuild-demo:latest
	$(PYBUILD) run --rm pybuild-demo:latest

test: system venv
	$(PY) -m pytest -m "not slow" -q

test-slow: system venv
	$(PY) -m pytest -m slow -q

bench: system venv
	$(PY) bench/bench.py

# docs/cli.md is generated from the argument parser (tests/test_docs.py checks it).
docs: venv
	$(PY) -c "from builder.cli import reference_markdown; open('docs/cli.md', 'w').write(reference_markdown())"

clean:
	rm -rf $(VENV) build
