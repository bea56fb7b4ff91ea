"""Encryption at rest with AES-256-GCM (``cryptography``'s ``AESGCM``): authenticated, so a
wrong key or a changed byte is detected, never decrypted into wrong data.

A blob is ``b"lwe1" + 12-byte random nonce + ciphertext-and-tag``. Callers pass associated data
(the cache entry's key) so an entry copied under another key fails to decrypt too.

The key is 32 bytes, given base64 (url-safe or standard) or hex, in ``encryption_key`` (env
``LLAMAWRAPPER_ENCRYPTION_KEY``) or a file named by ``encryption_key_file``. ``llamawrapper keys
encryption-key`` prints a new one."""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path
from typing import Optional

from ..errors import EncryptionKeyError

MAGIC = b"lwe1"
NONCE_BYTES = 12
KEY_BYTES = 32


def new_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def parse_key(text: str) -> bytes:
    text = text.strip()
    candidates = []
    if len(text) == 2 * KEY_BYTES:
        try:
            candidates.append(bytes.fromhex(text))
        except ValueError:
            pass
    for decode in (base64.urlsafe_b64decode, base64.b64decode):
        try:
            candidates.append(decode(text + "=" * (-len(text) % 4)))
        except (binascii.Error, ValueError):
            pass
    for key in candidates:
        if len(key) == KEY_BYTES:
            return key
    raise EncryptionKeyError("The encryption key must be 32 bytes in base64 or hex "
                             "(make one with 'llamawrapper keys encryption-key').")


class Cipher:
    """AES-256-GCM with a random nonce per message."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != KEY_BYTES:
            raise EncryptionKeyError(f"The encryption key must be {KEY_BYTES} bytes, got {len(key)}.")
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes = b"") -> bytes:
        from cryptography.exceptions import InvalidTag

        if not is_encrypted(blob):
            raise EncryptionKeyError("The data is not encrypted with LlamaWrapper's format.")
        nonce, body = blob[len(MAGIC):len(MAGIC) + NONCE_BYTES], blob[len(MAGIC) + NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise EncryptionKeyError("Decryption failed: a wrong encryption key, or the data was changed.") from None


def is_encrypted(blob: Optional[bytes]) -> bool:
    return blob is not None and bytes(blob[:len(MAGIC)]) == MAGIC


def cipher_from(key: Optional[str], key_file: Optional[str]) -> Optional[Cipher]:
    """The cipher for ``encryption_key`` or ``encryption_key_file``; None when neither is set."""
    if key and key_file:
        raise EncryptionKeyError("Give encryption_key or encryption_key_file, not both.")
    if key_file:
        try:
            key = Path(key_file).expanduser().read_text()
        except OSError as exc:
            raise EncryptionKeyError(f"Cannot read the encryption key file {key_file}: {exc.strerror}.") from None
    return Cipher(parse_key(key)) if key else None


_configured: dict[str, Optional[Cipher]] = {}


def configure(cipher: Optional[Cipher]) -> None:
    """Set the process's cipher (the server does, from its settings and flags)."""
    _configured["cipher"] = cipher


def active_cipher() -> Optional[Cipher]:
    """The configured cipher, else the one the environment / config file names."""
    if "cipher" not in _configured:
        from ..config import SecuritySettings

        s = SecuritySettings()
        _configured["cipher"] = cipher_from(s.encryption_key, s.encryption_key_file)
    return _configured["cipher"]


MARKER_PLAINTEXT = b"llamawrapper encrypted store"


def check_marker(marker: Optional[bytes], cipher: Optional[Cipher], where: str) -> Optional[bytes]:
    """Compare a store's encryption marker with the cipher: raise a clear error when they disagree;
    return a new marker to write when the store is new to encryption (else None)."""
    if cipher is None:
        if is_encrypted(marker):
            raise EncryptionKeyError(f"{where} is encrypted; set the encryption key (LLAMAWRAPPER_ENCRYPTION_KEY or "
                                     f"encryption_key_file) to use it.")
        return None
    if marker is None or not is_encrypted(marker):
        return cipher.encrypt(MARKER_PLAINTEXT, b"marker")
    try:
        cipher.decrypt(marker, b"marker")
    except EncryptionKeyError:
        raise EncryptionKeyError(f"{where} was encrypted with a different key; the configured encryption key "
                                 f"cannot read it.") from None
    return None
