# Build of the PSA-VLM engine. `make` builds everything, `make test` runs every suite.
# CUDA sources (tensor/cuda/*.cu) are compiled when nvcc is found; CUDA=0 forces a CPU-only build.
CXX      ?= g++
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_ARCH ?= sm_90
BUILD    ?= build
OBJ      := $(BUILD)/obj
OPT      ?= -O3 -march=native
# -fno-math-errno: sqrt need not call libm just to set errno (never read here), so loops with a sqrt, such as
# AdamW's, vectorise; IEEE sqrt and division round the same either way.
CXXFLAGS += -std=c++17 $(OPT) -fno-math-errno -fopenmp -Wall -Wextra -Wno-unused-parameter -I. -MMD -MP
LDLIBS   += -fopenmp -lxxhash -lpthread -ldl

ifneq ($(filter 0 emu,$(CUDA)),)
  NVCC :=
endif
CU_SRCS  := $(if $(NVCC),$(wildcard tensor/cuda/*.cu))
# CUDA=emu: the CUDA backend compiled as C++ against the CPU emulator of tests/cuda_emu (no GPU, no nvcc); each
# launch k<<<cfg>>>(args) is rewritten to the emulator's k * Config(cfg) * args(args). `make test-cuda-emu`.
ifeq ($(CUDA),emu)
  CU_SRCS   := $(wildcard tensor/cuda/*.cu)
  CXXFLAGS  += -DPSA_CUDA=1 -DPSA_CUDA_EMU=1 -Itests/cuda_emu -Wno-unknown-pragmas
  EMU_SRCS  := tests/cuda_emu/cuda_emu.cpp
endif
ifneq ($(CU_SRCS),)
  CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
  CXXFLAGS  += -DPSA_CUDA=1 -I$(CUDA_HOME)/include
  NVFLAGS   := -std=c++17 -O3 -arch=$(CUDA_ARCH) -lineinfo -I. -DPSA_CUDA=1 -MMD -MP -Xcompiler -fopenmp,-Wall,-Wextra,-Wno-unused-parameter
  LDLIBS    += -L$(CUDA_HOME)/lib64 -lcudart -lcublas -Wl,-rpath,$(CUDA_HOME)/lib64
endif

LIB_SRCS   := $(wildcard tensor/*.cpp tensor/cpu/*.cpp autograd/*.cpp nn/*.cpp psa/*.cpp) $(EMU_SRCS)
TOOL_SRCS  := $(wildcard tools/*.cpp)
TEST_SRCS  := $(wildcard tests/*.cpp)
BENCH_SRCS := $(wildcard bench/*.cpp)

LIB_OBJS   := $(LIB_SRCS:%.cpp=$(OBJ)/%.o) $(CU_SRCS:%.cu=$(OBJ)/%.cu.o)
TOOL_OBJS  := $(TOOL_SRCS:%.cpp=$(OBJ)/%.o)
TEST_OBJS  := $(TEST_SRCS:%.cpp=$(OBJ)/%.o)
BENCH_BINS := $(BENCH_SRCS:bench/%.cpp=$(BUILD)/bench_%)
LIB        := $(BUILD)/libpsa.a
# stb_image 2.27 reads PNG and BMP palette entries without checking the index against the palette's length:
# with zero-initialised locals an index past it reads black, the same on every run, not stack garbage.
STB_FLAGS := -ftrivial-auto-var-init=zero
# Objects depend on a stamp named after a hash of the flags, so switching CUDA=0 <-> CUDA builds (or OPT,
# CUDA_ARCH) in one build folder recompiles instead of linking objects made for the other configuration.
FLAGS_STAMP := $(OBJ)/.flags-$(shell echo '$(CXX) $(CXXFLAGS) $(STB_FLAGS) $(NVCC) $(NVFLAGS) $(LDLIBS)' | md5sum | cut -c1-12)

.PHONY: all test test-cuda-emu deps deps-bench clean bench train infer check-deps fuzz check-asan check-valgrind
all: $(BUILD)/psa $(BUILD)/psa_tests $(BENCH_BINS)

$(FLAGS_STAMP):
	@mkdir -p $(OBJ) && rm -f $(OBJ)/.flags-* && touch $@

$(OBJ)/psa/image.o: CXXFLAGS += $(STB_FLAGS)

$(OBJ)/%.o: %.cpp $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

ifeq ($(CUDA),emu)
$(OBJ)/%.cu.o: %.cu $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	{ echo '#line 1 "$<"'; sed -e 's/<<</ * ::cuda_emu::Config(/' -e 's/>>>/) * ::cuda_emu::args/' $<; } > $(OBJ)/$*.emu.cpp
	$(CXX) $(CXXFLAGS) -c $(OBJ)/$*.emu.cpp -o $@
else
$(OBJ)/%.cu.o: %.cu $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@
endif

$(LIB): $(LIB_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/psa: $(TOOL_OBJS) $(LIB)
	$(CXX) $(CXXFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/psa_tests: $(TEST_OBJS) $(LIB)
	$(CXX) $(CXXFLAGS) $^ -o $@ -lgtest -lgtest_main $(LDLIBS)

$(BUILD)/bench_%: bench/%.cpp $(LIB) $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $< $(LIB) -o $@ -lbenchmark -lbenchmark_main $(LDLIBS)

# GTEST_FILTER narrows a run, e.g. `make test GTEST_FILTER='Ops.*'`. Without a filter the CUDA suite then runs
# once more on the CPU emulator (test-cuda-emu), so the kernels are checked on machines without a GPU too.
test:
	@$(MAKE) --no-print-directory -j$(JOBS) $(BUILD)/psa_tests $(BUILD)/psa
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./$(BUILD)/psa_tests --gtest_brief=1 $(if $(GTEST_FILTER),--gtest_filter='$(GTEST_FILTER)')
	$(if $(GTEST_FILTER)$(filter emu,$(CUDA)),,@$(MAKE) --no-print-directory test-cuda-emu)

# `make test-cuda-emu`: every tensor/cuda/*.cu compiled as C++ against the CPU emulator of tests/cuda_emu (in
# build-emu/, CUDA=emu), then the CUDA suite (parity of every op, a training step of each stage, streams, the
# own SGEMM) and the emulator's own tests. It checks the kernels' logic, barriers and launch limits; not speed.
EMU_BUILD ?= build-emu
test-cuda-emu:
	@$(MAKE) --no-print-directory -j$(JOBS) BUILD=$(EMU_BUILD) CUDA=emu $(EMU_BUILD)/psa_tests
	@echo "== the CUDA suite on the CPU emulator (tests/cuda_emu)"
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./$(EMU_BUILD)/psa_tests --gtest_brief=1 --gtest_filter='Cuda*'

# The tour (about 4 minutes on 2 cores after the build): dataset, vision pretraining, three training stages, benchmark table (OUT/report.md).
PRESET ?= tiny
DATA   ?= data/$(PRESET)
RUN    ?= runs/$(PRESET)
DEVICE ?= cpu
JOBS   ?= $(shell nproc 2>/dev/null || echo 2)
# --overwrite: a second `make train` trains again with this build (--resume would keep an older build's weights).
train: check-deps
	@$(MAKE) --no-print-directory -j$(JOBS) $(BUILD)/psa
	./$(BUILD)/psa train --preset $(PRESET) --data $(DATA) --out $(RUN) --device $(DEVICE) --overwrite

# Asks the trained model about a clean image, three risky ones and a hard negative from the test split; trains
# first into an empty RUN, never over a run that is only unfinished (make train would --overwrite it).
INFER_PICKS := safe_type.:6,.*hard_negative.:false safe_type.:0, safe_type.:1, safe_type.:4, hard_negative.:true
infer:
	@$(MAKE) --no-print-directory -j$(JOBS) $(BUILD)/psa
	@[ -f $(RUN)/stage2/model.safetensors ] || [ -z "$$(ls -A $(RUN) 2>/dev/null)" ] || { \
	  echo "make infer: $(RUN) holds a run without a Stage II checkpoint: continue it with" \
	    "./$(BUILD)/psa train --preset $(PRESET) --data $(DATA) --out $(RUN) --device $(DEVICE) --resume," \
	    "or train it again with make train"; exit 2; }
	@[ -f $(RUN)/stage2/model.safetensors ] || $(MAKE) train
	@for pick in $(INFER_PICKS); do \
	  img=$$(grep -m1 "$$pick" $(DATA)/test.jsonl | sed 's/.*"image":"\([^"]*\)".*/\1/'); \
	  [ -n "$$img" ] || { echo "no test record matches $$pick in $(DATA)/test.jsonl"; exit 1; }; \
	  echo "== $(DATA)/$$img  ($$pick)"; \
	  ./$(BUILD)/psa infer --ckpt $(RUN)/stage2 --image $(DATA)/$$img --prompt "Describe the image." || exit 1; \
	done

check-deps:
	@for h in gtest/gtest.h benchmark/benchmark.h stb/stb_image.h xxhash.h; do \
	  [ -f /usr/include/$$h ] || { echo "missing /usr/include/$$h: run 'make deps' as root"; exit 1; }; done

# `make bench` (~4 minutes on 2 cores): every bench/*.cpp binary (Google Benchmark JSON), the tiny training step
# (stages base/1/2 x 1/2 threads), the PyTorch baseline when /usr/bin/python3 has torch, a kernel profile of the
# step (one thread), the scaling sweep; then tools/bench_report.py merges them into
# bench/results/<host>.{json,md,csv}.
# Raw outputs: bench/results/<host>/. On a shared machine the load changes within minutes, so ours and PyTorch
# alternate in BENCH_ROUNDS short rounds and the report takes the median of the per-round ratios.
# OMP_WAIT_POLICY=passive as in `psa` itself: spinning idle threads steal the core on a shared 2-core machine.
BENCH_HOST   := $(shell hostname)
BENCH_RAW    := bench/results/$(BENCH_HOST)
BENCH_MIN_TIME ?= 0.05
BENCH_ROUNDS ?= 5
BENCH_STEPS  := --steps 5 --warmup 2
# The scaling sweep runs on one thread by default: on a shared machine a second thread's stalls at every OpenMP
# barrier swamp the batch/length effects being measured (set BENCH_SCALING_THREADS=2 on an idle machine).
BENCH_SCALING_THREADS ?= 1
bench: $(BENCH_BINS) $(BUILD)/psa
	@mkdir -p $(BENCH_RAW) && rm -f $(BENCH_RAW)/*.json
	@uptime | tee $(BENCH_RAW)/uptime_start.txt
	@for b in $(BENCH_BINS:$(BUILD)/bench_%=%); do echo "== bench_$$b"; \
	  OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./$(BUILD)/bench_$$b --benchmark_min_time=$(BENCH_MIN_TIME) \
	    --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
	    --benchmark_out=$(BENCH_RAW)/$$b.json --benchmark_out_format=json || exit 1; done
	@torch=1; if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then torch=0; echo "== PyTorch baseline SKIPPED: /usr/bin/python3 has no torch"; \
	elif [ ! -f tools/psa_reference.py ]; then torch=0; echo "== PyTorch baseline SKIPPED: tools/psa_reference.py does not exist yet"; fi; \
	for r in $$(seq $(BENCH_ROUNDS)); do for t in 1 2; do \
	  for s in $$([ $$r = 1 ] && echo base) 1 2; do echo "== round $$r: psa bench-step --preset tiny --stage $$s --threads $$t"; \
	    ./$(BUILD)/psa bench-step --preset tiny --stage $$s --threads $$t $(BENCH_STEPS) --json > $(BENCH_RAW)/step_$${s}_t$${t}_r$$r.json \
	      && grep '"median_ms"' $(BENCH_RAW)/step_$${s}_t$${t}_r$$r.json || exit 1; done; \
	  [ $$torch = 1 ] || continue; echo "== round $$r: PyTorch baseline, tools/psa_reference.py --bench --threads $$t"; \
	  /usr/bin/python3 tools/psa_reference.py --bench --threads $$t $(BENCH_STEPS) --out $(BENCH_RAW)/torch_t$${t}_r$$r.json \
	    || { echo "== PyTorch baseline FAILED (above): SKIPPED, the report has no PyTorch ratios"; torch=0; rm -f $(BENCH_RAW)/torch_*.json; }; \
	done; done
	@for s in 1 2; do echo "== psa bench-step --profile --stage $$s --threads 1"; \
	  ./$(BUILD)/psa bench-step --profile --preset tiny --stage $$s --threads 1 --steps 10 | tee $(BENCH_RAW)/profile_stage$$s.txt \
	    || exit 1; done
	./$(BUILD)/psa bench-step --scaling --preset tiny --stage 1 --threads $(BENCH_SCALING_THREADS) --out-dir bench/results
	@uptime | tee $(BENCH_RAW)/uptime_end.txt
	python3 tools/bench_report.py --raw $(BENCH_RAW) --out bench/results --host $(BENCH_HOST)

# `make fuzz`: libFuzzer targets (fuzz/fuzz_*.cpp) for every reader of untrusted bytes, built with clang and
# ASan + UBSan in build-fuzz/, each run for FUZZ_SECONDS from its committed seeds (fuzz/corpus/<target>/;
# new inputs go to build-fuzz/corpus/<target>/, crashes to build-fuzz/artifacts/<target>/). Only the reader
# sources are compiled: the targets need no tensors, so the build takes seconds, not minutes.
FUZZ_SECONDS ?= 30
FUZZ_CXX     ?= clang++
FUZZ_BUILD   ?= build-fuzz
FUZZ_TARGETS := safetensors json records tokenizer image
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_FLAGS   := -std=c++17 -O1 -g -fno-omit-frame-pointer -I. -MMD -MP $(FUZZ_SAN)
FUZZ_LIB     := $(patsubst %.cpp,$(FUZZ_BUILD)/obj/%.o,nn/json.cpp nn/safetensors.cpp psa/tokenizer.cpp psa/image.cpp psa/records.cpp)
FUZZ_BINS    := $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz_%)

$(FUZZ_BUILD)/obj/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_BUILD)/fuzz_%: fuzz/fuzz_%.cpp $(FUZZ_LIB)
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer $^ -o $@ -lxxhash

# The reader objects are intermediates of the pattern rule above; keep them so a rerun only relinks.
.SECONDARY: $(FUZZ_LIB)

fuzz: $(FUZZ_BINS)
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t $(FUZZ_BUILD)/artifacts/$$t; echo "== fuzz_$$t for $(FUZZ_SECONDS) s"; \
	  ./$(FUZZ_BUILD)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
	    -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/artifacts/$$t/ \
	    $(FUZZ_BUILD)/corpus/$$t fuzz/corpus/$$t 2>$(FUZZ_BUILD)/fuzz_$$t.log \
	    || { tail -40 $(FUZZ_BUILD)/fuzz_$$t.log; exit 1; }; \
	  grep -E '^stat::number_of_executed_units|^Done' $(FUZZ_BUILD)/fuzz_$$t.log; done

# `make check-asan`: the test suite (and the `psa` binary the CLI tests run) built with ASan + UBSan in
# build-asan/ on the CPU only; any finding fails the run.
ASAN_BUILD ?= build-asan
ASAN_OPT   := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
check-asan:
	@$(MAKE) --no-print-directory -j$(JOBS) BUILD=$(ASAN_BUILD) CUDA=0 OPT="$(ASAN_OPT)" $(ASAN_BUILD)/psa_tests $(ASAN_BUILD)/psa
	PSA_BIN=./$(ASAN_BUILD)/psa OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
	  UBSAN_OPTIONS=print_stacktrace=1 ./$(ASAN_BUILD)/psa_tests --gtest_brief=1 $(if $(GTEST_FILTER),--gtest_filter='$(GTEST_FILTER)')

# `make check-valgrind`: two base-stage steps of `psa train` (tiny preset, batch 2) on a 1%-scale dataset under
# memcheck; any error or definite leak fails it.
VG_DIR ?= $(BUILD)/valgrind
check-valgrind: $(BUILD)/psa
	@rm -rf $(VG_DIR) && mkdir -p $(VG_DIR)
	./$(BUILD)/psa data --preset tiny --scale 0.01 --out $(VG_DIR)/data
	OMP_NUM_THREADS=1 valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
	  ./$(BUILD)/psa train --data $(VG_DIR)/data --out $(VG_DIR)/run --stage base --steps-vision 0 --steps-base 2 --batch 2 --no-eval --quiet

DEB_PKGS := build-essential libgtest-dev libbenchmark-dev libstb-dev libxxhash-dev fonts-dejavu-core
deps:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(DEB_PKGS); \
	else echo "run as root: apt-get install -y $(DEB_PKGS)"; fi

# `make bench`'s baselines, never needed to build or run the engine: PyTorch (CPU) and OpenBLAS. Without
# libopenblas0-pthread, Debian's python3-torch runs on netlib's reference BLAS, ~15x slower (the baseline then
# refuses to run); bench/gemm.cpp's OpenBLAS rows need it too.
DEB_BENCH_PKGS := python3-torch libopenblas0-pthread
deps-bench:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(DEB_BENCH_PKGS); \
	else echo "run as root: apt-get install -y $(DEB_BENCH_PKGS)"; fi

clean:
	rm -rf $(BUILD) $(FUZZ_BUILD) $(ASAN_BUILD) $(EMU_BUILD)

-include $(FUZZ_LIB:.o=.d) $(LIB_OBJS:.o=.d) $(TOOL_OBJS:.o=.d) $(TEST_OBJS:.o=.d) $(BENCH_BINS:=.d)
