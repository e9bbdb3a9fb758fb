#!/bin/sh
# azd postdeploy hook: subscribe the deployed webhook (POST /api/events) to Event Grid.
#
# It runs after `azd deploy` because Event Grid validates a webhook when the subscription is
# created: the function must already be running to answer the handshake. It needs the Azure CLI,
# signed in (`az login`) to the same tenant as azd.
#
# azd environment values it reads (outputs of infra/main.bicep unless noted):
#   AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZURE_FUNCTION_APP_NAME
#   EVENTS_TOPIC_ID          resource id of the Event Grid topic to subscribe to (the app's custom
#                            topic by default; set it with `azd env set` to use another topic)
#   EVENTS_EVENT_TYPES       event types to deliver, comma-separated (default: APP_EVENT_TYPES, the
#                            EVENTS_USER_DELETED_TYPES and EVENTS_CREDENTIALS_CHANGED_TYPES settings;
#                            empty = every type)
#   EVENTS_SUBSCRIPTION_NAME default acs-token-service
#   GRAPH_PARTNER_TOPIC      optional: name of an activated Microsoft Graph partner topic in the
#                            resource group; it gets a subscription too (README "Deploy to Azure")
#   GRAPH_EVENT_TYPES        default Microsoft.Graph.UserUpdated,Microsoft.Graph.UserDeleted and
#                            Graph's lifecycle notification Microsoft.Graph.SubscriptionReauthorizationRequired
#   EVENTS_DEADLETTER_CONTAINER_ID  resource id of the blob container undeliverable events go to
#                            (infra creates it; .../storageAccounts/<a>/blobServices/default/containers/<c>)
#   EVENTS_SUBSCRIPTION_ENABLED  false skips this hook
#   POSTDEPLOY_RETRY_DELAY   seconds between retries (default 15)
#
# The webhook URL carries the function key (?code=...). The key is never printed: az output is
# discarded and error text is shown with the key masked.
#
# Dead-lettering: Event Grid never retries a 400, 401, 403 or 413 and, with no dead-letter
# destination, drops an event it cannot deliver (Microsoft Learn, "Event Grid message delivery and
# retry"). So every event subscription made here dead-letters to EVENTS_DEADLETTER_CONTAINER_ID
# with the topic's own system-assigned identity ("Deliver events using managed identity"), which
# gets Storage Blob Data Contributor on that one container (the storage account refuses shared
# keys). Every step is idempotent: run the hook again at will. README: replaying dead letters.
set -eu
set -f  # event types are split into words below; never glob them

if [ "${EVENTS_SUBSCRIPTION_ENABLED:-true}" = "false" ]; then
  echo "postdeploy: EVENTS_SUBSCRIPTION_ENABLED=false, no Event Grid subscription made."
  exit 0
fi

: "${AZURE_RESOURCE_GROUP:?missing: run azd provision first}"
: "${AZURE_FUNCTION_APP_NAME:?missing: run azd provision first}"
TOPIC_ID="${EVENTS_TOPIC_ID:-}"
GRAPH_TOPIC="${GRAPH_PARTNER_TOPIC:-}"
if [ -z "$TOPIC_ID" ] && [ -z "$GRAPH_TOPIC" ]; then
  echo "postdeploy: no EVENTS_TOPIC_ID and no GRAPH_PARTNER_TOPIC, nothing to subscribe."
  exit 0
fi

if ! command -v az >/dev/null 2>&1; then
  echo "postdeploy: the Azure CLI (az) is needed to create the Event Grid subscription." >&2
  exit 1
fi

SUB_ARGS=""
if [ -n "${AZURE_SUBSCRIPTION_ID:-}" ]; then
  SUB_ARGS="--subscription $AZURE_SUBSCRIPTION_ID"
fi
NAME="${EVENTS_SUBSCRIPTION_NAME:-acs-token-service}"
DL_CONTAINER="${EVENTS_DEADLETTER_CONTAINER_ID:-}"
case "$DL_CONTAINER" in
  /subscriptions/*/blobServices/default/containers/?*) ;;
  *)
    echo "postdeploy: EVENTS_DEADLETTER_CONTAINER_ID is missing or not a blob container's resource id:" \
         "run azd provision first (infra creates the container)." >&2
    exit 1
    ;;
esac
DL_ACCOUNT="${DL_CONTAINER%%/blobServices/default/containers/*}"
DL_NAME="${DL_CONTAINER##*/}"
EG_API="2022-06-15"  # Microsoft.EventGrid API version for identities and dead-letter identities
BLOB_DATA_CONTRIBUTOR="ba92f5b4-2d11-453d-a403-e96b0029c9fe"  # Storage Blob Data Contributor
DELAY="${POSTDEPLOY_RETRY_DELAY:-15}"  # seconds between retries
RG="$AZURE_RESOURCE_GROUP"
APP="$AZURE_FUNCTION_APP_NAME"

# Print $1 with every occurrence of the key replaced (plain string match, no regex).
mask() {
  printf '%s\n' "$1" | awk -v k="$KEY" '{
    if (k != "") { while ((i = index($0, k)) > 0) { $0 = substr($0, 1, i - 1) "***" substr($0, i + length(k)) } }
    print }'
}

# Comma/space list -> space-separated words for --included-event-types.
words() {
  printf '%s' "$1" | tr ',' ' '
}

# The key of the `events` function; right after a deployment the function may not be indexed yet.
KEY=""
HOST=""
attempt=1
while [ $attempt -le 20 ]; do
  # shellcheck disable=SC2086
  KEY=$(az functionapp function keys list $SUB_ARGS -g "$RG" -n "$APP" --function-name events \
        --query default -o tsv 2>/dev/null || true)
  [ -n "$KEY" ] && break
  echo "postdeploy: waiting for the events function to be indexed ($attempt/20)..."
  attempt=$((attempt + 1))
  sleep "$DELAY"
done
if [ -z "$KEY" ]; then
  echo "postdeploy: could not read the function key of 'events' on $APP." >&2
  exit 1
fi
# shellcheck disable=SC2086
HOST=$(az functionapp show $SUB_ARGS -g "$RG" -n "$APP" --query defaultHostName -o tsv)
ENDPOINT="https://$HOST/api/events?code=$KEY"

# $1: description; the rest: the az command. Retries: Event Grid's handshake can time out while a
# Flex Consumption instance is still starting.
create() {
  what=$1
  shift
  n=1
  while :; do
    if err=$("$@" --only-show-errors -o none 2>&1); then
      echo "postdeploy: $what: subscribed https://$HOST/api/events"
      return 0
    fi
    if [ $n -ge 3 ]; then
      echo "postdeploy: $what failed:" >&2
      mask "$err" >&2
      return 1
    fi
    n=$((n + 1))
    sleep "$DELAY"
  done
}

# $1: description; the rest: an az command whose output is not needed. Retries like create().
step() {
  what=$1
  shift
  n=1
  while :; do
    if err=$("$@" --only-show-errors -o none 2>&1); then
      return 0
    fi
    if [ $n -ge 3 ]; then
      echo "postdeploy: $what failed:" >&2
      mask "$err" >&2
      return 1
    fi
    n=$((n + 1))
    sleep "$DELAY"
  done
}

# $1: a topic's resource id. Turns its system-assigned identity on (a PATCH that keeps one it has)
# and gives that identity Storage Blob Data Contributor on the dead-letter container only.
deadletter_access() {
  step "identity of $1" az rest --method patch --url "$1?api-version=$EG_API" \
    --body '{"identity": {"type": "SystemAssigned"}}' || return 1
  principal=$(az rest --method get --url "$1?api-version=$EG_API" --query identity.principalId -o tsv 2>/dev/null || true)
  if [ -z "$principal" ]; then
    echo "postdeploy: $1 has no system-assigned identity; dead-lettering not set up." >&2
    return 1
  fi
  step "dead-letter role for $1" az role assignment create --assignee-object-id "$principal" \
    --assignee-principal-type ServicePrincipal --role "$BLOB_DATA_CONTRIBUTOR" --scope "$DL_CONTAINER" || return 1
  echo "postdeploy: $1 dead-letters to container $DL_NAME with its managed identity"
}

status=0
if [ -n "$TOPIC_ID" ]; then
  deadletter_access "$TOPIC_ID" || status=1
fi
if [ -n "$TOPIC_ID" ] && [ $status -eq 0 ]; then
  TYPES="${EVENTS_EVENT_TYPES:-${APP_EVENT_TYPES:-}}"
  # shellcheck disable=SC2086,SC2046
  if [ -n "$TYPES" ]; then
    create "topic $TOPIC_ID" az eventgrid event-subscription create $SUB_ARGS \
      --name "$NAME" --source-resource-id "$TOPIC_ID" --endpoint-type webhook \
      --endpoint "$ENDPOINT" --deadletter-identity systemassigned \
      --deadletter-identity-endpoint "$DL_CONTAINER" --included-event-types $(words "$TYPES") || status=1
  else
    create "topic $TOPIC_ID" az eventgrid event-subscription create $SUB_ARGS \
      --name "$NAME" --source-resource-id "$TOPIC_ID" --endpoint-type webhook \
      --endpoint "$ENDPOINT" --deadletter-identity systemassigned \
      --deadletter-identity-endpoint "$DL_CONTAINER" || status=1
  fi
fi

if [ -n "$GRAPH_TOPIC" ]; then
  # shellcheck disable=SC2086
  STATE=$(az eventgrid partner topic show $SUB_ARGS -g "$RG" -n "$GRAPH_TOPIC" \
          --query activationState -o tsv 2>/dev/null || true)
  if [ "$STATE" != "Activated" ]; then
    echo "postdeploy: partner topic $GRAPH_TOPIC is '${STATE:-not found}', not Activated: activate it" \
         "(README, Deploy to Azure) and run 'azd hooks run postdeploy' again." >&2
    status=1
  else
    GTYPES="${GRAPH_EVENT_TYPES:-Microsoft.Graph.UserUpdated,Microsoft.Graph.UserDeleted,Microsoft.Graph.SubscriptionReauthorizationRequired}"
    # shellcheck disable=SC2086
    PT_ID=$(az eventgrid partner topic show $SUB_ARGS -g "$RG" -n "$GRAPH_TOPIC" --query id -o tsv 2>/dev/null || true)
    # The partner topic's CLI command takes no dead-letter identity: create the subscription, then
    # PATCH deadLetterWithResourceIdentity onto it (Event Grid REST, Partner Topic Event
    # Subscriptions - Update).
    DL_BODY=$(printf '{"deadLetterWithResourceIdentity": {"identity": {"type": "SystemAssigned"}, "deadLetterDestination": {"endpointType": "StorageBlob", "properties": {"resourceId": "%s", "blobContainerName": "%s"}}}}' "$DL_ACCOUNT" "$DL_NAME")
    # shellcheck disable=SC2086,SC2046
    if [ -n "$PT_ID" ] && deadletter_access "$PT_ID"; then
      if create "partner topic $GRAPH_TOPIC" az eventgrid partner topic event-subscription create $SUB_ARGS \
        --name "$NAME" -g "$RG" --partner-topic-name "$GRAPH_TOPIC" --endpoint-type webhook \
        --endpoint "$ENDPOINT" --event-delivery-schema cloudeventschemav1_0 \
        --included-event-types $(words "$GTYPES"); then
        step "dead-lettering of partner topic $GRAPH_TOPIC" az rest --method patch \
          --url "$PT_ID/eventSubscriptions/$NAME?api-version=$EG_API" --body "$DL_BODY" || status=1
      else
        status=1
      fi
    else
      status=1
    fi
  fi
fi
exit $status
