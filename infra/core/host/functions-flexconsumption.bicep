// A Linux Function App on the Flex Consumption plan (FC1) with a system-assigned managed identity.
// Shapes follow Azure-Samples/azure-functions-flex-consumption-samples (IaC/bicep) and the azd
// Functions quickstarts. Everything the host itself needs from Storage and Application Insights
// is reached with the app's identity: no key or key-bearing connection string in any setting.
param name string
param planName string
param location string = resourceGroup().location
param tags object = {}
param storageAccountName string
param deploymentStorageContainerName string
param applicationInsightsName string

@allowed([
  'python'
])
param runtimeName string = 'python'
@allowed([
  '3.13'
])
param runtimeVersion string = '3.13'

param appSettings object = {}
param corsAllowedOrigins array = []
param maximumInstanceCount int = 100
param instanceMemoryMB int = 2048

resource storage 'Microsoft.Storage/storageAccounts@2024-01-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
      // Platform CORS for browser clients; credentials stay off (bearer tokens, not cookies).
      cors: {
        allowedOrigins: corsAllowedOrigins
        supportCredentials: false
      }
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentStorageContainerName}'
          authentication: {
            type: 'SystemAssignedIdentity'
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: runtimeName
        version: runtimeVersion
      }
    }
  }

  resource settings 'config' = {
    name: 'appsettings'
    properties: union(appSettings, {
      // Identity-based host storage: the account name plus "use the managed identity"
      // (system-assigned: no clientId). Blob and Queue roles are granted in app/rbac.bicep.
      AzureWebJobsStorage__accountName: storage.name
      AzureWebJobsStorage__credential: 'managedidentity'
      // The connection string names the App Insights resource; it is not a key. With local
      // auth disabled on the component, ingestion needs the Entra token this setting asks for.
      APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
      APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD'
    })
  }
}

output name string = functionApp.name
output uri string = 'https://${functionApp.properties.defaultHostName}'
output identityPrincipalId string = functionApp.identity.principalId
