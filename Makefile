# Build of the PSA-VLM engine. `make` builds everything, `make test` runs every suite.
# CUDA sources (tensor/cuda/*.cu) are compiled when nvcc is found; CUDA=0 forces a CPU-only build.
CXX      ?= g++
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_ARCH ?= sm_90
BUILD    ?= build
OBJ      := $(BUILD)/obj
OPT      ?= -O3 -march=native
CXXFLAGS += -std=c++17 $(OPT) -fopenmp -Wall -Wextra -Wno-unused-parameter -I. -MMD -MP
LDLIBS   += -fopenmp -lxxhash -lpthread -ldl

ifeq ($(CUDA),0)
  NVCC :=
endif
CU_SRCS  := $(if $(NVCC),$(wildcard tensor/cuda/*.cu))
ifneq ($(CU_SRCS),)
  CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
  CXXFLAGS  += -DPSA_CUDA=1 -I$(CUDA_HOME)/include
  NVFLAGS   := -std=c++17 -O3 -arch=$(CUDA_ARCH) -I. -DPSA_CUDA=1 -MMD -MP -Xcompiler -fopenmp
  LDLIBS    += -L$(CUDA_HOME)/lib64 -lcudart -lcublas -Wl,-rpath,$(CUDA_HOME)/lib64
endif

LIB_SRCS   := $(wildcard tensor/*.cpp tensor/cpu/*.cpp autograd/*.cpp nn/*.cpp psa/*.cpp)
TOOL_SRCS  := $(wildcard tools/*.cpp)
TEST_SRCS  := $(wildcard tests/*.cpp)
BENCH_SRCS := $(wildcard bench/*.cpp)

LIB_OBJS   := $(LIB_SRCS:%.cpp=$(OBJ)/%.o) $(CU_SRCS:%.cu=$(OBJ)/%.cu.o)
TOOL_OBJS  := $(TOOL_SRCS:%.cpp=$(OBJ)/%.o)
TEST_OBJS  := $(TEST_SRCS:%.cpp=$(OBJ)/%.o)
BENCH_BINS := $(BENCH_SRCS:bench/%.cpp=$(BUILD)/bench_%)
LIB        := $(BUILD)/libpsa.a

.PHONY: all test deps clean bench
all: $(BUILD)/psa $(BUILD)/psa_tests $(BENCH_BINS)

$(OBJ)/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(OBJ)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/psa: $(TOOL_OBJS) $(LIB)
	$(CXX) $(CXXFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/psa_tests: $(TEST_OBJS) $(LIB)
	$(CXX) $(CXXFLAGS) $^ -o $@ -lgtest -lgtest_main $(LDLIBS)

$(BUILD)/bench_%: bench/%.cpp $(LIB)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $< $(LIB) -o $@ -lbenchmark -lbenchmark_main $(LDLIBS)

# GTEST_FILTER narrows a run, e.g. `make test GTEST_FILTER='Ops.*'`.
test: $(BUILD)/psa_tests $(BUILD)/psa
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./$(BUILD)/psa_tests --gtest_brief=1 $(if $(GTEST_FILTER),--gtest_filter='$(GTEST_FILTER)')

bench: $(BENCH_BINS)
	@for b in $(BENCH_BINS); do echo "== $$b"; ./$$b --benchmark_min_time=0.2 || exit 1; done

DEB_PKGS := build-essential libgtest-dev libbenchmark-dev libstb-dev libxxhash-dev fonts-dejavu-core
deps:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(DEB_PKGS); \
	else echo "run as root: apt-get install -y $(DEB_PKGS)"; fi

clean:
	rm -rf $(BUILD)

-include $(LIB_OBJS:.o=.d) $(TOOL_OBJS:.o=.d) $(TEST_OBJS:.o=.d)
