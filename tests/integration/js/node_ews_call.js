// Place and look up a phone call through node-ews, which builds its SOAP client
// from the server's own WSDL: it fetches /EWS/Services.wsdl, messages.xsd and
// types.xsd into TEMP_DIR first, with the same credentials as the calls.
//
// Usage: node node_ews_call.js HOST basic|ntlm USER PASSWORD DIAL_STRING TEMP_DIR
// (HOST without a path, e.g. http://127.0.0.1:8081)
// Prints one JSON line: {"phoneCallId": ..., "state": ..., "connectionFailureCause": ...}.
"use strict";

const EWS = require("node-ews");

const [host, auth, username, password, dialString, temp] = process.argv.slice(2);
const versionHeader = { "t:RequestServerVersion": { attributes: { Version: "Exchange2010" } } };

async function main() {
  const ews = new EWS({ username, password, host, auth, temp });
  const placed = await ews.run(
    "PlayOnPhone",
    { ItemId: { attributes: { Id: "AAMkADnodeews=" } }, DialString: dialString },
    versionHeader,
  );
  if (placed.attributes.ResponseClass !== "Success") {
    throw new Error("PlayOnPhone answered " + JSON.stringify(placed));
  }
  const phoneCallId = placed.PhoneCallId.attributes.Id;
  const information = await ews.run(
    "GetPhoneCallInformation",
    { PhoneCallId: { attributes: { Id: phoneCallId } } },
    versionHeader,
  );
  const { PhoneCallState, ConnectionFailureCause } = information.PhoneCallInformation;
  console.log(
    JSON.stringify({
      phoneCallId,
      state: PhoneCallState,
      connectionFailureCause: ConnectionFailureCause,
    }),
  );
}

main().catch((error) => {
  console.error(error && (error.stack || error.message || JSON.stringify(error)));
  process.exit(1);
});
