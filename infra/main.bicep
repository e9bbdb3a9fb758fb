// `azd up` entry point: one resource group holding the ACS token service and what it needs.
//
// Keyless by design: the Function App's system-assigned managed identity reaches Storage (its own
// AzureWebJobsStorage, the Flex deployment container and the identity table), Application
// Insights and ACS through Microsoft Entra ID role assignments. No app setting holds a key, the
// storage account refuses shared keys, and Application Insights refuses local (key) ingestion.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; with the subscription and location it seeds the names of all resources.')
param environmentName string

@minLength(1)
@description('Region for all regional resources. It must offer the Flex Consumption plan (az functionapp list-flexconsumption-locations).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group name; empty = rg-<environmentName>.')
param resourceGroupName string = ''

// ---- Caller authentication (AUTH_*) ----

// AUTH_ISSUER and AUTH_AUDIENCE are for authMode 'jwt' only: Easy Auth validates sign-ins itself,
// so they may stay empty with 'easyauth'. Empty with 'jwt', the service answers 503
// configuration_error naming the missing one and /api/health reports it (shared/settings.py).
@description('AUTH_ISSUER (authMode jwt): the OpenID Connect issuer of your app users, exactly as in their tokens\' iss (https). Not used with easyauth.')
param authIssuer string = ''

@description('AUTH_AUDIENCE (authMode jwt): accepted aud values of your API, comma-separated. Not used with easyauth.')
param authAudience string = ''

@allowed([
  'jwt'
  'easyauth'
])
@description('AUTH_MODE: jwt validates bearer tokens; easyauth trusts App Service Authentication, which you configure separately (the service refuses easyauth unless the platform sets WEBSITE_AUTH_ENABLED=True; exclude /api/events and /api/health).')
param authMode string = 'jwt'

@description('AUTH_USER_CLAIM: the claim that names the user (oid for Entra-only apps).')
param authUserClaim string = 'sub'

@description('AUTH_ALGORITHMS: allowed signing algorithms, comma-separated (RS*, PS*, ES*).')
param authAlgorithms string = 'RS256'

// Set, it replaces the four above: leave authIssuer and authAudience empty (the service refuses
// both at once); authUserClaim and authAlgorithms are then left unset.
@description('AUTH_ISSUERS (authMode jwt): several trusted issuers as a JSON array, e.g. an Entra multi-tenant template with a tenant allow-list and a second IdP (README, "Several identity providers"). Empty: AUTH_ISSUER and its settings.')
param authIssuers string = ''
var singleIssuer = empty(authIssuers)

// ---- Token policy, identities, cleanup (TOKEN_*, IDENTITY_*, CLEANUP_SCHEDULE) ----

@description('IDENTITY_TABLE: the Table Storage table of user-to-ACS-identity mappings (created on first use).')
param identityTable string = 'acsidentities'

@description('TOKEN_ALLOWED_SCOPES: ACS scopes callers may ask for, comma-separated.')
param tokenAllowedScopes string = 'chat,voip,chat.join,chat.join.limited,voip.join'

@description('TOKEN_DEFAULT_SCOPES: scopes when the request names none, comma-separated.')
param tokenDefaultScopes string = 'chat,voip'

@minValue(60)
@maxValue(1440)
@description('TOKEN_DEFAULT_MINUTES: token lifetime when the request names none.')
param tokenDefaultMinutes int = 60

@minValue(60)
@maxValue(1440)
@description('TOKEN_MIN_MINUTES: shortest lifetime a caller may ask for.')
param tokenMinMinutes int = 60

@minValue(60)
@maxValue(1440)
@description('TOKEN_MAX_MINUTES: longest lifetime a caller may ask for.')
param tokenMaxMinutes int = 1440

@minValue(1)
@maxValue(3650)
@description('IDENTITY_RETENTION_DAYS: delete ACS identities unused for this many days.')
param identityRetentionDays int = 90

@minLength(1)
@description('CLEANUP_SCHEDULE: NCRONTAB schedule of the cleanup timer (its trigger reads %CLEANUP_SCHEDULE%).')
param cleanupSchedule string = '0 */5 * * * *'

// ---- Event Grid webhook (EVENTS_*) ----

@description('EVENTS_REVOKE_ON_USER_UPDATED: revoke a user\'s ACS tokens on Microsoft.Graph.UserUpdated.')
param eventsRevokeOnUserUpdated bool = true

@description('EVENTS_USER_DELETED_TYPES: your app\'s own "user deleted" event types, comma-separated.')
param eventsUserDeletedTypes string = ''

@description('EVENTS_CREDENTIALS_CHANGED_TYPES: your app\'s own "credentials changed" event types, comma-separated.')
param eventsCredentialsChangedTypes string = ''

@description('Create an Event Grid custom topic (Entra-only publishing) for your app\'s own events; the postdeploy hook subscribes the webhook to it.')
param createEventsTopic bool = true

// ---- Microsoft Graph change notifications (GRAPH_*) ----

@description('GRAPH_ENDPOINT: Microsoft Graph, where the app creates and renews its subscription on users.')
param graphEndpoint string = 'https://graph.microsoft.com'

@description('Name of the Event Grid partner topic Microsoft Graph delivers user events to (created with the Graph subscription). Set, the app creates and renews that subscription itself (GRAPH_NOTIFICATION_URL); empty = off.')
param graphPartnerTopic string = ''

// ---- Teams users, demo page ----

@description('TEAMS_CLIENT_APP_ID: Entra application (client) id your Teams users sign in to (POST /api/teams/token); empty = off.')
param teamsClientAppId string = ''

@description('DEMO_PAGE_ENABLED: serve the browser demo page at GET /api/demo.')
param demoPageEnabled bool = false

// ---- Hardening (issue 7) ----

@minValue(0)
@maxValue(100000)
@description('RATE_LIMIT_PER_MINUTE: per-user limit on token requests; infra turns the limiter on (0 = off).')
param rateLimitPerMinute int = 30

@allowed(['on', 'off'])
@description('STORM_PROTECTION: past ACS\'s limits, fresh tokens are answered again and identical requests share one ACS call (off: one ACS call each).')
param stormProtection string = 'on'

@description('Browser origins allowed by the platform CORS, comma-separated (e.g. https://app.contoso.com). Empty = none.')
param corsAllowedOrigins string = ''

// ---- Azure Communication Services ----

@description('Where ACS keeps its data at rest (fixed once created).')
param acsDataLocation string = 'United States'

// Data-plane calls to the ACS Identity API with a Microsoft Entra token are authorized by Azure RBAC
// on the Communication Services resource. Microsoft's own Entra quickstart for the Identity SDK
// ("Quickstart: Authenticate using Microsoft Entra ID", MicrosoftDocs/azure-docs
// articles/communication-services/quickstarts/identity/includes/active-directory/service-principal-cli.md)
// grants the built-in Contributor role (b24988ac-6180-42a0-ab88-20f7382dd24c, per
// articles/role-based-access-control/built-in-roles/general.md), so that is the default, scoped to
// this one ACS resource only. The narrower built-in "Communication and Email Service Owner"
// (09976791-48a7-449e-bb21-39d1a415f350; "gives access to all Communication and Email service
// operations", articles/communication-services/quickstarts/email/send-email-smtp/includes/
// smtp-authentication-customrole.md) can be chosen here instead.
@allowed([
  'b24988ac-6180-42a0-ab88-20f7382dd24c'
  '09976791-48a7-449e-bb21-39d1a415f350'
])
@description('Role the Function App identity gets on the ACS resource: Contributor (default) or Communication and Email Service Owner.')
param acsRoleDefinitionId string = 'b24988ac-6180-42a0-ab88-20f7382dd24c'

// ---- Flex Consumption scale ----

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = 'func-api-${resourceToken}'
// The Flex Consumption deployment package container (one per app, in the app's storage account).
var deploymentStorageContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
var corsOrigins = empty(corsAllowedOrigins) ? [] : split(replace(corsAllowedOrigins, ' ', ''), ',')
var userDeletedTypes = empty(eventsUserDeletedTypes) ? [] : split(replace(eventsUserDeletedTypes, ' ', ''), ',')
var credentialsChangedTypes = empty(eventsCredentialsChangedTypes) ? [] : split(replace(eventsCredentialsChangedTypes, ' ', ''), ',')
var appEventTypes = join(concat(userDeletedTypes, credentialsChangedTypes), ',')
// Where Event Grid puts events it cannot deliver (postdeploy gives each topic's identity access).
var deadLetterContainerName = 'eventgrid-deadletter'
// The partner-topic address of "Receive Microsoft Graph API change events through Azure Event
// Grid" (Microsoft Learn): Graph creates the partner topic when the app creates the subscription.
var graphNotificationUrl = empty(graphPartnerTopic) ? '' : 'EventGrid:?azuresubscriptionid=${subscription().subscriptionId}&resourcegroup=${rg.name}&partnertopic=${graphPartnerTopic}&location=${location}'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
  location: location
  tags: tags
}

module monitoring 'core/monitor/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    location: location
    tags: tags
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
  }
}

module storage 'core/storage/storage-account.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    containers: [
      deploymentStorageContainerName
      deadLetterContainerName
    ]
  }
}

module acs 'core/communication/communication-services.bicep' = {
  name: 'communication'
  scope: rg
  params: {
    name: 'acs-${resourceToken}'
    tags: tags
    dataLocation: acsDataLocation
  }
}

module eventsTopic 'core/events/eventgrid-topic.bicep' = if (createEventsTopic) {
  name: 'events-topic'
  scope: rg
  params: {
    name: 'evgt-${resourceToken}'
    location: location
    tags: tags
  }
}

// Every setting the service reads (shared/settings.py, README "Settings"), keyless: endpoints only.
// ACS_CONNECTION_STRING / TABLES_CONNECTION_STRING (keys) are deliberately absent, and so is
// AZURE_CLIENT_ID: the system-assigned identity needs none.
var serviceSettings = {
  AUTH_MODE: authMode
  AUTH_ISSUER: authIssuer
  AUTH_AUDIENCE: authAudience
  AUTH_USER_CLAIM: singleIssuer ? authUserClaim : ''
  AUTH_ALGORITHMS: singleIssuer ? authAlgorithms : ''
  AUTH_ISSUERS: authIssuers
  ACS_ENDPOINT: acs.outputs.endpoint
  TABLES_ENDPOINT: storage.outputs.tableEndpoint
  IDENTITY_TABLE: identityTable
  TOKEN_ALLOWED_SCOPES: tokenAllowedScopes
  TOKEN_DEFAULT_SCOPES: tokenDefaultScopes
  TOKEN_DEFAULT_MINUTES: string(tokenDefaultMinutes)
  TOKEN_MIN_MINUTES: string(tokenMinMinutes)
  TOKEN_MAX_MINUTES: string(tokenMaxMinutes)
  IDENTITY_RETENTION_DAYS: string(identityRetentionDays)
  CLEANUP_SCHEDULE: cleanupSchedule
  EVENTS_REVOKE_ON_USER_UPDATED: eventsRevokeOnUserUpdated ? 'true' : 'false'
  EVENTS_USER_DELETED_TYPES: eventsUserDeletedTypes
  EVENTS_CREDENTIALS_CHANGED_TYPES: eventsCredentialsChangedTypes
  TEAMS_CLIENT_APP_ID: teamsClientAppId
  DEMO_PAGE_ENABLED: demoPageEnabled ? 'true' : 'false'
  RATE_LIMIT_PER_MINUTE: string(rateLimitPerMinute)
  STORM_PROTECTION: stormProtection
  GRAPH_ENDPOINT: graphEndpoint
  GRAPH_NOTIFICATION_URL: graphNotificationUrl
}

module api 'app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    storageAccountName: storage.outputs.name
    deploymentStorageContainerName: deploymentStorageContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    appSettings: serviceSettings
    corsAllowedOrigins: corsOrigins
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    principalId: api.outputs.identityPrincipalId
    storageAccountName: storage.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    communicationServiceName: acs.outputs.name
    acsRoleDefinitionId: acsRoleDefinitionId
  }
}

// Outputs become azd environment values (read by infra/hooks/postdeploy.*).
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
output SERVICE_API_URI string = api.outputs.uri
output ACS_ENDPOINT string = acs.outputs.endpoint
output TABLES_ENDPOINT string = storage.outputs.tableEndpoint
output EVENTS_TOPIC_ID string = createEventsTopic ? eventsTopic.outputs.id : ''
output EVENTS_TOPIC_ENDPOINT string = createEventsTopic ? eventsTopic.outputs.endpoint : ''
output APP_EVENT_TYPES string = appEventTypes
output EVENTS_DEADLETTER_CONTAINER_ID string = '${storage.outputs.id}/blobServices/default/containers/${deadLetterContainerName}'
