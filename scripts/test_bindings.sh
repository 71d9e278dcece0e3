#!/usr/bin/env bash
# Runs the examples in five languages and the Go, Node and C# bindings' tests against a built
# libfinetune.so, after `cargo test` or `cargo build` has built it and the CLI.
#
#   scripts/test_bindings.sh [profile]      profile: debug (default) or release
#
# FINETUNE_LIB, when set, names the library to test; otherwise the one in the cargo target
# directory. A language whose toolchain is missing is skipped with a message (.ci/run installs
# them all).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
profile=${1:-debug}
target=${CARGO_TARGET_DIR:-$root/target}
if [ -z "${FINETUNE_LIB:-}" ]; then
    # `cargo build` puts the library in the profile's directory, `cargo test` only in deps/.
    FINETUNE_LIB=$target/$profile/libfinetune.so
    [ -e "$FINETUNE_LIB" ] || FINETUNE_LIB=$target/$profile/deps/libfinetune.so
fi
export FINETUNE_LIB
cli=$target/$profile/finetune
for f in "$FINETUNE_LIB" "$cli"; do
    [ -e "$f" ] || { echo "missing $f: run cargo build first" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$cli" create --shape tiny --out "$work/model" >/dev/null || exit 1
lib_dir=$(dirname "$FINETUNE_LIB")

passed=0 failed=0 skipped=0
failures=()

# run NAME COMMAND...: runs one check, timing it, its output kept for a failure.
run() {
    local name=$1
    shift
    local start=$SECONDS
    if (cd "$root" && "$@") >"$work/log" 2>&1; then
        passed=$((passed + 1))
        echo "ok      $name ($((SECONDS - start)) s)"
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "FAILED  $name ($((SECONDS - start)) s)"
        sed 's/^/    /' "$work/log" | tail -40
    fi
}

skip() {
    skipped=$((skipped + 1))
    echo "skipped $1: $2"
}

have() { command -v "$1" >/dev/null 2>&1; }

# expect_fail NEEDLE COMMAND...: the command must exit 1 and print NEEDLE (the error path).
expect_fail() {
    local needle=$1
    shift
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    echo "$out"
    [ "$rc" -eq 1 ] && grep -qF -- "$needle" <<<"$out"
}

# run_example EXE...: the example trains, saves an adapter and generates; with a bad model path
# it fails with the library's message.
run_example() {
    local out=$work/adapter-$RANDOM
    "$@" "$work/model" "$out" || return 1
    [ -f "$out/adapter_model.safetensors" ] || { echo "no adapter written"; return 1; }
    expect_fail "$work/no-such-model" "$@" "$work/no-such-model" "$out"
}

# --- C: the example, plain and under valgrind (no leaks, no invalid reads) ------------------
c_build() {
    cc -std=c99 -Wall -Wextra -Werror -g -I include examples/c/train.c -L "$lib_dir" \
        -Wl,-rpath,"$lib_dir" -lfinetune -o "$work/train_c" && "$work/train_c" "$work/model" "$work/adapter-c"
}
c_valgrind() {
    local vg=(valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect)
    "${vg[@]}" "$work/train_c" "$work/model" "$work/adapter-c-vg" || return 1
    # The error path frees everything too: exit 1 (not valgrind's 99).
    expect_fail "no-such-model" "${vg[@]}" "$work/train_c" "$work/no-such-model" "$work/x"
}
if have cc; then
    run "c example" c_build
    if have valgrind; then run "c example under valgrind" c_valgrind; else skip "c valgrind" "valgrind not installed"; fi
else
    skip "c example" "no C compiler"
fi

# --- C++: the RAII header's example ----------------------------------------------------------
cpp_example() {
    c++ -std=c++17 -Wall -Wextra -Werror -I include -I examples/cpp examples/cpp/train.cpp -L "$lib_dir" \
        -Wl,-rpath,"$lib_dir" -lfinetune -o "$work/train_cpp" && run_example "$work/train_cpp"
}
if have c++; then run "c++ example" cpp_example; else skip "c++ example" "no C++ compiler"; fi

# --- Go ----------------------------------------------------------------------------------------
go_tests() { (cd bindings/go && go vet ./... && go test -count=1 ./...); }
go_example() { (cd examples/go && go build -o "$work/train_go" .) && run_example "$work/train_go"; }
if have go; then
    run "go binding tests" go_tests
    run "go example" go_example
else
    skip "go" "go not installed"
fi

# --- Node.js -----------------------------------------------------------------------------------
node_tests() { (cd bindings/node && npm install --no-audit --no-fund --silent && node --test test/binding.test.js); }
node_example() {
    (cd examples/node && npm install --no-audit --no-fund --silent) && run_example node examples/node/train.js
}
if have node && have npm; then
    run "node binding tests" node_tests
    run "node example" node_example
else
    skip "node" "node or npm not installed"
fi

# --- C# on Mono --------------------------------------------------------------------------------
cs_tests() {
    mcs -nologo -warnaserror -target:library -out:"$work/Finetune.dll" bindings/csharp/src/*.cs &&
        mcs -nologo -warnaserror -r:"$work/Finetune.dll" -out:"$work/FinetuneTests.exe" bindings/csharp/tests/Tests.cs &&
        mono "$work/FinetuneTests.exe"
}
cs_example() {
    mcs -nologo -warnaserror -r:"$work/Finetune.dll" -r:System.Core -out:"$work/train_cs.exe" examples/csharp/Train.cs &&
        run_example mono "$work/train_cs.exe"
}
if have mcs && have mono; then
    run "c# binding tests" cs_tests
    run "c# example" cs_example
else
    skip "c#" "mcs or mono not installed"
fi

[ ${#failures[@]} -eq 0 ] || echo "failed: ${failures[*]}"
echo "bindings: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
