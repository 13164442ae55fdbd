#!/usr/bin/env bash
# ctest `cmake_package`: install the build into a temporary prefix, configure and build the
# plain-C consumer in examples/find_package with find_package(flamingo_rt), run it.
#   test_cmake_package.sh BUILD_DIR SOURCE_DIR WORK_DIR
set -euo pipefail
build="$1"; src="$2"; work="$3"
rm -rf "$work"; mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" > "$work/install.log"
test -f "$work/prefix/include/flamingo_rt/flamingo_rt.h"
cmake -S "$src/examples/find_package" -B "$work/consumer" -DCMAKE_PREFIX_PATH="$work/prefix" > "$work/configure.log"
cmake --build "$work/consumer" > "$work/build.log"
out=$("$work/consumer/consumer")
echo "$out"
test "$out" = "flamingo_rt 0.1.0"
set +e
"$work/consumer/consumer" "$work/missing" 2> "$work/err.txt"
rc=$?
set -e
cat "$work/err.txt"
test "$rc" = 2
grep -q "manifest.json" "$work/err.txt"
echo "cmake package: ok"
