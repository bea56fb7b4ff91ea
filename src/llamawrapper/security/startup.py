"""What a server does with its security settings before it opens its port: make the encryption
key and retention period the process's (the library's response cache reads them), then try the
key on the response cache it will use, so a missing or wrong key is a clear start-up error
(``EncryptionKeyError``), never wrong answers or a cache of unreadable entries."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import EncryptionKeyError
from . import retention
from .crypto import cipher_from, configure

log = logging.getLogger("llamawrapper.security")


def configure_process(security: Any) -> None:
    from ..config import CacheSettings, home_dir
    from ..requests.response_cache import ResponseCache, open_backend

    cipher = cipher_from(security.encryption_key, security.encryption_key_file)
    configure(cipher)
    retention.configure(security.retention_days)
    cache = CacheSettings()
    if not cache.enabled and cipher is None:
        return
    backend = None
    try:
        backend = open_backend(cache.url, home_dir() / "cache", retention.capped_ttl(cache.ttl), cache.max_entries,
                               int(cache.max_mb * 1024 * 1024))
        ResponseCache(backend, cipher=cipher, where=f"The response cache ({cache.url or home_dir() / 'cache'})")
    except EncryptionKeyError:
        raise
    except Exception as exc:  # an unreachable Redis is the cache's own concern at request time
        log.warning("response cache not checked for encryption: %s", exc)
    finally:
        if backend is not None:
            backend.close()
