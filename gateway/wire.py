"""Wire constants of Exchange Web Services shared by the client and the simulator.

Only names and codes live here: the client and the simulator each build and
read XML their own way, so a bug in one is not mirrored by the other.
"""

from typing import Final

SOAP_ENV_NS: Final = "http://schemas.xmlsoap.org/soap/envelope/"
MESSAGES_NS: Final = "http://schemas.microsoft.com/exchange/services/2006/messages"
TYPES_NS: Final = "http://schemas.microsoft.com/exchange/services/2006/types"
ERRORS_NS: Final = "http://schemas.microsoft.com/exchange/services/2006/errors"

EWS_PATH: Final = "/EWS/Exchange.asmx"
# The project's WSDL, a resource of the `gateway` package: the client builds its
# envelopes from it, and the simulator serves it as Exchange serves Services.wsdl.
WSDL_RESOURCE: Final = "wsdl/um.wsdl"

DISCONNECT_PHONE_CALL: Final = "DisconnectPhoneCall"
PLAY_ON_PHONE: Final = "PlayOnPhone"
GET_PHONE_CALL_INFORMATION: Final = "GetPhoneCallInformation"
OPERATIONS: Final = (PLAY_ON_PHONE, GET_PHONE_CALL_INFORMATION, DISCONNECT_PHONE_CALL)


def soap_action(operation: str) -> str:
    """Return the SOAPAction header value Exchange expects for an operation."""
    return f"{MESSAGES_NS}/{operation}"


# ExchangeVersionType in types.xsd: the values RequestServerVersion accepts.
EXCHANGE_VERSIONS: Final = frozenset(
    {
        "Exchange2007",
        "Exchange2007_SP1",
        "Exchange2009",
        "Exchange2010",
        "Exchange2010_SP1",
        "Exchange2010_SP2",
        "Exchange2012",
        "Exchange2013",
        "Exchange2013_SP1",
        "Exchange2015",
        "Exchange2016",
        "V2015_10_05",
        "V2016_01_06",
        "V2016_04_13",
        "V2016_07_13",
        "V2016_10_10",
        "V2017_01_07",
        "V2017_04_14",
        "V2017_07_11",
        "V2017_10_09",
        "V2018_01_08",
    }
)

# PhoneCallStateType and ConnectionFailureCauseType in types.xsd.
PHONE_CALL_STATES: Final = (
    "Idle",
    "Connecting",
    "Alerted",
    "Connected",
    "Disconnected",
    "Incoming",
    "Transferring",
    "Forwarding",
)
CONNECTION_FAILURE_CAUSES: Final = ("None", "UserBusy", "NoAnswer", "Unavailable", "Other")

# ResponseCode values (ResponseCodeType in messages.xsd) the gateway maps or the
# simulator produces. Any other code is reported as "Other" in metrics.
NO_ERROR: Final = "NoError"
ERROR_INVALID_PHONE_CALL_ID: Final = "ErrorInvalidPhoneCallId"
ERROR_SERVER_BUSY: Final = "ErrorServerBusy"
ERROR_SCHEMA_VALIDATION: Final = "ErrorSchemaValidation"
ERROR_ITEM_NOT_FOUND: Final = "ErrorItemNotFound"
ERROR_INVALID_PHONE_NUMBER: Final = "ErrorInvalidPhoneNumber"
ERROR_NON_EXISTENT_MAILBOX: Final = "ErrorNonExistentMailbox"

# MessageXml value that carries Exchange's throttling back-off.
BACK_OFF_MILLISECONDS: Final = "BackOffMilliseconds"
