"""Shared TLS session cache for stdlib ``ssl`` servers (distcache or any add/get/remove cache).

    import ssl, tcpha.tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain("cert.pem", "key.pem")
    tcpha.tls.share_sessions(ctx, "UNIX:/run/tcpha/scache")

See docs/tls.md.
"""

from .sealing import SessionKeyError, SessionSealer
from .sharing import DistcacheSessions, SessionCacheStats, posted_operations, session_cache_stats, share_sessions

__all__ = ["share_sessions", "session_cache_stats", "posted_operations", "DistcacheSessions", "SessionCacheStats", "SessionSealer",
           "SessionKeyError"]
