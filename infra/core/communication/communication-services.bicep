// The Azure Communication Services resource whose Identity API the service calls (Entra auth).
// Its access keys are never read: no key and no connection string in any setting.
param name string
param tags object = {}
@description('Where ACS stores data at rest, e.g. United States, Europe, UK, Australia.')
param dataLocation string = 'United States'

resource communicationService 'Microsoft.Communication/communicationServices@2023-04-01' = {
  name: name
  // Communication Services is a global resource; dataLocation decides where its data lives.
  location: 'global'
  tags: tags
  properties: {
    dataLocation: dataLocation
  }
}

output name string = communicationService.name
output id string = communicationService.id
// ACS_ENDPOINT: https://<hostName>/ (the SDK takes the resource endpoint, not a connection string).
output endpoint string = 'https://${communicationService.properties.hostName}/'
