# Two commands set up and exercise a fresh machine: `make demo` and `make test`.
# Both create the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: .venv demo medmix-demo eval-demo test test-experiments test-all typecheck lint clean-demo

.venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/midol fit --config configs/pretrain/demo.yaml --overwrite true

# MedMIX on real ODIR patients with random experts (CPU, about 2 minutes from a cold feature cache): fit, then the report
medmix-demo: $(STAMP)
	$(BIN)/midol fit --config configs/fusion/medmix_demo.yaml --overwrite true
	$(BIN)/midol robustness outputs/medmix_demo/checkpoints/best.ckpt --out outputs/medmix_demo/robustness --cost

# midol eval on the bundled images: the demo's M-IDoL teacher vs the random init of its Swin
# (run `make demo` first; seconds). The report is outputs/eval_demo/report.md.
eval-demo: $(STAMP)
	test -f outputs/demo/teacher_backbone.safetensors || $(MAKE) demo
	$(BIN)/midol eval --suite configs/eval/sample_data.yaml --backbones midol=outputs/demo/teacher_backbone.safetensors --out outputs/eval_demo

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -m "not slow" -q

# the studies' and benchmarks' own tests (experiments/ is not part of the library's tests)
test-experiments: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q experiments

typecheck: $(STAMP)
	$(BIN)/python -m mypy

lint: $(STAMP)
	$(BIN)/python -m ruff check midol tests experiments

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests experiments

clean-demo:
	rm -rf outputs/demo
