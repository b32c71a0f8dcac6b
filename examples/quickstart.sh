#!/usr/bin/env bash
# letterbox quickstart: creates a newsletter with 3 subscribers, sends one letter with the
# built-in policies and waits for the job. Run it against `letterbox serve` started
# without --smtp: the 3 messages appear as .eml files in ./letterbox-data/outbox.
#
#   cargo run --release -- serve                 # in one terminal; the first start
#                                                # prints an API token
#   export LETTERBOX_API_TOKEN=lbx_...           # in another, that token
#   ./examples/quickstart.sh
#
# Needs curl and jq. LETTERBOX_URL overrides the server (default http://127.0.0.1:8080);
# LETTERBOX_DATA the data directory whose outbox is listed.
set -euo pipefail

URL=${LETTERBOX_URL:-http://127.0.0.1:8080}
DATA=${LETTERBOX_DATA:-./letterbox-data}
if [ -z "${LETTERBOX_API_TOKEN:-}" ]; then
  echo "set LETTERBOX_API_TOKEN to the token letterbox printed at its first start" >&2
  echo "(or start it with LETTERBOX_API_TOKEN set to a token of your choosing)" >&2
  exit 2
fi

api() { # METHOD PATH [JSON]: prints the response body, fails on HTTP errors
  local method=$1 path=$2 body=${3:-}
  local auth="authorization: Bearer $LETTERBOX_API_TOKEN"
  if [ -n "$body" ]; then
    curl -sS --fail-with-body -X "$method" "$URL$path" -H "$auth" -H 'content-type: application/json' -d "$body"
  else
    curl -sS --fail-with-body -X "$method" "$URL$path" -H "$auth"
  fi
}

echo "== health"; api GET /healthz; echo

newsletter=$(api POST /v1/newsletters '{"name": "Quickstart Weekly", "from": "Quickstart <news@example.com>"}' | jq -r .id)
echo "== newsletter $newsletter"

echo "== subscribers"
api POST "/v1/newsletters/$newsletter/subscribers" '[
  {"email": "ada@example.org",   "name": "Ada",   "attributes": {"plan": "pro"}},
  {"email": "grace@example.org", "name": "Grace", "attributes": {"plan": "free"}},
  {"email": "linus@example.org", "name": "Linus", "attributes": {"plan": "pro"}}
]'; echo

letter=$(api POST "/v1/newsletters/$newsletter/letters" '{
  "subject": "Hello {{ name }}",
  "text": "Hi {{ name }}, you are on the {{ attributes.plan }} plan.\n\nUnsubscribe: {{ unsubscribe_url }}\n",
  "html": "<p>Hi <b>{{ name }}</b>, you are on the {{ attributes.plan }} plan.</p><p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p>"
}' | jq -r .id)
echo "== letter $letter"

job=$(api POST "/v1/letters/$letter/send" | jq -r .job_id)
echo "== job $job"
for _ in $(seq 1 100); do
  state=$(api GET "/v1/jobs/$job" | jq -r .state)
  [ "$state" = queued ] || [ "$state" = running ] || break
  sleep 0.2
done
api GET "/v1/jobs/$job" | jq '{state, counts}'

if [ -d "$DATA/outbox" ]; then
  echo "== outbox ($DATA/outbox)"
  ls -1 "$DATA/outbox"
  echo "== first message"
  head -n 12 "$(ls -1 "$DATA"/outbox/*.eml | head -n 1)"
fi

# A segment: only subscribers whose attribute "plan" equals "pro" get this one.
# api POST "/v1/newsletters/$newsletter/letters" '{"subject": "Pro news", "text": "...",
#   "params": {"segment": {"attribute": "plan", "equals": "pro"}}}'
