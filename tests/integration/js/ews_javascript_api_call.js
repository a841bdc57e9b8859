// Place, look up and hang up a phone call through ews-javascript-api.
//
// The library declares PlayOnPhone, GetPhoneCallInformation and DisconnectPhoneCall
// but implements none of them, so the three requests are written here on its own
// request and response base classes; everything else (the SOAP envelope, the
// headers, Basic through its default XHR, NTLM through @ewsjs/xhr) is the library's.
//
// Usage: node ews_javascript_api_call.js EWS_URL basic|ntlm USER PASSWORD DIAL_STRING
// Prints one JSON line: {"phoneCallId": ..., "state": ..., "connectionFailureCause": ...}.
"use strict";

const ews = require("ews-javascript-api");
const { XhrApi } = require("@ewsjs/xhr");

const [url, auth, username, password, dialString] = process.argv.slice(2);
const M = ews.XmlNamespace.Messages;

class UmRequest extends ews.SimpleServiceRequestBase {
  constructor(service, operation, writeElements, Response) {
    super(service);
    this.operation = operation;
    this.writeElements = writeElements;
    this.Response = Response;
  }

  async Execute() {
    const response = await this.InternalExecute();
    response.ThrowIfNecessary();
    return response;
  }

  GetMinimumRequiredServerVersion() {
    return ews.ExchangeVersion.Exchange2010;
  }

  GetXmlElementName() {
    return this.operation;
  }

  GetResponseXmlElementName() {
    return this.operation + "Response";
  }

  ParseResponse(body) {
    const response = new this.Response();
    response.LoadFromXmlJsObject(body, this.Service);
    return response;
  }

  WriteElementsToXml(writer) {
    this.writeElements(writer);
  }
}

class PlayOnPhoneResponse extends ews.ServiceResponse {
  ReadElementsFromXmlJsObject(body) {
    this.phoneCallId = body.PhoneCallId.Id;
  }
}

class PhoneCallInformationResponse extends ews.ServiceResponse {
  ReadElementsFromXmlJsObject(body) {
    const information = body.PhoneCallInformation;
    this.state = information.PhoneCallState;
    this.connectionFailureCause = information.ConnectionFailureCause;
  }
}

function writePhoneCallId(id) {
  return (writer) => {
    writer.WriteStartElement(M, "PhoneCallId");
    writer.WriteAttributeValue("Id", id);
    writer.WriteEndElement();
  };
}

async function main() {
  if (auth === "ntlm") {
    ews.ConfigurationApi.ConfigureXHR(new XhrApi().useNtlmAuthentication(username, password));
  }
  const service = new ews.ExchangeService(ews.ExchangeVersion.Exchange2010);
  service.Url = new ews.Uri(url);
  service.Credentials = new ews.WebCredentials(username, password);

  const placed = await new UmRequest(
    service,
    "PlayOnPhone",
    (writer) => {
      writer.WriteStartElement(M, "ItemId");
      writer.WriteAttributeValue("Id", "AAMkADewsjs=");
      writer.WriteEndElement();
      writer.WriteElementValue(M, "DialString", dialString);
    },
    PlayOnPhoneResponse,
  ).Execute();
  const information = await new UmRequest(
    service,
    "GetPhoneCallInformation",
    writePhoneCallId(placed.phoneCallId),
    PhoneCallInformationResponse,
  ).Execute();
  await new UmRequest(
    service,
    "DisconnectPhoneCall",
    writePhoneCallId(placed.phoneCallId),
    ews.ServiceResponse,
  ).Execute();
  console.log(
    JSON.stringify({
      phoneCallId: placed.phoneCallId,
      state: information.state,
      connectionFailureCause: information.connectionFailureCause,
    }),
  );
}

main().catch((error) => {
  console.error(error && (error.stack || error.message || JSON.stringify(error)));
  process.exit(1);
});
