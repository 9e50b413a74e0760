"""Sans-I/O sniffers the front end runs on peeked bytes: the HTTP/1.x request head and the TLS ClientHello;
and the framing of a keep-alive connection's requests and responses (tcpha.sniff.framing, for `rehandoff`).

Neither touches a socket: feed the bytes peeked so far; get a result, :data:`NeedMore`, or an exception that
says how to refuse the connection (:class:`HeadError` carries an HTTP status; :class:`TlsHelloError` means the
ClientHello is unreadable, which the front end routes like a ClientHello without SNI, see docs/rules.md).
"""

from tcpha.sniff.http import HeadError, RequestHead, parse_request_head, target_path
from tcpha.sniff.incomplete import NeedMore
from tcpha.sniff.tls import (HANDSHAKE_FAILURE_ALERT, ClientHello, TlsHelloError, alert_record, looks_like_tls,
                             parse_client_hello)

__all__ = ["NeedMore", "HeadError", "RequestHead", "parse_request_head", "target_path",
           "TlsHelloError", "ClientHello", "looks_like_tls", "parse_client_hello", "alert_record",
           "HANDSHAKE_FAILURE_ALERT"]
