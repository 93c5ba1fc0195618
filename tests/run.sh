#!/usr/bin/env bash
# The project's test command: builds everything, runs every test project (unit, real-server interop,
# real-kernel VM tier, systemd VM tier) one after the other, and ends with "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."

results=artifacts/test-results
rm -rf "$results"; mkdir -p "$results"

if ! dotnet build NbdDaemon.sln -c Release -warnaserror 2>&1 | tail -n 30; then
  echo "build failed"; echo "0 passed, 1 failed"; exit 1
fi

status=0
for project in tests/*/*.Tests.csproj; do
  name=$(basename "$project" .csproj)
  echo "== $name"
  if ! dotnet test "$project" -c Release --no-build \
        --logger "trx;LogFileName=$name.trx" --logger "console;verbosity=normal" \
        --results-directory "$results" 2>&1 | tee "$results/$name.log" | grep -E '^\s*(Passed|Failed|Skipped) |^(Passed|Failed)!|error'; then
    :
  fi
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

# Count from the TRX files: every executed test, whatever happened to the console output.
counter() { # sum one attribute of <Counters> over every TRX file
  grep -ho "<Counters [^>]*" "$results"/*.trx 2>/dev/null | grep -o " $1=\"[0-9]*\"" | grep -o '[0-9]*' | awk '{s+=$1} END {print s+0}'
}
passed=$(counter passed)
failed=$(( $(counter failed) + $(counter error) + $(counter timeout) + $(counter aborted) ))
skipped=$(counter notExecuted)
expected=$(ls tests/*/*.Tests.csproj | wc -l); got=$(ls "$results"/*.trx 2>/dev/null | wc -l)
if [ "$got" -ne "$expected" ]; then
  echo "only $got of $expected test projects produced results"; failed=$((failed + expected - got)); status=1
fi
[ "$failed" -eq 0 ] || status=1
[ "$skipped" -eq 0 ] || { echo "$skipped tests were skipped: a skip is not a pass"; status=1; }
echo "$passed passed, $failed failed, $skipped skipped"
exit $status
