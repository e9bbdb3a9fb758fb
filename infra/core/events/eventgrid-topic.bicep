// An Event Grid custom topic for the app's own events ("user deleted", "credentials changed").
// Publishing needs an Entra token with the EventGrid Data Sender role: topic access keys are off.
// The webhook subscription is created after deployment by infra/hooks/postdeploy.* (the webhook
// must be running to answer Event Grid's validation handshake). The topic's system-assigned
// identity writes dead letters (postdeploy grants it the container); declared here so that a new
// `azd provision` keeps it, and with it the role assignment made for its principal.
param name string
param location string = resourceGroup().location
param tags object = {}

resource topic 'Microsoft.EventGrid/topics@2025-02-15' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    inputSchema: 'CloudEventSchemaV1_0'
    disableLocalAuth: true
    minimumTlsVersionAllowed: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

output name string = topic.name
output id string = topic.id
output endpoint string = topic.properties.endpoint
