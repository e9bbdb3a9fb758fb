// The token service's Function App: Flex Consumption, Python 3.13, system-assigned identity.
param name string
param planName string
param location string = resourceGroup().location
param tags object = {}
param storageAccountName string
param deploymentStorageContainerName string
param applicationInsightsName string
@description('The service\'s own app settings (names from shared/settings.py); platform settings are added here.')
param appSettings object
@description('Origins for the platform CORS (siteConfig.cors.allowedOrigins).')
param corsAllowedOrigins array = []
param maximumInstanceCount int = 100
param instanceMemoryMB int = 2048

// azd finds the app it deploys the `api` service of azure.yaml to by this tag.
var serviceName = 'api'

module functionApp '../core/host/functions-flexconsumption.bicep' = {
  name: '${serviceName}-flexconsumption'
  params: {
    name: name
    planName: planName
    location: location
    tags: union(tags, {
      'azd-service-name': serviceName
    })
    storageAccountName: storageAccountName
    deploymentStorageContainerName: deploymentStorageContainerName
    applicationInsightsName: applicationInsightsName
    runtimeName: 'python'
    runtimeVersion: '3.13'
    appSettings: appSettings
    corsAllowedOrigins: corsAllowedOrigins
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
}

output name string = functionApp.outputs.name
output uri string = functionApp.outputs.uri
output identityPrincipalId string = functionApp.outputs.identityPrincipalId
