# Sourced by test.sh, demo.sh and gpu-check.sh: installs what is missing and configures
# build/<config>. Sets build_dir.
config=${1:-default}
build_dir=build/$config

# The link flags a torch wheel needs: its CUDA libraries (site-packages/nvidia/*/lib) must be
# found, and win over an older system CUDA, at link time. $1: the wheel's site-packages.
wheel_link_flags() {
  find "$1/nvidia" -mindepth 2 -maxdepth 3 -type d -name lib 2>/dev/null |
    sed 's/^/-Wl,-rpath-link,/' | tr '\n' ' '
}
# -g1: line tables for backtraces and sanitizer reports, without the full debug information
# that makes LibTorch's templates a quarter slower to compile.
cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG"
            -DTORCHGUARD_WERROR=ON)
case "$config" in
  default)
    bash scripts/setup.sh
    # CI does not run the benchmarks: it proves they compile (-fsyntax-only), in a third of the time.
    benchmarks_checked_only=OFF
    if [[ ${CI:-} == true ]]; then benchmarks_checked_only=ON; fi
    cmake_args+=("-DTORCHGUARD_CHECK_BENCHMARKS_ONLY=$benchmarks_checked_only")
    ;;
  asan)
    bash scripts/setup.sh
    # -Wno-maybe-uninitialized: GCC 12 with the sanitizers reports LibTorch 1.13's own data loader
    # (DataLoaderBase's c10::optional<std::vector> results) as maybe uninitialized: a false
    # positive inside LibTorch's headers.
    flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    flags+=" -Wno-maybe-uninitialized"
    # Consumer projects, the other examples and the demo's other cases are proven by the default
    # configuration; here the demo runs the guards' failure paths. -O1, as the sanitizers advise.
    # The [cuda] tests only skip on this machine: the default and torch2 configurations build them.
    cmake_args+=("-DCMAKE_CXX_FLAGS=$flags" "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG"
                 -DTORCHGUARD_CONSUMER_TESTS=OFF -DTORCHGUARD_BUILD_BENCHMARKS=OFF
                 -DTORCHGUARD_CUDA_TESTS=OFF
                 -DTORCHGUARD_EXAMPLES=train_fashion_mnist
                 "-DTORCHGUARD_DEMO_CASES=short;bad-data;fallback;full-disk")
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
    ;;
  tsan)
    bash scripts/setup.sh
    # The concurrent parts' tests only (TORCHGUARD_CONCURRENCY_TESTS_ONLY): LibTorch is not
    # instrumented, so tests/tsan.supp silences reports from inside it.
    cmake_args+=("-DCMAKE_CXX_FLAGS=-fsanitize=thread -fno-omit-frame-pointer"
                 -DTORCHGUARD_CONCURRENCY_TESTS_ONLY=ON -DTORCHGUARD_CUDA_TESTS=OFF
                 -DTORCHGUARD_BUILD_EXAMPLES=OFF -DTORCHGUARD_BUILD_BENCHMARKS=OFF)
    export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp}
    # One intra-op thread: OpenMP's uninstrumented barriers would read as races.
    export OMP_NUM_THREADS=1
    ;;
  torch2)
    bash scripts/setup.sh --torch2
    source scripts/venvs.sh
    site=$("$torch2_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # Benchmarks, consumer projects, the other examples and the demo's checks of its own
    # command line are built and run in the default configuration; here, what depends on the
    # LibTorch version: the tests (the [cuda] ones against CUDA headers), resuming bitwise, the
    # exchange with Python, the launcher, bench_gpu; the other examples are compiled without code
    # generation.
    cmake_args+=(-DCMAKE_CXX_STANDARD=20 "-DCMAKE_PREFIX_PATH=$site/torch/share/cmake"
                 -DTORCHGUARD_BUILD_BENCHMARKS=ON -DTORCHGUARD_BENCHMARKS= -DTORCHGUARD_CONSUMER_TESTS=OFF
                 "-DTORCHGUARD_EXAMPLES=train_fashion_mnist;train_distributed"
                 -DTORCHGUARD_CHECK_OTHER_EXAMPLES=ON
                 "-DTORCHGUARD_DEMO_CASES=short;resume;fallback;python;full-disk;crossing"
                 -DTORCHGUARD_RECOVERY_CASES=poisoned
                 "-DCMAKE_EXE_LINKER_FLAGS=$(wheel_link_flags "$site")")
    # Torch's CMake package probes the GPUs unless told which architectures to target; the guards
    # compile no kernels, so any list will do.
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    ;;
  gpu)
    # scripts/gpu-check.sh on a GPU machine: no package registries there. LibTorch is the
    # machine's own PyTorch ($PYTHON, default python3); spdlog, fmt, Catch2, xxHash and
    # nlohmann-json come unpacked in .deps/ (../shared/tools/device-deps, run where apt-get works).
    # Only torchguard_cuda_tests and bench_gpu.
    python=${PYTHON:-python3}
    site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    torch_prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
    deps=$PWD/.deps/usr
    [[ -d $deps ]] || { echo "configure: $deps is missing (run ../shared/tools/device-deps where apt-get works, and carry .deps)" >&2; return 2; }
    export LD_LIBRARY_PATH="$deps/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
    cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_STANDARD=20
                "-DCMAKE_PREFIX_PATH=$deps;$torch_prefix" -DCMAKE_LIBRARY_ARCHITECTURE=x86_64-linux-gnu
                -DTORCHGUARD_CUDA_TESTS_ONLY=ON -DTORCHGUARD_BUILD_EXAMPLES=OFF
                -DTORCHGUARD_BUILD_BENCHMARKS=ON -DTORCHGUARD_BENCHMARKS= -DTORCHGUARD_INSTALL=OFF
                "-DCMAKE_EXE_LINKER_FLAGS=$(wheel_link_flags "$site")")
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    ;;
  *)
    echo "unknown configuration '$config' (expected default, asan, tsan, torch2 or gpu)" >&2
    exit 2
    ;;
esac
cmake -S . -B "$build_dir" "${cmake_args[@]}" >/dev/null
