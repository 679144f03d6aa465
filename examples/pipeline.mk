# ResNet-20 on CIFAR-10, stage by stage: every arrow is a file, so any stage can be cached,
# re-run or swapped. Needs the shared material (SHARED=path to the folder with data/ and models/).
QCLI    ?= .venv/bin/qcli
SHARED  ?= ../shared
BITS    ?= w4a8
METHOD  ?= mse
OUT     ?= example-out
MODEL    = builtin:resnet20_cifar10 --weights $(SHARED)/models/resnet20_cifar10.th
TRAIN    = $(SHARED)/data/cifar10/train
TEST     = $(SHARED)/data/cifar10/test

ifdef DATAFREE
CALIB = $(OUT)/calib-data
else
CALIB = $(TRAIN)
endif

all: $(OUT)/eval.json

$(OUT)/calib-data:
	$(QCLI) generate-data $(MODEL) --method bns --num-images 256 --out $@ --force

$(OUT)/model.qcli: $(if $(DATAFREE),$(OUT)/calib-data)
	$(QCLI) calibrate $(MODEL) --data $(CALIB) --limit 1024 --bits $(BITS) --method $(METHOD) --out $@ --force

$(OUT)/model.onnx: $(OUT)/model.qcli
	$(QCLI) export $< --out $@ --check-data $(TEST) --force

$(OUT)/eval.json: $(OUT)/model.onnx
	$(QCLI) eval $< --data $(TEST) --reference $(MODEL) --json > $@.tmp && mv $@.tmp $@
	@cat $@

.PHONY: all
