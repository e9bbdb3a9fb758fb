# azd postdeploy hook (Windows / PowerShell): the same as postdeploy.sh, which documents the
# azd environment values it reads. Subscribes the deployed webhook (POST /api/events) to Event Grid
# after deployment, when the function can answer the validation handshake. Never prints the key.
$ErrorActionPreference = 'Stop'

if ($env:EVENTS_SUBSCRIPTION_ENABLED -eq 'false') {
    Write-Host 'postdeploy: EVENTS_SUBSCRIPTION_ENABLED=false, no Event Grid subscription made.'
    exit 0
}
if (-not $env:AZURE_RESOURCE_GROUP -or -not $env:AZURE_FUNCTION_APP_NAME) {
    Write-Error 'postdeploy: AZURE_RESOURCE_GROUP / AZURE_FUNCTION_APP_NAME missing: run azd provision first.'
}
$topicId = $env:EVENTS_TOPIC_ID
$graphTopic = $env:GRAPH_PARTNER_TOPIC
if (-not $topicId -and -not $graphTopic) {
    Write-Host 'postdeploy: no EVENTS_TOPIC_ID and no GRAPH_PARTNER_TOPIC, nothing to subscribe.'
    exit 0
}
if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Write-Error 'postdeploy: the Azure CLI (az) is needed to create the Event Grid subscription.'
}

$sub = @()
if ($env:AZURE_SUBSCRIPTION_ID) { $sub = @('--subscription', $env:AZURE_SUBSCRIPTION_ID) }
$rg = $env:AZURE_RESOURCE_GROUP
$app = $env:AZURE_FUNCTION_APP_NAME
$delay = if ($env:POSTDEPLOY_RETRY_DELAY) { [int]$env:POSTDEPLOY_RETRY_DELAY } else { 15 }
$name = if ($env:EVENTS_SUBSCRIPTION_NAME) { $env:EVENTS_SUBSCRIPTION_NAME } else { 'acs-token-service' }

$key = ''
for ($i = 1; $i -le 20 -and -not $key; $i++) {
    $key = az functionapp function keys list @sub -g $rg -n $app --function-name events --query default -o tsv 2>$null
    if (-not $key) {
        Write-Host "postdeploy: waiting for the events function to be indexed ($i/20)..."
        Start-Sleep -Seconds $delay
    }
}
if (-not $key) { Write-Error "postdeploy: could not read the function key of 'events' on $app." }
$hostName = az functionapp show @sub -g $rg -n $app --query defaultHostName -o tsv
$endpoint = "https://$hostName/api/events?code=$key"

function Split-Types([string] $value) {
    return @($value -split '[,\s]+' | Where-Object { $_ })
}

function Invoke-Create([string] $what, [string[]] $azArgs) {
    for ($n = 1; $n -le 3; $n++) {
        $err = & az @azArgs --only-show-errors -o none 2>&1
        if ($LASTEXITCODE -eq 0) {
            Write-Host "postdeploy: ${what}: subscribed https://$hostName/api/events"
            return $true
        }
        if ($n -lt 3) { Start-Sleep -Seconds $delay }
    }
    Write-Host "postdeploy: $what failed:"
    Write-Host (($err | Out-String).Replace($key, '***'))
    return $false
}

$ok = $true
if ($topicId) {
    $types = if ($env:EVENTS_EVENT_TYPES) { $env:EVENTS_EVENT_TYPES } else { $env:APP_EVENT_TYPES }
    $azArgs = @('eventgrid', 'event-subscription', 'create') + $sub + @(
        '--name', $name, '--source-resource-id', $topicId, '--endpoint-type', 'webhook', '--endpoint', $endpoint)
    $typeList = Split-Types $types
    if ($typeList.Count -gt 0) { $azArgs += @('--included-event-types') + $typeList }
    if (-not (Invoke-Create "topic $topicId" $azArgs)) { $ok = $false }
}

if ($graphTopic) {
    $state = az eventgrid partner topic show @sub -g $rg -n $graphTopic --query activationState -o tsv 2>$null
    if ($state -ne 'Activated') {
        Write-Host "postdeploy: partner topic $graphTopic is '$state', not Activated: activate it (README, Deploy to Azure) and run 'azd hooks run postdeploy' again."
        $ok = $false
    } else {
        $gtypes = if ($env:GRAPH_EVENT_TYPES) { $env:GRAPH_EVENT_TYPES } else { 'Microsoft.Graph.UserUpdated,Microsoft.Graph.UserDeleted' }
        $azArgs = @('eventgrid', 'partner', 'topic', 'event-subscription', 'create') + $sub + @(
            '--name', $name, '-g', $rg, '--partner-topic-name', $graphTopic, '--endpoint-type', 'webhook',
            '--endpoint', $endpoint, '--event-delivery-schema', 'cloudeventschemav1_0',
            '--included-event-types') + (Split-Types $gtypes)
        if (-not (Invoke-Create "partner topic $graphTopic" $azArgs)) { $ok = $false }
    }
}
if (-not $ok) { exit 1 }
