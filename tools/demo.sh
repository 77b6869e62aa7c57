#!/usr/bin/env bash
# What `make demo` runs, one command at a time: start the embedded mesh, run a
# first workflow, a workflow that waits for a person's approval, and one that
# works on a (simulated) phone.
set -euo pipefail
cd "$(dirname "$0")/.."
stepline=${STEPLINE:-.venv/bin/stepline}

say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }
quoted() { local a; for a in "$@"; do [[ $a == *" "* ]] && printf ' "%s"' "$a" || printf ' %s' "$a"; done; }
hint() { printf '  %-58s %s\n' "$1" "$2"; }
show() { printf '$ stepline%s\n' "$(quoted "$@")"; "$stepline" "$@"; }

say "the mesh: PostgreSQL, NATS, adb, two simulated phones, five services"
show up --phones 2

say "a first workflow, followed to its end"
show workflows apply examples/hello.yaml
show run hello --input name=Ada --wait

say "a workflow with an approval gate, started by the operator"
show workflows apply examples/approval.yaml
printf '$ stepline run approval --input amount=120 --as operator --quiet\n'
run=$("$stepline" run approval --input amount=120 --as operator --quiet)
echo "$run"
show runs wait "$run" --until suspended --max-wait 60
show approvals list --run "$run"

say "the approver approves it (the operator, who started it, may not)"
show approvals approve --run "$run" --as approver --reason "amount checked"
show runs wait "$run" --max-wait 60
show runs show "$run"

say "a workflow on a phone: log in to the simulated social app, post, take screenshots"
show workflows apply examples/social-post.yaml
printf '$ stepline run social-post --input account=ada --input password=secret --quiet --wait\n'
run=$("$stepline" run social-post --input account=ada --input password=secret --quiet --wait)
echo "$run"
show runs show "$run"
show devices list

say "done; the mesh keeps running in the background"
hint "$stepline runs artifact ARTIFACT -o posted.png" "save a screenshot listed above"
hint "$stepline devices show SERIAL" "a phone's lease and health checks"
hint "$stepline status" "health of every component"
hint "make down" "stop the mesh"
