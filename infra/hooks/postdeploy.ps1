# azd postdeploy hook (Windows / PowerShell): the same as postdeploy.sh, which documents the
# azd environment values it reads. Subscribes the deployed webhook (POST /api/events) to Event Grid
# after deployment, when the function can answer the validation handshake. Never prints the key.
# Every event subscription dead-letters to EVENTS_DEADLETTER_CONTAINER_ID with the topic's own
# system-assigned identity, which gets Storage Blob Data Contributor on that container only
# (Event Grid drops what it cannot deliver otherwise: it never retries a 400, 401, 403 or 413).
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
$dlContainer = $env:EVENTS_DEADLETTER_CONTAINER_ID
if (-not $dlContainer -or $dlContainer -notmatch '^/subscriptions/.+/blobServices/default/containers/[^/]+$') {
    Write-Error 'postdeploy: EVENTS_DEADLETTER_CONTAINER_ID is missing or not a blob container''s resource id: run azd provision first (infra creates the container).'
}
$dlAccount, $dlName = $dlContainer -split '/blobServices/default/containers/', 2
$egApi = '2022-06-15'  # Microsoft.EventGrid API version for identities and dead-letter identities
$blobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'  # Storage Blob Data Contributor

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

function Invoke-Step([string] $what, [string[]] $azArgs) {
    for ($n = 1; $n -le 3; $n++) {
        $err = & az @azArgs --only-show-errors -o none 2>&1
        if ($LASTEXITCODE -eq 0) { return $true }
        if ($n -lt 3) { Start-Sleep -Seconds $delay }
    }
    Write-Host "postdeploy: $what failed:"
    Write-Host (($err | Out-String).Replace($key, '***'))
    return $false
}

# JSON bodies go to az through files: Windows PowerShell strips the quotes of native arguments.
function Write-Body([string] $json) {
    $file = New-TemporaryFile
    Set-Content -Path $file.FullName -Value $json -NoNewline -Encoding ascii
    return "@$($file.FullName)"
}

# The topic's system-assigned identity on (a PATCH that keeps one it has), with Storage Blob Data
# Contributor on the dead-letter container only.
function Grant-DeadLetterAccess([string] $resourceId) {
    $identityBody = Write-Body '{"identity": {"type": "SystemAssigned"}}'
    if (-not (Invoke-Step "identity of $resourceId" @('rest', '--method', 'patch', '--url', "${resourceId}?api-version=$egApi", '--body', $identityBody))) { return $false }
    $principal = az rest --method get --url "${resourceId}?api-version=$egApi" --query identity.principalId -o tsv 2>$null
    if (-not $principal) {
        Write-Host "postdeploy: $resourceId has no system-assigned identity; dead-lettering not set up."
        return $false
    }
    if (-not (Invoke-Step "dead-letter role for $resourceId" @('role', 'assignment', 'create', '--assignee-object-id', $principal,
            '--assignee-principal-type', 'ServicePrincipal', '--role', $blobDataContributor, '--scope', $dlContainer))) { return $false }
    Write-Host "postdeploy: $resourceId dead-letters to container $dlName with its managed identity"
    return $true
}

$ok = $true
if ($topicId -and -not (Grant-DeadLetterAccess $topicId)) { $ok = $false; $topicId = $null }
if ($topicId) {
    $types = if ($env:EVENTS_EVENT_TYPES) { $env:EVENTS_EVENT_TYPES } else { $env:APP_EVENT_TYPES }
    $azArgs = @('eventgrid', 'event-subscription', 'create') + $sub + @(
        '--name', $name, '--source-resource-id', $topicId, '--endpoint-type', 'webhook', '--endpoint', $endpoint,
        '--deadletter-identity', 'systemassigned', '--deadletter-identity-endpoint', $dlContainer)
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
        $gtypes = if ($env:GRAPH_EVENT_TYPES) { $env:GRAPH_EVENT_TYPES } else { 'Microsoft.Graph.UserUpdated,Microsoft.Graph.UserDeleted,Microsoft.Graph.SubscriptionReauthorizationRequired' }
        $ptId = az eventgrid partner topic show @sub -g $rg -n $graphTopic --query id -o tsv
        $azArgs = @('eventgrid', 'partner', 'topic', 'event-subscription', 'create') + $sub + @(
            '--name', $name, '-g', $rg, '--partner-topic-name', $graphTopic, '--endpoint-type', 'webhook',
            '--endpoint', $endpoint, '--event-delivery-schema', 'cloudeventschemav1_0',
            '--included-event-types') + (Split-Types $gtypes)
        # The partner topic's CLI command takes no dead-letter identity: create, then PATCH
        # deadLetterWithResourceIdentity onto the event subscription (Event Grid REST API).
        $dlBody = (@{ deadLetterWithResourceIdentity = @{ identity = @{ type = 'SystemAssigned' };
                    deadLetterDestination = @{ endpointType = 'StorageBlob';
                        properties = @{ resourceId = $dlAccount; blobContainerName = $dlName } } } } | ConvertTo-Json -Depth 6 -Compress)
        $dlBody = Write-Body $dlBody
        if (-not (Grant-DeadLetterAccess $ptId)) { $ok = $false }
        elseif (-not (Invoke-Create "partner topic $graphTopic" $azArgs)) { $ok = $false }
        elseif (-not (Invoke-Step "dead-lettering of partner topic $graphTopic" @('rest', '--method', 'patch',
                '--url', "$ptId/eventSubscriptions/${name}?api-version=$egApi", '--body', $dlBody))) { $ok = $false }
    }
}
if (-not $ok) { exit 1 }
